"""Task images the tests build from the local busybox image: shell scripts in /bin, no registry."""

from __future__ import annotations

import io
import tarfile


def build_script_image(docker_client, base: str, tag: str, scripts: dict[str, str]) -> str:
    """`tag` = `base` + each script at /bin/<name> (mode 755); returns the tag."""
    return build_image(docker_client, tag, f"FROM {base}\nCOPY *.sh /bin/\nRUN chmod 755 /bin/*.sh\n", scripts)


def build_image(docker_client, tag: str, dockerfile: str, files: dict[str, str]) -> str:
    """Build `tag` from a Dockerfile and text files (each mode 755) in the build context; returns the tag."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in {"Dockerfile": dockerfile, **files}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    docker_client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, forcerm=True)
    return tag
