"""User side: console sign-in and sign-out (the only user route that takes no admin credentials)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse

from protocol import endpoints
from server.auth.service import SESSION_COOKIE, check_browser_write, require_admin, verify_admin_token
from server.http.deps import core_of
from server.schemas import SessionIn
from server.auth.links import create_link, spend_link

router = APIRouter(tags=["user"])


@router.post(endpoints.SESSION)
async def sign_in(body: SessionIn, request: Request, response: Response):
    """Console sign-in with the admin token: sets the HttpOnly cookie `sly_session`.
    Wrong tokens are throttled per client address (429 with Retry-After)."""
    core = core_of(request)
    verify_admin_token(core, request, body.token)
    sid = await core.run(core.sessions.create)
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return {"ok": True}


@router.delete(endpoints.SESSION)
async def sign_out(request: Request, response: Response):
    """Sign out of the console (drops the session and the cookie); from the console's own origin only."""
    core = core_of(request)
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        check_browser_write(request)
        await core.run(core.sessions.drop, sid)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"ok": True}


@router.post(endpoints.SESSION_LINKS, dependencies=[Depends(require_admin)])
async def new_signin_link(request: Request):
    """A one-time console sign-in link (`path`, relative to the server) valid until `expires_at`."""
    core = core_of(request)
    token, expires = await core.run(create_link, core.engine, core.admin_token)
    return {"path": endpoints.path(endpoints.SIGNIN_LINK, token=token), "expires_at": expires}


@router.get(endpoints.SIGNIN_LINK, include_in_schema=False)
async def spend_signin_link(token: str, request: Request):
    """Spend a one-time link: session cookie and on to the nodes page; a used or expired one goes to sign-in."""
    core = core_of(request)
    headers = {"cache-control": "no-store", "referrer-policy": "no-referrer"}

    def spend() -> str | None:
        return core.sessions.create() if spend_link(core.engine, core.admin_token, token) else None
    sid = await core.run(spend)
    if sid is None:
        return RedirectResponse("/signin", status_code=303, headers=headers)
    response = RedirectResponse("/nodes", status_code=303, headers=headers)
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response
