"""A run folder is never lost: starting a run where one already is needs `--resume` or `--overwrite`.

`claim_output_dir(path, resume=..., overwrite=...)`: a folder holding a run (metrics.jsonl,
run_info.json, checkpoints, final/) without `resume` is an error naming both flags; with
`overwrite` the old run is moved aside to `<dir>.old-<timestamp>` (nothing is deleted).

`lock_output_dir(path)`: one run per folder at a time. Two runs started at once into one folder used to
both pass the check above and interleave their metrics; the lock (an `flock` on `<dir>.lock`, beside the
folder so that `--overwrite` can move the folder) is held for the life of the process and released by
the kernel on any exit, `kill -9` included.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the check above still protects finished runs)
    fcntl = None

logger = logging.getLogger(__name__)

RUN_MARKERS = ("metrics.jsonl", "run_info.json", "checkpoints", "final")


class RunExistsError(FileExistsError):
    """The output folder already holds a run and neither --resume nor --overwrite was given."""


class RunLockedError(FileExistsError):
    """Another live process runs into the same output folder."""


_HELD: dict[str, IO] = {}  # lock files held by this process (closed by the kernel at exit)


def lock_output_dir(path: str | os.PathLike) -> Path | None:
    """Take `<path>.lock` exclusively for this process, or raise `RunLockedError` naming the holder's pid."""
    if fcntl is None:
        return None
    out = Path(path).absolute()
    lock = out.with_name(out.name + ".lock")
    if str(lock) in _HELD:
        return lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunLockedError(f"{path} is in use by another run (pid {holder}, lock {lock}): wait for it to finish "
                             "or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[str(lock)] = handle
    return lock


def unlock_output_dir(path: str | os.PathLike) -> None:
    """Release a lock this process took (tests and long-lived processes; exiting releases it too)."""
    out = Path(path).absolute()
    handle = _HELD.pop(str(out.with_name(out.name + ".lock")), None)
    if handle is not None:
        handle.close()


def existing_run_files(path: str | os.PathLike) -> list[str]:
    """The markers of a run found in `path` (empty: no run there)."""
    out = Path(path)
    found = []
    for name in RUN_MARKERS:
        p = out / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def aside_path(path: str | os.PathLike) -> Path:
    """`<dir>.old-YYYYmmdd-HHMMSS` (with -2, -3 ... if taken)."""
    out = Path(path)
    stem = f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = out.with_name(stem), 1
    while candidate.exists():
        n += 1
        candidate = out.with_name(f"{stem}-{n}")
    return candidate


def check_output_dir(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> list[str]:
    """Raise `RunExistsError` when `path` holds a run that this one would overwrite; returns its markers."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder, --overwrite moves it aside: pick one")
    found = existing_run_files(path)
    if found and not resume and not overwrite:
        raise RunExistsError(
            f"{path} already holds a run ({', '.join(found)}): pass --resume to continue it, or --overwrite to "
            f"move it aside (to {Path(path).name}.old-<timestamp>) and start afresh")
    return found


def move_aside(path: str | os.PathLike) -> Path:
    """Rename the run folder `path` to `aside_path(path)`; returns the new name."""
    target = aside_path(path)
    os.replace(path, target)
    logger.warning("moved the previous run in %s aside to %s (--overwrite)", path, target)
    return target
