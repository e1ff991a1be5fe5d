"""Crash-safe file moves: swapping a folder in one step and removing what killed writers left behind.

Temporary names carry the writing host and process (``.NAME.tmp-HOST-PID-RANDOM``) so that a later
writer can tell a dead process's leftovers from a live writer's work in progress, also on storage
shared between machines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Leftovers of another machine's process can only be judged by age.
FOREIGN_STALE_SECONDS = 24 * 3600
_libc = None


def _tag() -> str:
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def _renameat2():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return getattr(_libc, "renameat2", None) if _libc else None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot, so the caller falls back to two renames."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(tmp: Path, target: Path) -> None:
    """Put folder ``tmp`` at ``target``. An existing ``target`` is exchanged with ``tmp`` in one step
    (readers never see it missing) and then removed; without an atomic exchange it is moved aside
    first and put back if the second rename fails."""
    if not target.exists():
        os.replace(tmp, target)
    elif exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = target.with_name(f".{target.name}.old-{_tag()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_folder(target: Path) -> Path:
    """A new hidden folder beside ``target`` named for this process."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_tag()}-", dir=target.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(host: str, pid: int, path: Path) -> bool:
    if host == _tag().split("-")[0]:
        return not _alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > FOREIGN_STALE_SECONDS
    except FileNotFoundError:
        return False


def remove_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-*`` and ``.NAME.old-*`` (any NAME when None) left in ``parent`` by processes
    that are gone (a killed save): this machine's when their process no longer runs, another
    machine's after a day. Returns what was removed; work of live processes is left alone."""
    stem = re.escape(name) if name is not None else ".+"
    pattern = re.compile(rf"\.{stem}\.(tmp|old)-([0-9a-f]{{8}})-(\d+)-[^/]*$")
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = pattern.match(p.name)
        if m and _stale(m.group(2), int(m.group(3)), p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` in one step: a temporary file beside it, fsynced, then renamed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
