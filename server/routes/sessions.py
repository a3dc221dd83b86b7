"""User side: console sign-in and sign-out (the only user route that takes no admin credentials)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from protocol import endpoints
from server.auth import SESSION_COOKIE, check_browser_write, verify_admin_token
from server.routes.common import core_of
from server.schemas import SessionIn

router = APIRouter(tags=["user"])


@router.post(endpoints.SESSION)
async def sign_in(body: SessionIn, request: Request, response: Response):
    """Console sign-in with the admin token: sets the HttpOnly cookie `sly_session`.
    Wrong tokens are throttled per client address (429 with Retry-After)."""
    core = core_of(request)
    verify_admin_token(core, request, body.token)
    sid = core.sessions.create()
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return {"ok": True}


@router.delete(endpoints.SESSION)
async def sign_out(request: Request, response: Response):
    """Sign out of the console (drops the session and the cookie); from the console's own origin only."""
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        check_browser_write(request)
    core_of(request).sessions.drop(sid)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"ok": True}
