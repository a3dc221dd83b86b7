"""Read what a task container wrote without following its links.

A task's results/ is written by code we do not trust, possibly while we read it: a path checked
first and opened later can have become a symlink to a host file in between. So nothing here
opens a path by name from the top: a walk starts from a directory fd opened with O_NOFOLLOW,
every step is `openat(dir_fd, name, O_NOFOLLOW)`, and every opened file is checked with
`fstat` on the fd itself. What is hashed and uploaded is read from that same fd.

A symlink, fifo, socket or device is skipped (`Skipped` says why); opening uses O_NONBLOCK so
that a fifo cannot block the reader before fstat has seen what it is.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator

from protocol.names import CONTROL_RE

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


class Skipped(Exception):
    """A path under results/ that is not read; str() is the reason (`is a symlink`, ...)."""


def kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a regular file"


def _why(dir_fd: int, name: str, err: OSError) -> Skipped:
    if err.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.ENXIO, errno.EOPNOTSUPP):
        try:
            return Skipped(f"is {kind_of(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)}")
        except OSError:
            pass
    return Skipped(f"cannot be opened ({os.strerror(err.errno) if err.errno else err})")


def open_dir(path: str | os.PathLike, name: str | None = None, *, dir_fd: int | None = None) -> int:
    """A directory fd: `path` itself (its last component must not be a link), or `name` inside
    `dir_fd`. Raises Skipped when it is not a real directory, FileNotFoundError when absent."""
    target = name if dir_fd is not None else path
    try:
        fd = os.open(target, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        if dir_fd is None:
            raise Skipped(f"is {_kind_at(path)}") from None
        raise _why(dir_fd, name, e) from None
    return fd


def _kind_at(path) -> str:
    try:
        return kind_of(os.lstat(path).st_mode)
    except OSError:
        return "missing"


def open_rel_dir(root_fd: int, rel: str) -> int:
    """The directory `rel` (a/b/c) under root_fd, each component opened without following links."""
    fd = os.dup(root_fd)
    try:
        for part in _parts(rel):
            nxt = open_dir(None, part, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str):
    """A regular file `name` in dir_fd as a binary file object (checked with fstat), or Skipped."""
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _why(dir_fd, name, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Skipped(f"is {kind_of(st.st_mode)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_rel_file(root_fd: int, rel: str):
    """The regular file `rel` (a/b/f) under root_fd, no link followed on the way."""
    parts = _parts(rel)
    if len(parts) == 1:
        return open_file(root_fd, parts[0])
    d = open_rel_dir(root_fd, "/".join(parts[:-1]))
    try:
        return open_file(d, parts[-1])
    finally:
        os.close(d)


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise Skipped("is not a path inside results/")
    for p in parts:
        bad = unsendable(p)
        if bad:
            raise Skipped(bad)
    return parts


def unsendable(name: str) -> str | None:
    """Why the server would refuse `name` as part of a result's path (a control character, a
    backslash, bytes that are not UTF-8), else None: such a file is skipped, not posted, so one
    odd name cannot fail the whole result."""
    if "\\" in name:
        return "has a backslash in its name"
    if CONTROL_RE.search(name):
        return "has a control character in its name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "has a name that is not UTF-8"
    return None


def walk_files(dir_fd: int, on_skip: Callable[[str, str], None], prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every regular file under dir_fd as (relative posix path, open binary file), sorted by name.

    The caller closes each file (it may keep a few open at once). Symlinks, fifos, sockets
    and devices, files and folders alike, and names the server refuses (`unsendable`), go to
    `on_skip(rel, reason)` and are not entered."""
    try:
        with os.scandir(dir_fd) as it:
            names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    except OSError as e:
        on_skip(prefix.rstrip("/") or ".", f"cannot be listed ({e.strerror})")
        return
    for name, is_dir in names:
        rel = prefix + name
        bad = unsendable(name)
        if bad:
            on_skip(rel, bad)
            continue
        if is_dir:
            try:
                sub = open_dir(None, name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            except Skipped as s:
                on_skip(rel, str(s))
                continue
            try:
                yield from walk_files(sub, on_skip, rel + "/")
            finally:
                os.close(sub)
            continue
        try:
            f = open_file(dir_fd, name)
        except FileNotFoundError:
            continue
        except Skipped as s:
            if "a folder" in str(s):  # became a folder after the listing: walk it
                try:
                    sub = open_dir(None, name, dir_fd=dir_fd)
                except (FileNotFoundError, Skipped):
                    continue
                try:
                    yield from walk_files(sub, on_skip, rel + "/")
                finally:
                    os.close(sub)
                continue
            on_skip(rel, str(s))
            continue
        try:
            yield rel, f
        except BaseException:
            f.close()
            raise
