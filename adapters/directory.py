"""An adapter directory opened once, so that nothing outside it (or outside the allowed roots) is ever read.

Under `--adapter-root` the directory is reached by opening each path component relative to the root's
descriptor with O_NOFOLLOW: no symlink anywhere below a root is followed, and no path outside one is opened,
so there is no window between a check and the open (a rename race cannot swap a link in). Every file is then
opened relative to the directory's descriptor, O_NOFOLLOW and non-blocking (a FIFO cannot stall the reader),
must be a regular file, and is read with a size cap. Without roots (a trusted local set-up) links are
followed, as a Hugging Face cache's snapshot links need.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from deltaserve.adapters.base import AdapterAccessError, AdapterFormatError, AdapterLimitError

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 1 << 20


def within(path: str, roots: Sequence[str]) -> tuple[str, list[str]] | None:
    """(root, the components below it) of the first root that holds `path` lexically (after `..` and `.` are
    folded), or None. `roots` must be absolute and already resolved (the operator's configuration)."""
    absolute = os.path.normpath(os.path.abspath(path))
    for root in roots:
        if os.path.commonpath([absolute, root]) == root:
            below = os.path.relpath(absolute, root)
            return root, [] if below == "." else below.split(os.sep)
    return None


class AdapterDirectory:
    """A directory descriptor for one adapter; use as a context manager (the descriptor is closed on exit)."""

    def __init__(self, path: str, roots: Sequence[str] = ()) -> None:
        self.path = path  # as the caller gave it: the only form that appears in messages
        self.confined = bool(roots)
        self.fd = self._open_confined(path, roots) if roots else self._open_plain(path)

    def __enter__(self) -> AdapterDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _open_plain(self, path: str) -> int:
        try:
            return os.open(path, _DIRECTORY_FLAGS)
        except OSError:
            raise AdapterFormatError(f"adapter directory {path!r} does not exist or is not a directory") from None

    def _open_confined(self, path: str, roots: Sequence[str]) -> int:
        found = within(path, roots)
        if found is None:
            raise AdapterAccessError(f"adapter path {path!r} is outside the allowed --adapter-root directories")
        root, components = found
        fd = os.open(root, _DIRECTORY_FLAGS)
        try:
            for component in components:
                step = os.open(component, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = step
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise AdapterAccessError(
                    f"adapter path {path!r} passes through a symbolic link or a non-directory: under the allowed "
                    "--adapter-root directories every component must be a real directory"
                ) from None
            raise AdapterFormatError(f"adapter directory {path!r} does not exist or is not a directory") from None
        return fd

    def has(self, name: str) -> bool:
        """Whether an entry `name` exists (of any type: a link or a FIFO is refused when it is read)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=not self.confined)
        except OSError:
            return False
        return True

    def read(self, name: str, limit: int | None, limit_flag: str) -> bytes:
        """The whole file `name`, a regular file of at most `limit` bytes (`limit_flag` names the setting)."""
        where = f"{os.path.join(self.path, name)!r}"
        flags = _FILE_FLAGS | (os.O_NOFOLLOW if self.confined else 0)
        try:
            fd = os.open(name, flags, dir_fd=self.fd)
        except FileNotFoundError:
            raise AdapterFormatError(f"{where} is missing") from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise AdapterAccessError(
                    f"{where} is a symbolic link, which is not followed under --adapter-root"
                ) from None
            raise AdapterFormatError(f"cannot open {where}") from None
        try:
            return _read_regular(fd, where, limit, limit_flag)
        finally:
            os.close(fd)


def _read_regular(fd: int, where: str, limit: int | None, limit_flag: str) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise AdapterFormatError(f"{where} is not a regular file")
    if limit is not None and info.st_size > limit:
        raise AdapterLimitError(f"{where} is {info.st_size} bytes; the server accepts up to {limit} ({limit_flag})")
    os.set_blocking(fd, True)
    chunks, size = [], 0
    while chunk := os.read(fd, _CHUNK):
        size += len(chunk)
        if limit is not None and size > limit:  # the file grew after fstat
            raise AdapterLimitError(f"{where} is larger than {limit} bytes ({limit_flag})")
        chunks.append(chunk)
    return b"".join(chunks)
