"""The console sign-in's request body."""

from __future__ import annotations

from server.http.fields import UserIn


class SessionIn(UserIn):
    token: str
