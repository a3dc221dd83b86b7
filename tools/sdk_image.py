"""Build the real Supervisely SDK into local Docker images, with no registry.

    python -m tools.sdk_image [--plugin] [--apps] [--rebuild] [--check]

Three images, all cached by the pinned SDK version:

- `sly-test/supervisely-sdk:<version>`: `pip install --target SITE supervisely==<version>`
  (SITE is kept under the cache directory, so a second run skips pip), then a rootfs made from
  this machine's own interpreter: its prefix kept as is (its RUNPATH points there), its
  standard library, SITE as its site-packages, every shared library that `ldd` names for the
  interpreter and for the `.so` files of both, busybox for a shell, and libmagic with its
  database (python-magic loads it with ctypes, so ldd never names it and `import supervisely`
  fails without it). The rootfs is streamed into `docker import`. No CMD, like the images of
  legacy Supervisely NN plugins.
- `sly-test/sdk-plugin:<version>`: the SDK image plus tests/sdk/plugin/src at /workdir/src (the
  legacy plugin layout), built FROM the SDK image. Rebuilt when the sources change (their
  hash is a label on the image).
- `sly-test/sdk-apps:<version>`: the SDK image plus tests/sdk/apps (headless Supervisely Apps,
  one folder each) at /app, built the same way. No CMD: an `app` task names the App's script
  (`python -u /app/export_project/main.py`). SLY_APP_DATA_DIR (where `sly.app.get_data_dir()`
  puts an App's files) defaults to /tmp/app-data, writable also under a read-only root.

The cache directory is $SLY_CI_CACHE, else /var/cache/sly-ci when writable, else
~/.cache/sly-ci; CI keeps it between runs keyed by the version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time

from tools.images import _SKIP_STDLIB, _docker_client, _have_image, _shared_libs, busybox_rootfs_tar

SDK_VERSION = "6.74.51"
SDK_IMAGE = f"sly-test/supervisely-sdk:{SDK_VERSION}"
PLUGIN_IMAGE = f"sly-test/sdk-plugin:{SDK_VERSION}"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_SRC = os.path.join(REPO, "tests", "sdk", "plugin", "src")
APPS_IMAGE = f"sly-test/sdk-apps:{SDK_VERSION}"
APPS_SRC = os.path.join(REPO, "tests", "sdk", "apps")
SRC_HASH_LABEL = "sly-test.plugin-src-sha256"

# python-magic finds libmagic with ctypes and libmagic reads its compiled database from its
# default path, /usr/share/misc/magic.mgc (on Debian a link to /usr/lib/file/magic.mgc).
LIBMAGIC = ("/usr/lib/x86_64-linux-gnu/libmagic.so.1", "/lib/x86_64-linux-gnu/libmagic.so.1")
MAGIC_FILES = ("/usr/lib/file/magic.mgc", "/usr/share/misc/magic.mgc", "/etc/magic")
IMAGE_ENV = ["ENV PATH=/usr/local/bin:/usr/bin:/bin", "ENV LANG=C.UTF-8"]


class BuildError(RuntimeError):
    """The image could not be built; the message says which step failed and why."""


class SiteUnavailable(BuildError):
    """pip could not install the SDK (most often: no route to PyPI)."""


def cache_dir() -> str:
    """Where pip's SITE folders are kept between runs."""
    env = os.environ.get("SLY_CI_CACHE")
    if env:
        return env
    system = "/var/cache/sly-ci"
    try:
        os.makedirs(system, exist_ok=True)
        if os.access(system, os.W_OK):
            return system
    except OSError:
        pass
    return os.path.join(os.path.expanduser("~"), ".cache", "sly-ci")


@contextlib.contextmanager
def _exclusive(path: str):
    """Hold an exclusive flock on `path` (made if missing): test workers in parallel (pytest-xdist)
    wait for the one that installs or builds instead of doing it too, into the same folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_site(version: str = SDK_VERSION, cache: str | None = None, log=print) -> str:
    """`pip install --target` the SDK into CACHE/supervisely-<version>/site unless it is there
    (one process at a time; the others wait and find it)."""
    root = os.path.join(cache or cache_dir(), f"supervisely-{version}")
    site = os.path.join(root, "site")
    if os.path.isdir(os.path.join(site, "supervisely")):
        log(f"sdk_image: pip SITE cached at {site}")
        return site
    with _exclusive(root + ".lock"):
        if os.path.isdir(os.path.join(site, "supervisely")):
            return site
        return _install_site(version, root, site, log)


def _install_site(version: str, root: str, site: str, log) -> str:
    partial = os.path.join(root, "site.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    log(f"sdk_image: pip install supervisely=={version} into {partial} (a few minutes, ~825 MB)")
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
            partial,
            f"supervisely=={version}",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "is ignored" not in line]
        tail = "\n".join(line if len(line) < 300 else line[:300] + " ..." for line in lines[-8:])
        raise SiteUnavailable(f"pip install supervisely=={version} failed (exit {proc.returncode}):\n{tail}")
    # A rename is atomic, so an interrupted install never looks like a cached one.
    os.rename(partial, site)
    log(f"sdk_image: pip install took {time.monotonic() - t0:.0f} s")
    return site


def _keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # Plain .pyc files stay (they halve `import supervisely`: 13 s vs 26 s measured); optimised ones go.
    return None if info.name.endswith((".opt-1.pyc", ".opt-2.pyc")) else info


def _elf_files(*dirs: str) -> list[str]:
    out = []
    for d in dirs:
        for root, _, files in os.walk(d):
            out += [os.path.join(root, f) for f in files if ".so" in f and not f.endswith((".py", ".pyc"))]
    return out


def _needed_libs(prefix: str, version: str, site: str, log=print) -> set[str]:
    """The shared libraries the image needs (per ldd over the interpreter, libmagic and the .so
    files of lib-dynload and `site`), libmagic itself included; BuildError without libmagic."""
    stdlib = os.path.join(prefix, "lib", version)
    libmagic = next((p for p in LIBMAGIC if os.path.exists(p)), None)
    if libmagic is None or not os.path.exists(MAGIC_FILES[0]):
        raise BuildError(
            "libmagic is not installed here (apt-get install libmagic1); "
            "python-magic, and so `import supervisely`, needs it"
        )
    interpreter = os.path.realpath(
        sys.executable if sys.prefix == sys.base_prefix else os.path.join(prefix, "bin", version)
    )
    elves = [interpreter, libmagic] + _elf_files(os.path.join(stdlib, "lib-dynload"), site)
    log(f"sdk_image: ldd over {len(elves)} ELF files")
    libs = {lib for lib in _shared_libs(elves) if not lib.startswith(site + "/")}
    libs.add(libmagic)
    return libs


def write_rootfs(out, site: str, log=print) -> None:
    """Write the SDK image's rootfs as a tar stream to the binary file object `out`."""
    prefix = sys.base_prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = os.path.join(prefix, "lib", version)
    libs = _needed_libs(prefix, version, site, log)
    added: set[str] = set()

    with tarfile.open(fileobj=out, mode="w|") as tar:

        def add(path: str, arcname: str | None = None, **kw) -> None:
            arc = (arcname or path).lstrip("/")
            if arc not in added:
                added.add(arc)
                tar.add(path, arcname=arc, **kw)

        _add_base(tar, added)
        for lib in sorted(libs):
            if not lib.startswith(prefix + "/"):
                # The path ldd names may be a link (libz.so.1 -> libz.so.1.2.13): store the
                # file's bytes under the name the loader asks for.
                add(os.path.realpath(lib), lib)
        for path in MAGIC_FILES:
            if os.path.lexists(path):
                add(path)  # links stay links; their targets are in this list too
        bindir = os.path.join(prefix, "bin")
        for name in os.listdir(bindir):
            if name.startswith("python"):
                add(os.path.join(bindir, name))
        for name in os.listdir(os.path.join(prefix, "lib")):
            if name.startswith("libpython"):
                add(os.path.join(prefix, "lib", name))
        for name in sorted(os.listdir(stdlib)):
            if name not in _SKIP_STDLIB:
                add(os.path.join(stdlib, name), filter=_keep)
        log("sdk_image: adding site-packages (~825 MB)")
        add(site, os.path.join(stdlib, "site-packages"), filter=_keep)
        for link in ("python3", "python"):
            info = tarfile.TarInfo(f"usr/local/bin/{link}")
            info.type, info.linkname = tarfile.SYMTYPE, os.path.join(bindir, version)
            tar.addfile(info)
        if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
            add("/etc/ssl/certs/ca-certificates.crt")


def _add_base(tar: tarfile.TarFile, added: set[str]) -> None:
    """Busybox's rootfs and the empty directories the image needs, their names put in `added`."""
    base = tarfile.open(fileobj=io.BytesIO(busybox_rootfs_tar()))
    for member in base.getmembers():
        added.add(member.name)
        tar.addfile(member, base.extractfile(member) if member.isfile() else None)
    for d in ("usr", "usr/local", "usr/local/bin", "workdir"):
        info = tarfile.TarInfo(d)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        added.add(d)
        tar.addfile(info)


def import_rootfs(tag: str, site: str, log=print) -> None:
    """Stream the rootfs into `docker import` (no 800 MB temporary tar on disk)."""
    cmd = ["docker", "import"]
    for change in IMAGE_ENV + ["WORKDIR /workdir"]:
        cmd += ["--change", change]
    import tempfile

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd + ["-", tag], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            with proc.stdin:
                write_rootfs(proc.stdin, site, log)
        except BrokenPipeError:
            pass  # docker import gave up; its exit status and stderr say why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.wait() != 0:
            err.seek(0)
            raise BuildError(
                f"docker import {tag} failed (exit {proc.returncode}): {err.read().decode(errors='replace')[-2000:]}"
            )


def check_sdk(tag: str = SDK_IMAGE) -> float:
    """Run `import supervisely` in the image; return how long it took (seconds)."""
    t0 = time.monotonic()
    proc = subprocess.run(
        ["docker", "run", "--rm", tag, "python3", "-c", "import supervisely, magic; print(supervisely.__version__)"],
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise BuildError(f"`import supervisely` fails in {tag}:\n{proc.stderr[-3000:]}")
    return took


def ensure_sdk_image(
    client=None,
    version: str = SDK_VERSION,
    tag: str | None = None,
    rebuild: bool = False,
    check: bool = True,
    log=print,
) -> str:
    """Build the SDK image unless an image with its tag exists; return the tag."""
    client = _docker_client(client)
    tag = tag or f"sly-test/supervisely-sdk:{version}"
    if not rebuild and _have_image(client, tag):
        log(f"sdk_image: {tag} exists")
        return tag
    site = ensure_site(version, log=log)
    with _exclusive(os.path.join(cache_dir(), f"supervisely-{version}.image.lock")):
        if not rebuild and _have_image(client, tag):
            return tag  # another process built it while this one waited
        return _build_sdk_image(client, tag, site, check, log)


def _build_sdk_image(client, tag: str, site: str, check: bool, log) -> str:
    old = client.images.get(tag).id if _have_image(client, tag) else None
    t0 = time.monotonic()
    log(f"sdk_image: building the rootfs and importing it as {tag}")
    import_rootfs(tag, site, log)
    size = client.images.get(tag).attrs.get("Size", 0)
    log(f"sdk_image: imported {tag} ({size / 1e6:.0f} MB) in {time.monotonic() - t0:.0f} s")
    if check:
        try:
            log(f"sdk_image: `import supervisely` inside takes {check_sdk(tag):.1f} s")
        except BuildError:
            client.images.remove(tag, force=True)  # a broken image must not count as cached
            raise
    # The old image is ~1 GB; while the old plugin image is built on it, it goes with that one.
    _remove_replaced(client, tag, old)
    return tag


def plugin_src_hash(src: str = PLUGIN_SRC, base_id: str = "") -> str:
    """sha256 over the base image's id and the plugin's file names and contents."""
    h = hashlib.sha256(base_id.encode() + b"\0")
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, src).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def ensure_plugin_image(
    client=None, src: str = PLUGIN_SRC, base: str = SDK_IMAGE, tag: str = PLUGIN_IMAGE, rebuild: bool = False, log=print
) -> str:
    """Build `tag` FROM `base` with `src` at /workdir/src, no CMD.

    Skipped when an image with this tag was built from the same base image and sources.
    """
    return _ensure_derived_image(
        client,
        src,
        base,
        tag,
        "COPY src /workdir/src\nENV PYTHONPATH=/workdir:/workdir/src\nWORKDIR /workdir/src\n",
        rebuild,
        log,
    )


def ensure_apps_image(
    client=None, src: str = APPS_SRC, base: str = SDK_IMAGE, tag: str = APPS_IMAGE, rebuild: bool = False, log=print
) -> str:
    """Build `tag` FROM `base` with `src` (the Apps' folders) at /app, no CMD.

    Skipped when an image with this tag was built from the same base image and sources.
    """
    return _ensure_derived_image(
        client,
        src,
        base,
        tag,
        "COPY src /app\nENV SLY_APP_DATA_DIR=/tmp/app-data\nWORKDIR /app\n",
        rebuild,
        log,
    )


def _ensure_derived_image(client, src: str, base: str, tag: str, steps: str, rebuild: bool, log) -> str:
    """`docker build` `tag` FROM `base` with `src` in the context as `src` and the Dockerfile
    `steps`, labelled with the hash of the base image and the sources (an equal label: no build)."""
    import docker

    client = _docker_client(client)
    digest = plugin_src_hash(src, client.images.get(base).id)
    old = None
    try:
        image = client.images.get(tag)
        old = image.id
        if not rebuild and (image.labels or {}).get(SRC_HASH_LABEL) == digest:
            log(f"sdk_image: {tag} exists with these sources")
            return tag
    except docker.errors.ImageNotFound:
        pass
    dockerfile = f"FROM {base}\n{steps}LABEL {SRC_HASH_LABEL}={digest}\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(src, arcname="src", filter=lambda ti: None if "__pycache__" in ti.name else ti)
    buf.seek(0)
    try:
        client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, forcerm=True)
    except docker.errors.BuildError as e:
        raise BuildError(f"docker build {tag} failed: {e}") from e
    _remove_replaced(client, tag, old)
    log(f"sdk_image: built {tag}")
    return tag


def _remove_replaced(client, tag: str, old: str | None) -> None:
    """Remove the image that `tag` named before a rebuild (with its untagged parents)."""
    if old and old != client.images.get(tag).id:
        try:
            client.images.remove(old)
        except Exception:  # noqa: BLE001 - in use by a container or a child image: it stays
            pass


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tools.sdk_image", description=__doc__.splitlines()[0])
    ap.add_argument("--version", default=SDK_VERSION, help=f"SDK version (default {SDK_VERSION})")
    ap.add_argument("--plugin", action="store_true", help=f"also build {PLUGIN_IMAGE}")
    ap.add_argument("--apps", action="store_true", help=f"also build {APPS_IMAGE}")
    ap.add_argument("--rebuild", action="store_true", help="build even if the image exists")
    ap.add_argument("--check", action="store_true", help="time `import supervisely` in the image")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        tag = ensure_sdk_image(version=args.version, rebuild=args.rebuild, check=not args.check, log=log)
        if args.check:
            log(f"sdk_image: `import supervisely` inside takes {check_sdk(tag):.1f} s")
        if args.plugin:
            ensure_plugin_image(base=tag, tag=f"sly-test/sdk-plugin:{args.version}", rebuild=args.rebuild, log=log)
        if args.apps:
            ensure_apps_image(base=tag, tag=f"sly-test/sdk-apps:{args.version}", rebuild=args.rebuild, log=log)
    except BuildError as e:
        print(f"sdk_image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
