"""Thumbnails and previews of image blobs: made once with Pillow, kept on disk beside the blobs.

DATA_DIR/thumbs/<h[0:2]>/<h>-<size>.jpg is the image of blob h scaled to fit size x size
(never enlarged), as JPEG. A blob is content-addressed, so its thumbnail never changes: the
file is its own cache entry for ever, and the HTTP side answers with an immutable ETag.
Only a few sizes exist (SIZES), so the cache is bounded by blobs x sizes.

A blob may come from a task, so decoding is bounded: only the formats in FORMATS are opened (never
EPS/PDF, which Pillow hands to Ghostscript), an image over MAX_SOURCE_PIXELS is refused from its
header, the image is shrunk before it is rotated, and at most RENDERS images are decoded at once.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from protocol.errors import APIError

GRID_SIZE = 256  # a gallery card
PREVIEW_SIZE = 1024  # the large view
SIZES = (128, GRID_SIZE, 512, PREVIEW_SIZE)
# An image above this many pixels is refused from its header, not decoded: a 650 KB PNG may claim
# 13000 x 13000 pixels (676 MB as RGBA); Pillow's own guard (179 Mpx) is far above this.
MAX_SOURCE_PIXELS = 50_000_000
# The decoders a task's file may reach; Image.open tries no other plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Images decoded at once (each up to MAX_SOURCE_PIXELS x 4 bytes); other requests wait their turn.
RENDERS = 2
JPEG_QUALITY = 82


class NotAnImage(Exception):
    """The blob is not an image Pillow can read."""


class ThumbStore:
    def __init__(self, root: Path, blobs):
        self.root = Path(root)
        self.blobs = blobs
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, h: str, size: int) -> Path:
        return self.root / h[0:2] / f"{h}-{size}.jpg"

    def get(self, h: str, size: int) -> Path:
        """The thumbnail file of blob h at `size`, made now if it is not on disk yet (blocking: call it
        in a thread). Raises APIError 404 for an unknown blob, NotAnImage for one Pillow cannot read."""
        dest = self.path(h, size)
        if dest.is_file():
            return dest
        src = self.blobs.path(h)
        if not src.is_file():
            raise APIError(404, "blob_not_found", f"no blob {h}")
        data = render(src, size)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Two requests may make the same thumbnail at once: each writes its own temporary file and
        # the atomic rename lets the last one win with identical bytes; no reader sees a partial file.
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=h[:8] + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest


def render(src: Path, size: int) -> bytes:
    """JPEG bytes of the image at `src` scaled to fit size x size (EXIF rotation applied)."""
    try:
        with Image.open(src, formats=FORMATS) as opened:
            im: Image.Image = opened  # rebound below to the scaled/rotated/converted copies
            if im.width * im.height > MAX_SOURCE_PIXELS:
                raise NotAnImage(f"the image is {im.width}x{im.height}, more than {MAX_SOURCE_PIXELS} pixels")
            # Shrink first (JPEG: decoded at 1/2 to 1/8 scale by draft; others: reduce, then resample),
            # rotate the small image after: exif_transpose on the full one would copy it whole.
            # A quarter turn swaps the sides, but the box is square: the fit is the same.
            im.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            elif im.mode != "RGB":
                im = im.convert("RGB")
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
            return out.getvalue()
    except NotAnImage:
        raise
    except Exception as e:
        # A hostile file reaches corners of the decoders that raise almost anything (OSError for
        # "cannot identify", SyntaxError, ValueError, struct.error, EOFError...): to the user all
        # are "not an image", never a 500.
        raise NotAnImage(f"{type(e).__name__}: {e}") from None
