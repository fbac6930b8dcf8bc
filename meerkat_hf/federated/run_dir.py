"""A run folder is never lost: starting a run where one already is needs `--resume` or `--overwrite`.

`claim_output_dir(path, resume=..., overwrite=...)`: a folder holding a run (metrics.jsonl,
run_info.json, checkpoints, final/) without `resume` is an error naming both flags; with
`overwrite` the old run is moved aside to `<dir>.old-<timestamp>` (nothing is deleted).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

RUN_MARKERS = ("metrics.jsonl", "run_info.json", "checkpoints", "final")


class RunExistsError(FileExistsError):
    """The output folder already holds a run and neither --resume nor --overwrite was given."""


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
