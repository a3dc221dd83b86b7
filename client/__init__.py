"""The user side: a Python client of the server's user API and the `sly` command line.

Imports only `protocol` and third-party libraries, never `server`: it is what a user installs
on a laptop to drive a server somewhere else.
"""

from client.api import FINAL_STATES, UserClient
from protocol.errors import APIError, AuthError

__all__ = ["UserClient", "APIError", "AuthError", "FINAL_STATES"]
