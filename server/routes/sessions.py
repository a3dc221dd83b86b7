"""User side: console sign-in and sign-out (the only user route that takes no admin credentials)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from protocol import endpoints
from protocol.errors import APIError
from server.auth import SESSION_COOKIE, check_admin_token
from server.routes.common import core_of
from server.schemas import SessionIn

router = APIRouter(tags=["user"])


@router.post(endpoints.SESSION)
async def sign_in(body: SessionIn, request: Request, response: Response):
    """Console sign-in with the admin token: sets the HttpOnly cookie `sly_session`."""
    core = core_of(request)
    if not check_admin_token(core, body.token):
        raise APIError(401, "unauthorized", "the admin token is wrong")
    sid = core.sessions.create()
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return {"ok": True}


@router.delete(endpoints.SESSION)
async def sign_out(request: Request, response: Response):
    """Sign out of the console (drops the session and the cookie)."""
    core_of(request).sessions.drop(request.cookies.get(SESSION_COOKIE))
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"ok": True}
