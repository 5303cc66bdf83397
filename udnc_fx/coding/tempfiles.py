"""The hidden temporary files of atomic writes: their names, and the clean-up of ones a killed writer left.

An atomic write goes to ``.<name>.<12 hex digits>.tmp`` beside the target and is renamed over it when complete. A
writer killed in between leaves that file behind, full-size. The next write of the same target removes such
leftovers -- only files whose name matches that exact pattern for that target, only regular files (never a link),
only ones no live writer holds (each writer keeps an exclusive ``flock`` on its temp file while writing; where
``fcntl`` does not exist, Windows, an open file cannot be deleted anyway) and only ones untouched for
:data:`STALE_AFTER_S` seconds (which covers the instant between a writer creating its file and locking it).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["STALE_AFTER_S", "create_temp", "remove_stale_temps", "temp_pattern"]

#: A leftover must be at least this old (by mtime) to be removed.
STALE_AFTER_S = 2.0


def temp_pattern(base: str) -> re.Pattern[str]:
    """The names of the temp files of target file name ``base`` (no directory)."""
    return re.compile(re.escape(f".{base}.") + r"[0-9a-f]{12}\.tmp")


def create_temp(directory: str, base: str) -> tuple[int, str]:
    """Create and lock a fresh temp file for target ``base`` in ``directory``; returns ``(fd, path)``.

    The lock is released when ``fd`` is closed (or the process dies), which is what marks the file as abandoned.
    """
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            # os.open with mode 0o666 lets the umask decide the permissions, as a plain open() would.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # pragma: no cover - a file system without flock: the age rule still applies
            pass
    return fd, tmp


def _abandoned(path: str) -> bool:
    """True when no process holds ``path``'s writer lock."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live writer holds it
    finally:
        os.close(fd)  # releases our probe lock too
    return True


def remove_stale_temps(directory: str, base: str) -> list[str]:
    """Remove the abandoned temp files of target ``base`` in ``directory``; returns the paths removed.

    Never raises: clean-up is best effort and must not make the write itself fail.
    """
    pattern = temp_pattern(base)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not pattern.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < STALE_AFTER_S:
                continue
            if not _abandoned(path):
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    return removed


def fsync_dir(directory: str) -> None:
    """Make renames in ``directory`` durable (best effort: not every platform lets us open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_temp(directory: str, base: str, data: bytes) -> str:
    """A fresh temp file for target ``base`` in ``directory`` (see :func:`create_temp`) holding ``data``, flushed to
    disk; returns its path (removed again if writing fails). The caller renames it into place."""
    fd, tmp = create_temp(directory, base)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return tmp
