"""Claiming an output folder for one run, so that no earlier result is lost or mixed with a new one.

A run claims its --out before any work: the folder is created (one that cannot be created fails at once), a lock
file stops a second writer, and a folder that already holds results is refused unless the user says `overwrite`
(its contents are then removed) or `resume` (they are kept, for a capture that continues its shards).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from interp.errors import InterpError

LOCK = ".interp.lock"


class OutputInUse(InterpError):
    """An output folder that holds earlier results, or that another run is writing."""


@contextmanager
def claimed(out: str | Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Hold `out` for the duration of the block (see the module docstring); yields it as a Path."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputInUse(f"cannot create the output folder {out} ({e.strerror}); pass another --out") from None
    lock = _lock(out)
    try:
        earlier = sorted(p for p in out.iterdir() if p.name != LOCK)
        if earlier and not (overwrite or resume):
            raise OutputInUse(f"{out} already holds results of an earlier run ({len(earlier)} entries, e.g. "
                              f"{earlier[0].name}); pass --overwrite to replace them, or another --out")
        if overwrite:
            for p in earlier:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        yield out
    finally:
        lock.unlink(missing_ok=True)


def _lock(out: Path) -> Path:
    """Create out/LOCK holding this process id; a lock of a process that no longer runs is taken over."""
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _owner(lock)
            if owner is not None and _running(owner):
                raise OutputInUse(f"another interp run (process {owner}) is writing to {out}; wait for it to finish "
                                  f"or pass another --out") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return lock
    raise OutputInUse(f"could not lock {out}: another run keeps taking it")


def _owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
