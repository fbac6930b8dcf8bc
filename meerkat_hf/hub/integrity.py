"""Reading files that may be hostile: size bounded before reading, hash checked while streaming, values finite.

A downloaded mask or delta folder is untrusted input. Its config says how many values the weights
file holds, so the file's largest honest size is known before a byte is read: a 6 GB file claiming
to be a 1,000-value mask is refused by its size, not by a MemoryError. The SHA-256 recorded in the
config is computed chunk by chunk as the bytes come in, and nothing is parsed (no safetensors header,
no tensor) until it matches. Tensors that drive a model (the delta's values, the mask's g_p, a
checkpoint's server state) must be finite: NaN or inf there does not fail loudly later, it silently
produces an empty generation or switches Meerkat-VP off.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

_CHUNK = 1 << 20
# safetensors header (names, dtypes, shapes, offsets) + our metadata: generous per tensor, small in total
HEADER_ALLOWANCE = 64 << 10
HEADER_PER_TENSOR = 512
# |value| above this in a model's weights is a damaged or hostile file, not a trained delta (LLM weights are O(1))
MAX_ABS_WEIGHT = 1e4


def read_verified(path: str | os.PathLike, sha256: str, max_bytes: int, what: str) -> bytes:
    """The bytes of `path`, refused unless no larger than `max_bytes` and hashing to `sha256`.

    The size is checked from the file system first, the hash while reading in 1 MiB chunks (a file
    growing under us is cut at `max_bytes + 1` and refused); nothing is parsed before both pass."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{p} is {size:,} bytes, more than the {max_bytes:,} a {what} of this size can take: "
                         "not the file its config describes")
    digest, buf = hashlib.sha256(), bytearray()
    with open(p, "rb") as fh:
        while chunk := fh.read(min(_CHUNK, max_bytes + 1 - len(buf))):
            digest.update(chunk)
            buf += chunk
            if len(buf) > max_bytes:
                raise ValueError(f"{p} grew past {max_bytes:,} bytes while being read")
    if digest.hexdigest() != sha256:
        raise ValueError(f"{p} does not match the SHA-256 its config records (hash mismatch): the file is truncated, "
                         "corrupted, or from another save")
    return bytes(buf)


def stream_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file read in 1 MiB chunks (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_bound(payload_bytes: int, num_tensors: int) -> int:
    """The largest honest size of a safetensors file holding `payload_bytes` of data in `num_tensors` tensors."""
    return int(payload_bytes) + HEADER_ALLOWANCE + HEADER_PER_TENSOR * int(num_tensors)


def check_finite(tensor: torch.Tensor, what: str, source: str | os.PathLike, *, max_abs: float | None = None) -> None:
    """One-line error naming `source` if `tensor` holds NaN/inf (or values beyond `max_abs`)."""
    if tensor.numel() == 0:
        return
    t = tensor.detach()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{source}: {bad} of the {t.numel()} values of {what} are NaN/inf: a damaged or hostile file")
    if max_abs is not None:
        worst = float(t.abs().max())
        if worst > max_abs:
            raise ValueError(f"{source}: {what} reach |value| = {worst:.3g}, beyond {max_abs:g}: a damaged or "
                             "hostile file, not trained weights")
