"""Private state on disk: directories 0700, files 0600, written atomically (temp file, fsync, rename).

Server state holds bundle seeds, corrections and model shares (two servers' shares of the weights
sum to W); the dealer's holds every mask seed. Nobody but the service account may read them: a state
directory or file that group or others can access is refused at start, with the command that fixes it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UsageError


def _check(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UsageError(f"{what} {path} is mode {mode:04o}: other users could read this party's secrets; "
                         f"run `chmod {'700' if path.is_dir() else '600'} {path}` (or `chmod -R go-rwx`)")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700, or check an existing one is private."""
    if path.exists():
        _check(path, "state directory")
    else:
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return path


def check_private(path: Path) -> None:
    _check(path, "state file")


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (0600, fsynced before the rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
