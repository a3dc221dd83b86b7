"""Build tiny task images locally, with no registry: a busybox-static rootfs imported into Docker.

`ensure_busybox_image()` is used by the tests, the benchmarks and the demo. The rootfs is
Debian's static `/bin/busybox` plus one symlink per applet, tarred in memory and fed to
`docker import` through the Engine API.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

BUSYBOX_IMAGE = "sly-test/busybox:latest"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def _find_busybox() -> str:
    for path in BUSYBOX_CANDIDATES:
        if shutil.which(path):
            return path
    raise RuntimeError("busybox-static is not installed (apt-get install busybox-static)")


def busybox_rootfs_tar(extra_files: dict[str, bytes] | None = None) -> bytes:
    """A tar of a minimal rootfs: /bin/busybox, its applets, /tmp, /etc/passwd, extra files."""
    busybox = _find_busybox()
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "etc", "sly_task_data"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        files = {
            "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
            "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        }
        files.update(extra_files or {})
        for name, data in files.items():
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _docker_client(client=None):
    import docker  # imported here so the module loads on machines without the SDK

    return client or docker.from_env()


def _have_image(client, tag: str) -> bool:
    import docker

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _import_rootfs(client, tag: str, rootfs, changes: list[str]) -> str:
    """`docker import` a rootfs tar (bytes or a binary file object) under `tag`; return the tag."""
    repo, _, version = tag.partition(":")
    client.api.import_image_from_data(rootfs, repository=repo, tag=version or "latest", changes=changes)
    client.images.get(tag)
    return tag


def ensure_busybox_image(client=None, tag: str = BUSYBOX_IMAGE, rebuild: bool = False) -> str:
    """Import the busybox image under `tag` unless it is already there; return the tag."""
    client = _docker_client(client)
    if not rebuild and _have_image(client, tag):
        return tag
    return _import_rootfs(client, tag, busybox_rootfs_tar(), ["ENV PATH=/bin", 'CMD ["/bin/sh"]'])


DEMO_TRAIN_IMAGE = "sly-demo/train:latest"


def ensure_demo_train_image(client=None, tag: str = DEMO_TRAIN_IMAGE, rebuild: bool = False) -> str:
    """The busybox image with the demo's train script (tools/demo/train.sh) as its command."""
    import os

    client = _docker_client(client)
    if not rebuild and _have_image(client, tag):
        return tag
    with open(os.path.join(os.path.dirname(__file__), "demo", "train.sh"), "rb") as f:
        script = f.read()
    return _import_rootfs(
        client, tag, busybox_rootfs_tar({"bin/sly-train": script}), ["ENV PATH=/bin", 'CMD ["/bin/sly-train"]']
    )


DEMO_IMAGE_REPO = "sly-demo/tasks"
DEMO_SCRIPTS = ("train.sh", "inference.sh")


def demo_image_tag() -> str:
    """`sly-demo/tasks:<hash of the scripts>`: an edited script makes a new tag, a re-run reuses the old."""
    import hashlib
    import os

    h = hashlib.sha256()
    for name in DEMO_SCRIPTS:
        with open(os.path.join(os.path.dirname(__file__), "demo", "task", name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return f"{DEMO_IMAGE_REPO}:{h.hexdigest()[:12]}"


def ensure_demo_image(client=None, rebuild: bool = False) -> str:
    """The demo's task image: busybox with /workdir/src/train.sh and inference.sh (tools/demo/task/).

    The scripts sit where the real agent's entry points (`/workdir/src/train.py`, ...) do; tasks
    run them with an explicit command (`sh /workdir/src/train.sh`), since the image has no Python.
    """
    import os

    client = _docker_client(client)
    tag = demo_image_tag()
    if not rebuild and _have_image(client, tag):
        return tag
    files = {}
    for name in DEMO_SCRIPTS:
        with open(os.path.join(os.path.dirname(__file__), "demo", "task", name), "rb") as f:
            files[f"workdir/src/{name}"] = f.read()
    return _import_rootfs(client, tag, busybox_rootfs_tar(files), ["ENV PATH=/bin", "WORKDIR /workdir"])


# --- a Python base image made from this machine's own interpreter (for the agent image) ---

PYTHON_BASE_IMAGE = "sly-local/python-base:3.11"
_SKIP_STDLIB = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "ensurepip",
    "__phello__",
}


def _shared_libs(paths: list[str]) -> set[str]:
    """Every shared library (and the loader) that the given ELF files need, per ldd."""
    import re

    libs: set[str] = set()
    for path in paths:
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def build_python_base(
    client=None, tag: str = PYTHON_BASE_IMAGE, requirements: str | None = None, rebuild: bool = False
) -> str:
    """Import an image holding this interpreter, its stdlib, busybox and `requirements` installed.

    Used where no registry is reachable: `docker build --build-arg BASE=<tag> .` then finds every
    requirement already satisfied and needs no network. The interpreter keeps its absolute
    prefix (its RUNPATH points there) and /usr/local/bin/python3 links to it.
    """
    import os
    import sys
    import tempfile

    client = _docker_client(client)
    if not rebuild and _have_image(client, tag):
        return tag
    prefix = sys.base_prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = os.path.join(prefix, "lib", version)
    with tempfile.TemporaryDirectory(prefix="sly-pybase-") as tmp:
        site = os.path.join(tmp, "site-packages")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", site, "pip"]
        if requirements:
            cmd += ["-r", requirements]
        subprocess.run(cmd, check=True)
        libs = _shared_libs(_python_elves(stdlib, site))
        tar_path = os.path.join(tmp, "rootfs.tar")
        _write_python_rootfs(tar_path, prefix, version, site, libs)
        with open(tar_path, "rb") as f:
            return _import_rootfs(
                client, tag, f, ["ENV PATH=/usr/local/bin:/bin", "ENV LANG=C.UTF-8", 'CMD ["python3"]']
            )


def _python_elves(stdlib: str, site: str) -> list[str]:
    """The ELF files whose shared libraries the image needs: the interpreter and the .so files of
    its stdlib and of `site`."""
    import os
    import sys

    elves = [os.path.realpath(sys.executable)]
    for root, _, files in os.walk(stdlib):
        elves += [os.path.join(root, f) for f in files if f.endswith(".so")]
    for root, _, files in os.walk(site):
        elves += [os.path.join(root, f) for f in files if ".so" in f]
    return elves


def _write_python_rootfs(tar_path: str, prefix: str, version: str, site: str, libs: set[str]) -> None:
    """Write the rootfs tar of the Python base image: busybox, `libs` (those outside the prefix),
    the interpreter with its stdlib under its own prefix, `site` as its site-packages, the
    /usr/local/bin links and the CA certificates."""
    import os

    stdlib = os.path.join(prefix, "lib", version)
    with tarfile.open(tar_path, "w") as tar:
        base = tarfile.open(fileobj=io.BytesIO(busybox_rootfs_tar()))
        for member in base.getmembers():
            tar.addfile(member, base.extractfile(member) if member.isfile() else None)
        for lib in sorted(libs):
            if not lib.startswith(prefix + "/"):  # the prefix's own libs are added below
                tar.add(os.path.realpath(lib), arcname=lib.lstrip("/"))
        bindir = os.path.join(prefix, "bin")
        for name in os.listdir(bindir):
            if name.startswith("python"):
                tar.add(os.path.join(bindir, name), arcname=os.path.join(bindir, name).lstrip("/"))
        for name in os.listdir(os.path.join(prefix, "lib")):
            if name.startswith("libpython"):
                p = os.path.join(prefix, "lib", name)
                tar.add(p, arcname=p.lstrip("/"))
        for name in os.listdir(stdlib):
            if name in _SKIP_STDLIB:
                continue
            tar.add(
                os.path.join(stdlib, name),
                arcname=os.path.join(stdlib, name).lstrip("/"),
                filter=lambda ti: None if "__pycache__" in ti.name else ti,
            )
        tar.add(
            site,
            arcname=os.path.join(stdlib, "site-packages").lstrip("/"),
            filter=lambda ti: None if "__pycache__" in ti.name else ti,
        )
        for link in ("python3", "python"):
            info = tarfile.TarInfo(f"usr/local/bin/{link}")
            info.type = tarfile.SYMTYPE
            info.linkname = os.path.join(prefix, "bin", version)
            tar.addfile(info)
        if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
            tar.add("/etc/ssl/certs/ca-certificates.crt", arcname="etc/ssl/certs/ca-certificates.crt")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tools.images", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--python-base",
        action="store_true",
        help=f"build {PYTHON_BASE_IMAGE} from this interpreter with requirements-agent.txt",
    )
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)
    print(ensure_busybox_image(rebuild=args.rebuild))
    if args.python_base:
        import os

        req = os.path.join(os.path.dirname(__file__), "..", "requirements-agent.txt")
        print(build_python_base(requirements=os.path.normpath(req), rebuild=args.rebuild))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
