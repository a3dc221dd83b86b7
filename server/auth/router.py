"""User side: console sign-in and sign-out (the only user route that takes no admin credentials),
and one-time sign-in links."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from protocol import endpoints
from server.auth.deps import check_browser_write, client_of
from server.auth.schemas import SessionIn
from server.auth.service import SESSION_COOKIE, create_link, spend_link, verify_admin_token
from server.http.deps import AdminDep, StateDep

router = APIRouter(tags=["user"])


@router.post(endpoints.SESSION)
async def sign_in(body: SessionIn, request: Request, response: Response, state: StateDep):
    """Console sign-in with the admin token: sets the HttpOnly cookie `sly_session`.
    Wrong tokens are throttled per client address (429 with Retry-After)."""
    verify_admin_token(state, client_of(request), body.token)
    sid = await state.db.run(state.sessions.create)
    response.set_cookie(
        SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https"
    )
    return {"ok": True}


@router.delete(endpoints.SESSION)
async def sign_out(request: Request, response: Response, state: StateDep):
    """Sign out of the console (drops the session and the cookie); from the console's own origin only."""
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        check_browser_write(request)
        await state.db.run(state.sessions.drop, sid)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"ok": True}


@router.post(endpoints.SESSION_LINKS)
async def new_signin_link(_: AdminDep, state: StateDep):
    """A one-time console sign-in link (`path`, relative to the server) valid until `expires_at`."""

    def create() -> tuple[str, float]:
        with state.db.engine.begin() as conn:
            return create_link(conn, state.admin_token)

    token, expires = await state.db.run(create)
    return {"path": endpoints.path(endpoints.SIGNIN_LINK, token=token), "expires_at": expires}


@router.get(endpoints.SIGNIN_LINK, include_in_schema=False)
async def spend_signin_link(token: str, request: Request, state: StateDep):
    """Spend a one-time link: session cookie and on to the nodes page; a used or expired one goes to sign-in."""
    headers = {"cache-control": "no-store", "referrer-policy": "no-referrer"}

    def spend() -> str | None:
        with state.db.engine.begin() as conn:
            spent = spend_link(conn, state.admin_token, token)
        return state.sessions.create() if spent else None

    sid = await state.db.run(spend)
    if sid is None:  # the sign-in page says the link was used or has expired
        return RedirectResponse("/signin?link=spent", status_code=303, headers=headers)
    response = RedirectResponse("/nodes", status_code=303, headers=headers)
    response.set_cookie(
        SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https"
    )
    return response
