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
        files = {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
                 "etc/group": b"root:x:0:\nnogroup:x:65534:\n"}
        files.update(extra_files or {})
        for name, data in files.items():
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ensure_busybox_image(client=None, tag: str = BUSYBOX_IMAGE, rebuild: bool = False) -> str:
    """Import the busybox image under `tag` unless it is already there; return the tag."""
    import docker  # imported here so the module loads on machines without the SDK

    client = client or docker.from_env()
    if not rebuild:
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
    repo, _, version = tag.partition(":")
    client.api.import_image_from_data(busybox_rootfs_tar(), repository=repo, tag=version or "latest",
                                      changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]'])
    client.images.get(tag)
    return tag


if __name__ == "__main__":
    print(ensure_busybox_image())
