"""The one definition of the Supervisely format (protocol/sly_format.py): image sizes from headers,
the empty meta and annotation, the JSON dump, and the checks of a meta and of an annotation."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from protocol import sly_format as sf


def _image(fmt: str, w: int, h: int, **save) -> bytes:
    buf = io.BytesIO()
    mode = save.pop("mode", "RGB")
    Image.new(mode, (w, h), 7 if mode in ("P", "L", "1") else (10, 20, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def _exif(n: int) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * n  # ImageDescription: makes APP1 about n bytes long
    return exif.tobytes()


IMAGES = {
    "png": lambda: _image("PNG", 17, 13),
    "png palette": lambda: _image("PNG", 5, 300, mode="P"),
    "jpeg": lambda: _image("JPEG", 33, 21),
    "jpeg progressive": lambda: _image("JPEG", 40, 9, progressive=True),
    "jpeg grey": lambda: _image("JPEG", 8, 3, mode="L"),
    "jpeg with EXIF": lambda: _image("JPEG", 19, 11, exif=_exif(60_000)),
    "gif": lambda: _image("GIF", 300, 2, mode="P"),
    "bmp": lambda: _image("BMP", 6, 9),
    "bmp 1-bit": lambda: _image("BMP", 70, 3, mode="1"),
    "webp lossy": lambda: _image("WEBP", 23, 17),
    "webp lossless": lambda: _image("WEBP", 23, 17, lossless=True),
    "webp with alpha (VP8X)": lambda: _image("WEBP", 31, 5, mode="RGBA"),
    "tiff": lambda: _image("TIFF", 12, 34),
    "ppm": lambda: _image("PPM", 14, 6),
    "pgm": lambda: _image("PPM", 4, 16, mode="L"),
}


@pytest.mark.parametrize("what", IMAGES)
def test_image_size_from_the_header_is_what_pillow_reads(tmp_path, what):
    data = IMAGES[what]()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    assert sf.image_size(data[: sf.HEADER_BYTES]) == (h, w)
    (tmp_path / "x").write_bytes(data)
    assert sf.read_image_size(tmp_path / "x") == (h, w)


def test_big_endian_tiff_and_top_down_bmp():
    le = _image("TIFF", 12, 34)
    ifd = struct.unpack("<I", le[4:8])[0]
    n = struct.unpack("<H", le[ifd : ifd + 2])[0]
    entries = [struct.unpack("<HHII", le[ifd + 2 + 12 * k : ifd + 14 + 12 * k]) for k in range(n)]
    be = (
        b"MM\x00*"
        + struct.pack(">I", 8)
        + struct.pack(">H", 2)
        + b"".join(struct.pack(">HHIHH", tag, 3, 1, v, 0) for tag, _, _, v in entries if tag in (256, 257))
    )
    assert sf.image_size(be) == (34, 12)
    bmp = bytearray(_image("BMP", 6, 9))
    bmp[22:26] = struct.pack("<i", -9)  # rows stored top-down
    assert sf.image_size(bytes(bmp)) == (9, 6)


def test_a_jpeg_frame_header_past_the_first_64_kib_is_found_within_1_mib(tmp_path, monkeypatch):
    data = _image("JPEG", 19, 11, exif=_exif(65_000))
    data = data[:2] + b"\xff\xe2\xff\xf0" + bytes(0xFFF0 - 2) + data[2:]  # another ~64 KiB segment
    assert data.index(b"\xff\xc0") > sf.HEADER_BYTES
    assert sf.image_size(data[: sf.HEADER_BYTES]) is None
    (tmp_path / "x.jpg").write_bytes(data)
    assert sf.read_image_size(tmp_path / "x.jpg") == (11, 19)

    # a JPEG without a frame header: reading stops at JPEG_HEADER_BYTES, not at the end of the file
    (tmp_path / "endless.jpg").write_bytes(b"\xff\xd8" + b"\xff" * (20 * 1024 * 1024))
    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def read(self, n=-1):
            b = self.f.read(n)
            read.append(len(b))
            return b

    monkeypatch.setattr(sf, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    assert sf.read_image_size(tmp_path / "endless.jpg") is None
    assert sum(read) == sf.JPEG_HEADER_BYTES


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"not an image",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a\x01",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
        b"\xff\xd8\xff\xd9",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"II*\x00\xff\xff\xff\x00",
        b"BM",
        b"%!PS-Adobe-3.0 EPSF-3.0\n",
        b"%PDF-1.4\n",
    ],
)
def test_unknown_or_cut_short_headers_have_no_size(head):
    assert sf.image_size(head) is None


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return sf.PNG_SIGNATURE + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def test_empty_and_bomb_sizes_are_unknown():
    assert sf.image_size(_png_header(0, 5)) is None
    assert sf.image_size(_png_header(20000, 20000)) is None  # 400 Mpx: what Pillow refuses
    assert sf.image_size(_png_header(13000, 13000)) == (13000, 13000)  # 169 Mpx: Pillow opens it


def test_empty_meta_annotation_and_dump_are_the_sdks():
    assert sf.empty_meta() == {"classes": [], "tags": [], "projectType": "images"}
    sf.empty_meta()["classes"].append("x")
    assert sf.empty_meta()["classes"] == []  # a fresh one each time
    assert sf.empty_ann(3, 4) == {
        "description": "",
        "size": {"height": 3, "width": 4},
        "tags": [],
        "objects": [],
        "customBigData": {},
    }
    assert sf.empty_ann(None, None)["size"] == {"height": None, "width": None}
    # supervisely.io.json.dump_json_file: json.dump(data, f, indent=4): ASCII escapes, no newline at the end
    text = sf.dumps({"description": "caf\u00e9", "size": {"height": 1, "width": 2}})
    assert (
        text == '{\n    "description": "caf\\u00e9",\n    "size": {\n        "height": 1,\n        "width": 2\n    }\n}'
    )
    assert (sf.META_FILE, sf.IMG_DIR, sf.ANN_DIR, sf.ann_name("a.png")) == ("meta.json", "img", "ann", "a.png.json")
    assert sf.is_image_name("X.JPG") and not sf.is_image_name("notes.txt")
    sf.check_meta(sf.empty_meta())
    sf.check_ann(sf.empty_ann(3, 4), sf.check_meta(sf.empty_meta()), "item")


# --- the checks ---

META = {
    "classes": [
        {"title": "car", "shape": "rectangle", "color": "#FF0000"},
        {"title": "sky", "shape": "bitmap", "color": "#0000FF"},
    ],
    "tags": [{"name": "weather", "value_type": "oneof_string", "values": ["sunny", "rain"]}],
}


def _mask_png(w: int, h: int) -> bytes:
    im = Image.new("P", (w, h), 1)
    im.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def _ann(png: bytes | None = None, zlibbed: bool = True, **over) -> dict:
    png = _mask_png(8, 5) if png is None else png
    data = base64.b64encode(zlib.compress(png) if zlibbed else png).decode()
    ann = {
        "size": {"height": 40, "width": 60},
        "tags": [{"name": "weather", "value": "sunny"}],
        "objects": [
            {"classTitle": "car", "tags": [], "points": {"exterior": [[1, 2], [30, 20]], "interior": []}},
            {"classTitle": "sky", "geometryType": "bitmap", "tags": [], "bitmap": {"data": data, "origin": [3, 4]}},
        ],
    }
    return {**ann, **over}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_good_meta_and_annotation_pass():
    meta = sf.check_meta(META)
    assert meta.classes == {"car": "rectangle", "sky": "bitmap"}
    assert meta.tags == {"weather": ("oneof_string", frozenset({"sunny", "rain"}))}
    sf.check_ann(_ann(), meta, "dataset ds0, item a.png")
    sf.check_ann(_ann(zlibbed=False), meta, "item")  # a bare PNG is read too


GOOD = _mask_png(8, 5)
BAD_META = [
    ({"classes": 3}, "meta: classes must be a list"),
    (
        {"classes": [{"title": "car", "shape": "blob", "color": "#FF0000"}]},
        "meta: class 'car': shape 'blob' is not one of",
    ),
    ({"classes": [{"title": "car", "shape": "rectangle", "color": "red"}]}, "meta: class 'car': color 'red' is not"),
    (
        {"classes": [], "tags": [{"name": "w", "value_type": "oneof_string", "values": []}]},
        "meta: tag 'w': a oneof_string tag needs 'values'",
    ),
    (
        {"classes": [], "tags": [{"name": "w", "value_type": "none"}], "tags_images": [{"name": "x"}]},
        "meta: has both 'tags' and the legacy",
    ),
    ({"classes": [], "x": float("inf")}, "meta: the number inf is not allowed"),
]


@pytest.mark.parametrize("meta, words", BAD_META)
def test_bad_metas_are_refused_naming_the_place(meta, words):
    with pytest.raises(sf.BadFormat) as e:
        sf.check_meta(meta)
    assert e.value.code == "bad_meta" or "number" in words
    assert str(e.value).startswith(words), str(e.value)
    with pytest.raises(sf.BadFormat, match=r"^meta\.json: "):
        sf.check_meta(meta, "meta.json")


BAD_ANN = [
    (_ann(size={"height": 0, "width": 60}), "item: the annotation's size must be"),
    (_ann(tags=[{"name": "weather", "value": "snow"}]), "item: tag 1 ('weather', oneof_string) cannot have the value"),
    (_ann(tags=[{"name": "season"}]), "item: tag 1 'season' is not a tag of the meta"),
    (_ann(objects=[{"classTitle": "dog", "tags": []}]), "item, object 1: classTitle 'dog' is not a class"),
    (
        _ann(objects=[{"classTitle": "car", "tags": [], "points": {"exterior": [[1, 2]], "interior": []}}]),
        "item, object 1: a rectangle needs exactly 2 exterior points",
    ),
    (
        _ann(objects=[{"classTitle": "car", "points": {"exterior": [[1, 2], [3, 4]], "interior": []}}]),
        "item, object 1: a 'tags' list is required",
    ),
    (
        _ann(objects=[{"classTitle": "car", "tags": [], "points": {"exterior": [[1, 2], [3, 1e10]], "interior": []}}]),
        "item, object 1: exterior has [3, 10000000000.0]; coordinates must be finite",
    ),
    (_ann(png=_mask_png(61, 5)), "item, object 2: bitmap PNG is 61x5, larger than its image (60x40)"),
    (_ann(png=b"GIF89a...."), "item, object 2: bitmap data does not hold a PNG"),
    (_ann(png=GOOD[:-20]), "item, object 2: bitmap PNG is damaged (chunk"),
    (
        _ann(png=GOOD[:-13] + bytes([GOOD[-13] ^ 1]) + GOOD[-12:]),
        "item, object 2: bitmap PNG is damaged (bad CRC in its IDAT chunk)",
    ),
    (_ann(png=GOOD[:33] + _chunk(b"IEND", b"")), "item, object 2: bitmap PNG is damaged (it has no IDAT chunk)"),
    (_ann(png=GOOD[:24] + b"\x07" + GOOD[25:]), "item, object 2: bitmap PNG is damaged (IHDR: bit depth 7"),
    (
        _ann(png=GOOD[:33] + _chunk(b"IHDR", GOOD[16:29]) + GOOD[33:]),
        "item, object 2: bitmap PNG is damaged (IHDR is not",
    ),
    (_ann(png=GOOD[:33] + _chunk(b"t\x00Xt", b"") + GOOD[33:]), "item, object 2: bitmap PNG is damaged (chunk"),
]


@pytest.mark.parametrize("ann, words", BAD_ANN, ids=[w[:70] for _, w in BAD_ANN])
def test_bad_annotations_are_refused_naming_the_place(ann, words):
    with pytest.raises(sf.BadFormat) as e:
        sf.check_ann(ann, sf.check_meta(META), "item")
    assert e.value.code == "bad_annotation" and str(e.value).startswith(words), str(e.value)
    assert e.value.where.startswith("item") and str(e.value) == f"{e.value.where}: {e.value.msg}"


def _pillow_refuses(png: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
            im.verify()
    except Exception:
        return True
    return False


def test_every_png_pillow_refuses_is_refused_without_pillow():
    """The check used to be Pillow's verify(); the standard-library one refuses the same: every
    single-byte change of a bitmap's PNG that Pillow finds is found here too, and no other."""
    meta = sf.check_meta(META)
    pillow_refused = 0
    for i in range(len(GOOD)):
        for flip in (0x01, 0x80):
            png = GOOD[:i] + bytes([GOOD[i] ^ flip]) + GOOD[i + 1 :]
            try:
                sf.check_ann(_ann(png=png, zlibbed=False), meta, "item")
                refused = False
            except sf.BadFormat:
                refused = True
            assert refused == _pillow_refuses(png), (i, flip)
            pillow_refused += refused
    assert pillow_refused > len(GOOD)


def test_bitmaps_share_one_budget_per_request():
    meta = sf.check_meta(META)
    budget = sf.Budget(mask_bytes=3 * len(GOOD))
    for _ in range(3):
        sf.check_ann(_ann(), meta, "item", budget)
    with pytest.raises(sf.BadFormat, match="the bitmaps of this request inflate to more than"):
        sf.check_ann(_ann(), meta, "item", budget)
