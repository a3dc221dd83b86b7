"""User side: thumbnails and previews of image blobs (the console's gallery), made once and cached."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response

from protocol import endpoints
from protocol.errors import APIError
from server.blobs.store import check_sha256
from server.blobs.thumbs import GRID_SIZE, RENDERS, SIZES, NotAnImage, ThumbStore
from server.http.deps import AdminDep, StateDep
from server.state import ServerState

router = APIRouter(tags=["user"])

# A blob never changes, so neither does its thumbnail; `private`: the answer needs a sign-in.
CACHE_CONTROL = "private, max-age=31536000, immutable"


def _store(request: Request, state: ServerState) -> ThumbStore:
    """The app's thumbnail store, made on the first request."""
    app_state = request.app.state
    store = getattr(app_state, "thumbs", None)
    if store is None:
        store = app_state.thumbs = ThumbStore(state.settings.data_dir / "thumbs", state.blobs)
        # A gallery page asks for 48 thumbnails at once: the ones past RENDERS wait here, on the
        # loop, rather than each in a thread with an image decoded in memory.
        app_state.thumb_renders = anyio.CapacityLimiter(RENDERS)
    return store


@router.get(endpoints.USER_BLOB_THUMB)
async def get_thumb(sha256: str, request: Request, state: StateDep, _: AdminDep, size: int = GRID_SIZE):
    """The image blob scaled to fit size x size (JPEG; size one of 128, 256, 512, 1024; never enlarged).

    Made on the first request (in a worker thread, off the event loop) and kept on disk. 415
    `not_an_image` for a blob that is not an image; `If-None-Match` with the ETag answers 304.
    """
    check_sha256(sha256)
    if size not in SIZES:
        raise APIError(400, "bad_size", f"size must be one of {', '.join(map(str, SIZES))}")
    etag = f'"{sha256}-{size}"'
    headers = {"cache-control": CACHE_CONTROL, "etag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    store = _store(request, state)
    try:
        # A made thumbnail is a few KiB in the page cache: read it here, without a trip to a thread
        # (a grid page asks for dozens at once).
        body = store.path(sha256, size).read_bytes()
    except FileNotFoundError:
        try:
            made = await anyio.to_thread.run_sync(store.get, sha256, size, limiter=request.app.state.thumb_renders)
            body = made.read_bytes()
        except NotAnImage as e:
            raise APIError(415, "not_an_image", f"blob {sha256} is not an image the server can read: {e}") from None
    return Response(body, media_type="image/jpeg", headers=headers)
