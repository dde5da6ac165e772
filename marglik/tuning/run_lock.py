"""One process per run directory: ``<run_dir>/.marglik.lock``.

A run directory is a record (``summary.json``, ``history.csv``, checkpoints, Hydra's ``.hydra/``):
two processes writing into it at once would interleave their files. :func:`acquire` takes the
directory for this process, or raises :class:`RunDirLockedError` -- one line naming the process that
holds it (pid, host, since when) -- when another live process does.

How: the lock file is opened and locked with ``fcntl.flock`` (exclusive, non-blocking). The kernel
drops that lock when its process exits for any reason (``kill -9``, a crash), so a lock file left
behind by a dead process is free to take: it is stale, and taken over. Inside the file: ``pid``,
``host`` and ``since`` (UTC) of the holder, for the message. Where ``flock`` is unavailable (some
network file systems), the file's content decides: held unless its pid is dead on this host.

The lock is re-entrant within a process (the CLI takes it before Hydra writes its files, the tuner
again when it starts: one holder, released when both have let go). Under ``torchrun`` rank 0 alone
takes it (the other ranks write no files).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from pathlib import Path
from typing import Dict, Optional, Union

from ..errors import UserError

__all__ = ["LOCK_FILE", "RunDirLockedError", "RunLock", "acquire"]

LOCK_FILE = ".marglik.lock"


class RunDirLockedError(UserError, RuntimeError):
    """Another live process holds the run directory (one line: who, since when, and what to do)."""


class RunLock:
    """A held lock on a run directory (from :func:`acquire`); :meth:`release` lets go of it.

    Args:
        path: the lock file.
        fd: its open descriptor (holding the ``flock``), ``None`` where ``flock`` is unavailable.
    """

    def __init__(self, path: Path, fd: Optional[int]) -> None:
        self.path, self.fd, self.count = path, fd, 1

    def release(self) -> None:
        """Let go once; the last release removes the lock file and unlocks it (idempotent)."""
        self.count -= 1
        if self.count > 0:
            return
        _held.pop(str(self.path), None)
        try:
            if _read(self.path).get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_held: Dict[str, RunLock] = {}  # lock file -> this process's lock on it


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _locked_error(run_dir: Path, info: dict) -> RunDirLockedError:
    return RunDirLockedError(
        f"run directory {run_dir} is in use by process {info.get('pid', '?')} on {info.get('host', '?')} "
        f"(since {info.get('since', '?')}): one run per directory; wait for it to end, stop it, or choose "
        "another hydra.run.dir"
    )


def acquire(run_dir: Union[str, Path]) -> RunLock:
    """Take a run directory for this process (creating the folder), or say who has it.

    Args:
        run_dir: the run directory.

    Returns:
        The held lock (re-entrant: taking it again in this process counts up).

    Raises:
        RunDirLockedError: another live process holds it (naming its pid, host and start time).
        PermissionError: the folder cannot be created or the lock file written.
    """
    from .checkpoint import check_writable

    run_dir = Path(run_dir)
    check_writable(run_dir, "run directory")  # creates it; one line naming it if it cannot be written
    path = (run_dir / LOCK_FILE).resolve()
    mine = _held.get(str(path))
    if mine is not None and mine.count > 0:
        mine.count += 1
        return mine
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    for _ in range(5):  # retried when the file was replaced between open and lock (a holder let go)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError) as e:
            if isinstance(e, OSError) and e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise _locked_error(run_dir, _read(path)) from None
            os.close(fd)  # no flock here: the recorded pid decides
            info = _read(path)
            if info and info.get("pid") != os.getpid() and (
                    info.get("host") != me["host"] or _pid_alive(int(info.get("pid", 0)))):
                raise _locked_error(run_dir, info) from None
            fd = None
        try:
            same = fd is None or os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file as we opened it: try again on the new one
            os.close(fd)  # type: ignore[arg-type]
            continue
        data = (json.dumps(me) + "\n").encode()
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        else:
            path.write_bytes(data)
        lock = RunLock(path, fd)
        _held[str(path)] = lock
        return lock
    raise _locked_error(run_dir, _read(path))
