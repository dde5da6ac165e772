"""A run directory stays as it was until the command is accepted.

Hydra writes ``.hydra/{config,hydra,overrides}.yaml`` and its log into the run directory before the
task starts; a command rejected after that (a resume with another configuration, missing data, a
device error found at start) would leave another command's configuration in a finished run's
record, and a failed fresh start would leave a run folder with nothing in it.
:class:`RunDirGuard` prevents both: it takes the directory's lock
(:mod:`marglik.tuning.run_lock`), notes what the directory holds, and, unless :meth:`accept` was
called (the run has started), :meth:`close` puts Hydra's files back byte for byte, removes every
file and folder the command added, and removes the folders it created (up to the first one that
existed before).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Set, Tuple, Union

from .tuning.run_lock import LOCK_FILE, acquire

__all__ = ["RunDirGuard", "first_existing", "hydra_only"]

#: files kept byte for byte: Hydra's own (config, overrides, log) and ours at the top of the directory
_SMALL = 16 * 2**20


def first_existing(path: Path) -> Path:
    """The path itself if it exists, else its nearest existing ancestor."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def hydra_only(run_dir: Path) -> bool:
    """Whether a folder holds nothing but what Hydra writes at start (``.hydra/``, ``*.log``) and our lock."""
    return all(p.name in (".hydra", LOCK_FILE) or (p.is_file() and p.suffix == ".log") for p in run_dir.iterdir())


class RunDirGuard:
    """The run directory of one command: locked, and restored unless the command is accepted.

    Args:
        run_dir: the run directory (need not exist).
        fresh: the folder was just made for this command (Hydra's timestamped run directory,
            found holding only Hydra's files): it is removed if the command is rejected.
        anchor: the folder that existed before the command made anything (default: the first
            existing ancestor of ``run_dir`` now); empty folders between it and ``run_dir`` that the
            command made are removed on rejection.

    Raises:
        RunDirLockedError: another live process holds the directory.
        PermissionError: the directory cannot be created.
    """

    def __init__(self, run_dir: Union[str, Path], fresh: bool = False, anchor: Optional[Path] = None) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.anchor = (anchor or first_existing(self.run_dir)).absolute()
        self.existed = self.run_dir.is_dir() and not fresh
        self.paths: Set[str] = set()
        self.files: Dict[str, Tuple[bytes, int, int]] = {}  # relpath -> (content, atime ns, mtime ns)
        if self.existed:
            self._snapshot()
        self.accepted = False
        self.lock = acquire(self.run_dir)

    def _snapshot(self) -> None:
        for p in self.run_dir.rglob("*"):
            rel = str(p.relative_to(self.run_dir))
            self.paths.add(rel)
            top = p.parent == self.run_dir or p.parent.name == ".hydra"
            if top and p.is_file() and not p.is_symlink() and p.stat().st_size <= _SMALL:
                st = p.stat()
                self.files[rel] = (p.read_bytes(), st.st_atime_ns, st.st_mtime_ns)

    def accept(self) -> None:
        """The command is accepted (its run starts): from now on the directory is the run's."""
        self.accepted = True

    def close(self) -> None:
        """Restore the directory unless accepted (see the module docstring), then release the lock."""
        try:
            if not self.accepted:
                self._restore()
        finally:
            self.lock.release()

    def _restore(self) -> None:
        if not self.existed:
            if self.run_dir.is_dir():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            parent = self.run_dir.parent
            while parent != self.anchor and self.anchor in parent.parents and parent.is_dir():
                try:
                    parent.rmdir()  # only if empty
                except OSError:
                    break
                parent = parent.parent
            return
        added = [p for p in self.run_dir.rglob("*")
                 if str(p.relative_to(self.run_dir)) not in self.paths and p.name != LOCK_FILE]
        for p in sorted(added, key=lambda q: -len(q.parts)):  # deepest first: files, then their folders
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for rel, (data, atime, mtime) in self.files.items():
            p = self.run_dir / rel
            try:
                if not p.is_file() or p.read_bytes() != data:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(data)
                os.utime(p, ns=(atime, mtime))
            except OSError:  # pragma: no cover - a file made unreadable meanwhile
                continue
