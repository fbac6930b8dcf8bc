"""Round checkpoints: everything needed to continue a federation bit for bit.

A checkpoint is written after a round is aggregated: the server (global w_S, round, what each
client holds, recent round records), every client's data pointer, the VP scheduler, the
global states simulated clients still hold, stragglers' uplinks still on their way, and the
byte counters. Seeds are derived, so no RNG state is needed. Files are written to a temporary
name and renamed, so a crash while saving leaves the previous checkpoint intact.

Client data pointers are columns, one int64 tensor per `ClientState` field
(`pack_client_states`), not a dict per client: at 1,000 clients a list of dicts was most of a
checkpoint's cost, written every round (format 2, still read).

Integrity: a file is ``MAGIC`` + the SHA-256 of the payload (32 raw bytes) + the payload, a
`torch.save` of plain data only (tensors, dicts, lists, tuples, numbers, strings, bytes, None), read
back with ``torch.load(..., weights_only=True)``: a damaged file is detected by its hash and a
crafted one cannot run code. `load_latest_checkpoint` falls back to the previous checkpoint
(``keep_checkpoints`` are kept, 2 by default) with a warning when the newest is damaged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
from pathlib import Path

import torch

from .protocol.client import ClientState

logger = logging.getLogger(__name__)

FORMAT = 3  # 3: client states as columns (pack_client_states); 2 (a list of dicts) is still read
READABLE_FORMATS = (2, 3)
MAGIC = b"MKCKPT02"  # then the 32-byte SHA-256 of the payload, then the payload (the framing is unchanged)
_CLIENT_FIELDS = tuple(f.name for f in dataclasses.fields(ClientState))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted (damaged, truncated, or not a checkpoint)."""
_NAME = re.compile(r"round_(\d+)\.pt$")

# Differential-privacy settings that must not change when a run is resumed: the accountant composes
# every step under one clip, noise and delta.
DP_KEYS = ("clip", "noise_multiplier", "target_epsilon", "delta", "central_noise_multiplier", "noise_seed")
# Settings that must not change when a run is resumed (the rest, e.g. `rounds`, may).
PROTOCOL_KEYS = ("algorithm", "num_clients", "client_fraction", "local_steps", "learning_rate", "lr_schedule",
                 "lr_min_ratio", "weight_decay", "zo_eps", "zo_num_perturbations", "zo_estimator", "batch_size",
                 "max_length", "seed")
# A checkpoint written before the ZO settings took MeerkatZOArguments' names stores the old ones.
_OLD_NAMES = {"learning_rate": "lr", "zo_eps": "eps", "zo_num_perturbations": "q", "zo_estimator": "estimator"}


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | os.PathLike, round_id: int, state: dict, keep: int = 2) -> Path:
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round_{round_id:06d}.pt"
    for stale in folder.glob("round_*.pt.tmp"):  # left by a killed save (the run's lock makes us the only writer)
        stale.unlink(missing_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        # streamed: the payload is hashed as torch.save writes it, and the hash goes into its slot
        # afterwards (an in-memory payload and its copy were 2x the checkpoint, 3.4 GB at full-model k)
        f.write(MAGIC + bytes(32))
        writer = _HashingWriter(f)
        torch.save({"format": FORMAT, "round": round_id, **state}, writer)
        f.flush()
        f.seek(len(MAGIC))
        f.write(writer.sha256.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class _HashingWriter(io.RawIOBase):
    """A write-only file object that hashes what it passes on (torch.save writes its zip stream here)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.sha256 = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.f.write(view)
        return view.nbytes


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


def read_checkpoint(path: str | os.PathLike) -> dict:
    """One checkpoint file, its hash checked, loaded with ``weights_only=True``; `CheckpointError` if damaged."""
    path = Path(path)
    data = path.read_bytes()
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a meerkat-hf checkpoint (format {FORMAT}) or is truncated")
    digest, payload = data[len(MAGIC):head], data[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is damaged: its SHA-256 does not match the one recorded when it was written")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (hash ok but unreadable: another torch, or crafted content)
        raise CheckpointError(f"{path} cannot be loaded safely: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} has checkpoint format {got}, this build reads "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    return state


def pack_client_states(states: list[ClientState]) -> dict[str, torch.Tensor]:
    """Client states as one int64 column per field (`synced_round` None as -1): a handful of
    objects to pickle whatever the number of clients."""
    columns = {name: [getattr(st, name) for st in states] for name in _CLIENT_FIELDS}
    columns["synced_round"] = [-1 if v is None else v for v in columns["synced_round"]]
    return {name: torch.tensor(values, dtype=torch.int64) for name, values in columns.items()}


def unpack_client_states(packed: dict | list) -> list[ClientState]:
    """The client states of a checkpoint: columns (format 3) or a list of dicts (format 2)."""
    if isinstance(packed, list):
        return [ClientState(**st) for st in packed]
    missing = [name for name in _CLIENT_FIELDS if name not in packed]
    if missing:
        raise CheckpointError(f"checkpoint client states lack the columns {missing}")
    columns = {name: packed[name].tolist() for name in _CLIENT_FIELDS}
    if len({len(v) for v in columns.values()}) > 1:
        raise CheckpointError("checkpoint client state columns differ in length")
    columns["synced_round"] = [None if v < 0 else v for v in columns["synced_round"]]
    return [ClientState(*row) for row in zip(*(columns[name] for name in _CLIENT_FIELDS))]


def load_latest_checkpoint(output_dir: str | os.PathLike) -> dict | None:
    """The newest intact checkpoint; a damaged newer one is skipped with a warning (fallback to the previous)."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state = read_checkpoint(path)
        except (CheckpointError, OSError) as err:
            logger.warning("skipping checkpoint %s, falling back to the previous one: %s", path.name, err)
            continue
        state["path"] = str(path)
        return state
    return None


def check_resumable(saved_config: dict, config: dict, saved_checksum: str, checksum: str) -> None:
    if saved_checksum != checksum:
        raise ValueError("cannot resume: the checkpoint was made with another mask (checksum differs)")
    dp_saved, dp_now = saved_config.get("dp") or {}, config.get("dp") or {}
    # `rounds` is part of the protocol when something is solved over the whole run: an lr schedule
    # spans it, and a target epsilon's noise multiplier is solved for it (resuming with more rounds
    # would mix two multipliers under one accountant and report less privacy spent than was)
    spans = config.get("lr_schedule") != "constant" or any(
        d.get("target_epsilon") is not None for d in (dp_saved, dp_now))
    keys = PROTOCOL_KEYS + (("rounds",) if spans else ())
    defaults = {"zo_estimator": "spsa"}  # checkpoints written before the setting existed ran its default

    def saved(key):
        return saved_config.get(key, saved_config.get(_OLD_NAMES.get(key, key), defaults.get(key)))

    changed = [k for k in keys if saved(k) != config.get(k, defaults.get(k))]
    changed += [f"dp.{k}" for k in DP_KEYS if dp_saved.get(k) != dp_now.get(k)]  # the accountant's inputs
    if changed:
        raise ValueError(f"cannot resume: settings {changed} differ from the checkpointed run")
