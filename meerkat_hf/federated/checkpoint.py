"""Round checkpoints: everything needed to continue a federation bit for bit.

A checkpoint is written after a round is aggregated: the server (global w_S, round, what each
client holds, recent round records), every client's data pointer, the VP scheduler, the
global states simulated clients still hold, and the byte counters. Seeds are derived, so no
RNG state is needed. Files are written to a temporary name and renamed, so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"round_(\d+)\.pt$")

# Settings that must not change when a run is resumed (the rest, e.g. `rounds`, may).
PROTOCOL_KEYS = ("algorithm", "num_clients", "client_fraction", "local_steps", "lr", "lr_schedule", "lr_min_ratio",
                 "weight_decay", "eps", "q", "batch_size", "max_length", "seed")


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | os.PathLike, round_id: int, state: dict, keep: int = 2) -> Path:
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round_{round_id:06d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT, "round": round_id, **state}, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def clear_checkpoints(output_dir: str | os.PathLike) -> None:
    """A fresh (non-resumed) run must not leave an older run's checkpoints to be resumed later."""
    for old in list_checkpoints(output_dir):
        old.unlink(missing_ok=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def load_latest_checkpoint(output_dir: str | os.PathLike) -> dict | None:
    """The newest readable checkpoint (an unreadable newest one is skipped with a warning)."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated file from a crash mid-save on a non-atomic filesystem
            logger.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        if state.get("format") != FORMAT:
            raise ValueError(f"{path} has checkpoint format {state.get('format')}, this build reads {FORMAT}")
        state["path"] = str(path)
        return state
    return None


def check_resumable(saved_config: dict, config: dict, saved_checksum: str, checksum: str) -> None:
    if saved_checksum != checksum:
        raise ValueError("cannot resume: the checkpoint was made with another mask (checksum differs)")
    keys = PROTOCOL_KEYS + (("rounds",) if config.get("lr_schedule") != "constant" else ())  # the schedule spans `rounds`
    changed = [k for k in keys if saved_config.get(k) != config.get(k)]
    if changed:
        raise ValueError(f"cannot resume: settings {changed} differ from the checkpointed run")
