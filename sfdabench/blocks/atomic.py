"""Atomic file writes whose files follow the umask like ``open()`` does.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, so a file renamed into place from it
is unreadable by the group: a results dir shared by a team breaks on the second user's run. Every atomic
write of the project goes through :func:`temp_file`, which gives the temporary file the mode ``open()``
would (0666 minus the umask) before anything is written to it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. Linux exposes it read-only in /proc; elsewhere set-and-restore under a lock."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temp_file(directory: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``mkstemp`` in ``directory`` with the mode ``open()`` would give (0666 & ~umask)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def replacing(path: str | Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in its folder, renamed into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, write: Callable[[BinaryIO], object], *, fsync: bool = False) -> None:
    """Atomically write ``path`` with ``write(handle)``."""
    with replacing(path, fsync=fsync) as handle:
        write(handle)
