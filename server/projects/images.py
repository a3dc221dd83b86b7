"""The server's side of the Supervisely format (the format itself is protocol/sly_format.py): the
size of a stored blob for the empty annotation of an item posted without one."""

from __future__ import annotations

from PIL import Image

from protocol.sly_format import MAX_IMAGE_PIXELS, read_image_size
from server.blobs.thumbs import FORMATS


def image_size(path) -> tuple[int | None, int | None]:
    """(height, width) from an image file's header (nothing is decoded); (None, None) if unreadable.

    The header reader first; Pillow (already the server's, for thumbnails) only for a header it
    cannot place, limited to the formats the server decodes at all."""
    try:
        hw = read_image_size(path)
        if hw is not None:
            return hw
        with Image.open(path, formats=FORMATS) as im:
            w, h = im.size
    except Exception:  # not an image Pillow knows, truncated, or a decompression bomb: the size stays unknown
        return None, None
    return (int(h), int(w)) if 0 < w * h <= MAX_IMAGE_PIXELS else (None, None)
