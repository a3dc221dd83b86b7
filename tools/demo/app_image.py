"""The demo App's image: this machine's Python interpreter and its standard library (no pip, no
site-packages), busybox, and tools/demo/app/ at /app, imported into Docker with no registry.

Tagged `sly-demo/app:<hash of the App's sources>`, so an edited App gets a new image and a
re-run reuses the old one. The interpreter keeps its absolute prefix (its RUNPATH points there);
/usr/local/bin/python3 links to it. About 50 MB (the static library and the build config that
the standard library carries are left out).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile

from tools.images import _SKIP_STDLIB, _docker_client, _have_image, _import_rootfs, _shared_libs, busybox_rootfs_tar

APP_IMAGE_REPO = "sly-demo/app"
APP_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app")
APP_COMMAND = ["python3", "-u", "/app/export_project.py"]


def app_image_tag(src: str = APP_SRC) -> str:
    """`sly-demo/app:<12 hex of the sources' and the interpreter's hash>`."""
    h = hashlib.sha256(sys.version.encode() + b"\0")
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(".py") and os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return f"{APP_IMAGE_REPO}:{h.hexdigest()[:12]}"


def _skip(stdlib_name: str) -> bool:
    # config-3.11-*: the static libpython and the build's makefiles, which only C builds need.
    return stdlib_name in _SKIP_STDLIB or stdlib_name.startswith("config-")


def write_rootfs(out, src: str = APP_SRC) -> None:
    """Write the image's rootfs as a tar stream to the binary file object `out`."""
    prefix = sys.base_prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = os.path.join(prefix, "lib", version)
    interpreter = os.path.realpath(os.path.join(prefix, "bin", version))
    dynload = os.path.join(stdlib, "lib-dynload")
    elves = [interpreter] + [os.path.join(dynload, f) for f in os.listdir(dynload) if f.endswith(".so")]
    no_cache = lambda ti: None if "__pycache__" in ti.name else ti  # noqa: E731
    with tarfile.open(fileobj=out, mode="w|") as tar:
        base = tarfile.open(fileobj=io.BytesIO(busybox_rootfs_tar()))
        for member in base.getmembers():
            tar.addfile(member, base.extractfile(member) if member.isfile() else None)
        for lib in sorted(_shared_libs(elves)):
            if not lib.startswith(prefix + "/"):
                tar.add(os.path.realpath(lib), arcname=lib.lstrip("/"))
        tar.add(interpreter, arcname=os.path.join(prefix, "bin", version).lstrip("/"))
        for name in os.listdir(os.path.join(prefix, "lib")):
            if name.startswith("libpython"):
                path = os.path.join(prefix, "lib", name)
                tar.add(path, arcname=path.lstrip("/"))
        for name in sorted(os.listdir(stdlib)):
            if not _skip(name):
                tar.add(os.path.join(stdlib, name), arcname=os.path.join(stdlib, name).lstrip("/"), filter=no_cache)
        for d in ("usr", "usr/local", "usr/local/bin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for link in ("python3", "python"):
            info = tarfile.TarInfo(f"usr/local/bin/{link}")
            info.type, info.linkname = tarfile.SYMTYPE, os.path.join(prefix, "bin", version)
            tar.addfile(info)
        tar.add(src, arcname="app", filter=no_cache)


def ensure_demo_app_image(client=None, rebuild: bool = False) -> str:
    """Import the demo App's image unless its tag exists; return the tag."""
    client = _docker_client(client)
    tag = app_image_tag()
    if not rebuild and _have_image(client, tag):
        return tag
    buf = io.BytesIO()
    write_rootfs(buf)
    return _import_rootfs(
        client, tag, buf.getvalue(), ["ENV PATH=/usr/local/bin:/bin", "ENV LANG=C.UTF-8", "WORKDIR /app"]
    )
