"""Wire messages of one Meerkat round, as real bytes (little-endian `struct` + numpy).

Why our own format: the uplink is a few dozen scalars, so any framework envelope would
dominate it; a fixed layout also lets the byte counts in the metrics be exactly what travels.
Every message starts with a 3-byte magic and a version byte and ends with a CRC-32 of all
preceding bytes; decoding validates lengths, ranges and the CRC and raises `MessageError`.

Uplink, ZO (``MKU``, version 2), 52 + 4*T*q (+ 4*L) bytes::

    off  size  field
    0    3     magic b"MKU"
    3    1     version (2)
    4    4     round                 u32
    8    4     client id             u32
    12   4     number of examples    u32   (FedAvg weight: the client's dataset size)
    16   16    mask checksum         raw BLAKE2b-128 (`SparseMask.checksum`)
    32   8     start-state digest    BLAKE2b-64 of the fp32 w_S the client started from
    40   2     T (local steps)       u16
    42   1     q (perturbations)     u8
    43   1     lr mode               u8    0 = federation schedule (L=0), 1 = one lr (L=1), 2 = per step (L=T)
    44   2     skipped NaN steps     u16   (reported as g=0, see client.py)
    46   2     reserved (0)
    48   4Tq   projected gradients   f32, step-major (step t, perturbation j)
    ..   4L    learning rates        f32
    end  4     CRC-32                u32

Uplink, first-order baseline (``MKF``), 56 + 4*k bytes: the same first 40 bytes, then
T u16, 2 reserved bytes, k u64, the dense fp32 delta (k values), CRC-32.

Downlink (``MKD``)::

    0    3     magic b"MKD"
    3    1     version (2)
    4    4     round r (the round this message starts)          u32
    8    1     kind: 0 = records, 1 = dense                      u8
    9    3     reserved
    12   16    mask checksum
    28   8     base-model fingerprint (first 8 bytes of the SHA-256 of parameter names/shapes)
    36   8     digest of the global w_S of round r (the client checks its reconstruction)
    44   4     P participants                                    u32
    48   6P    (client id u32, local step budget u16) per participant
    dense:     k u64, then k f32 (the global w_S of round r)
    records:   from_round u32, number of rounds R u32, then per round
               (round u32, number of records M u32, then M records of
                client id u32, examples u32, T u16, q u8, lr mode u8, 4Tq gradients, 4L lrs)
    end  4     CRC-32

A records downlink lets a client holding the global state of `from_round` replay rounds
`from_round .. r-1` (`virtual_path.aggregate_zo_round`) to reach round r's state.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

# 2: directions of more than zo.DIRECTION_CHUNK values are drawn in chunks (v1 peers would replay
# another z for full-parameter runs: the version byte keeps such builds from talking)
VERSION = 2
UPLINK_MAGIC = b"MKU"
DENSE_UPLINK_MAGIC = b"MKF"
DOWNLINK_MAGIC = b"MKD"

KIND_RECORDS = 0
KIND_DENSE = 1

_UP_HEAD = struct.Struct("<3sBIII16s8sHBBHH")  # 48 bytes
_DENSE_UP_HEAD = struct.Struct("<3sBIII16s8sHHQ")  # 56 bytes - 4 (crc) = 52 + k
_DOWN_HEAD = struct.Struct("<3sBIB3s16s8s8sI")  # 48 bytes
_PARTICIPANT = struct.Struct("<IH")
_RECORD_HEAD = struct.Struct("<IIHBB")  # 12 bytes
_ROUND_HEAD = struct.Struct("<II")
_CRC = struct.Struct("<I")

MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFFFFFF


class MessageError(ValueError):
    """A message that cannot be accepted; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# -- digests ------------------------------------------------------------------------------
def state_digest(values: torch.Tensor) -> bytes:
    """BLAKE2b-64 of the fp32 little-endian bytes of a w_S vector."""
    arr = values.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    # hashed through a byte view, not `tobytes()`: no full-size copy (0.4 GB at full-model k)
    return hashlib.blake2b(memoryview(np.ascontiguousarray(arr)).cast("B"), digest_size=8).digest()


def checksum_bytes(checksum: str | bytes) -> bytes:
    """The 16 raw bytes of a mask checksum (`SparseMask.checksum` is 32 hex characters)."""
    raw = checksum if isinstance(checksum, bytes) else bytes.fromhex(checksum)
    if len(raw) != 16:
        raise ValueError(f"a mask checksum is 16 bytes, got {len(raw)}")
    return raw


def fingerprint_bytes(fingerprint: str | bytes) -> bytes:
    raw = fingerprint if isinstance(fingerprint, bytes) else bytes.fromhex(fingerprint)
    return raw[:8]


def _f32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def _floats(buf: bytes | memoryview, offset: int, count: int) -> tuple[float, ...]:
    return tuple(np.frombuffer(buf, dtype="<f4", count=count, offset=offset).astype(np.float64).tolist())


def _with_crc(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _check_frame(data: bytes, magic: bytes, min_len: int) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("not-bytes", f"expected bytes, got {type(data).__name__}")
    if len(data) < min_len:
        raise MessageError("truncated", f"{len(data)} bytes, a {magic.decode()} message has at least {min_len}")
    if bytes(data[:3]) != magic:
        raise MessageError("bad-magic", f"expected {magic!r}, got {bytes(data[:3])!r}")
    if data[3] != VERSION:
        raise MessageError("bad-version", f"version {data[3]}, this build speaks {VERSION}")
    (crc,) = _CRC.unpack_from(data, len(data) - 4)
    if zlib.crc32(bytes(data[:-4])) != crc:
        raise MessageError("bad-crc", "CRC-32 mismatch (corrupted or truncated message)")


def _lr_count(mode: int, steps: int) -> int:
    if mode == 0:
        return 0
    if mode == 1:
        return 1
    if mode == 2:
        return steps
    raise MessageError("bad-lr-mode", f"lr mode {mode} (expected 0, 1 or 2)")


def _lr_mode(lrs: tuple[float, ...], steps: int) -> int:
    if not lrs:
        return 0
    if len(lrs) == 1:
        return 1
    if len(lrs) == steps:
        return 2
    raise ValueError(f"{len(lrs)} learning rates for {steps} steps (give 0, 1 or {steps})")


# -- records (the replayable part of an uplink) ----------------------------------------------
@dataclass(frozen=True)
class Record:
    """One client's round as replayable data: who, weight, and the T*q scalars (+ optional lrs)."""

    client_id: int
    num_examples: int
    q: int
    grads: tuple[float, ...]
    lrs: tuple[float, ...] = ()

    @property
    def num_steps(self) -> int:
        return len(self.grads) // max(self.q, 1)

    def nbytes(self) -> int:
        return _RECORD_HEAD.size + 4 * len(self.grads) + 4 * len(self.lrs)

    def encode(self) -> bytes:
        mode = _lr_mode(self.lrs, self.num_steps)
        return _RECORD_HEAD.pack(self.client_id, self.num_examples, self.num_steps, self.q, mode) + _f32(self.grads) + _f32(self.lrs)

    @classmethod
    def decode_from(cls, data: bytes, offset: int, end: int) -> tuple["Record", int]:
        if offset + _RECORD_HEAD.size > end:
            raise MessageError("truncated", "record header runs past the message")
        cid, n, steps, q, mode = _RECORD_HEAD.unpack_from(data, offset)
        offset += _RECORD_HEAD.size
        if q < 1:
            raise MessageError("bad-q", "q must be >= 1")
        num_lrs = _lr_count(mode, steps)
        need = 4 * (steps * q + num_lrs)
        if offset + need > end:
            raise MessageError("truncated", f"record of client {cid} runs past the message")
        grads = _floats(data, offset, steps * q)
        lrs = _floats(data, offset + 4 * steps * q, num_lrs)
        return cls(cid, n, q, grads, lrs), offset + need


@dataclass(frozen=True)
class RoundRecords:
    """The aggregate of one round: the accepted records, replayable by anyone holding its start state."""

    round: int
    records: tuple[Record, ...]

    def nbytes(self) -> int:
        """Wire size, computed once: the server sizes every participant's downlink chain from it, so an
        uncached sum over records made planning a round's downlinks O(participants^2)."""
        n = self.__dict__.get("_nbytes")
        if n is None:
            n = _ROUND_HEAD.size + sum(r.nbytes() for r in self.records)
            object.__setattr__(self, "_nbytes", n)
        return n


# -- uplink -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Uplink:
    """A ZO client's report for one round."""

    round: int
    client_id: int
    num_examples: int
    mask_checksum: bytes
    state_digest: bytes
    q: int
    grads: tuple[float, ...]
    lrs: tuple[float, ...] = ()
    nan_steps: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.grads) // max(self.q, 1)

    @property
    def record(self) -> Record:
        return Record(self.client_id, self.num_examples, self.q, self.grads, self.lrs)

    def encode(self) -> bytes:
        steps = self.num_steps
        if steps * self.q != len(self.grads) or steps > MAX_U16 or not 1 <= self.q <= 255:
            raise ValueError(f"{len(self.grads)} scalars do not form T<={MAX_U16} steps of q={self.q}")
        mode = _lr_mode(self.lrs, steps)
        head = _UP_HEAD.pack(UPLINK_MAGIC, VERSION, self.round, self.client_id, self.num_examples,
                             checksum_bytes(self.mask_checksum), self.state_digest, steps, self.q, mode,
                             min(self.nan_steps, MAX_U16), 0)
        return _with_crc(head + _f32(self.grads) + _f32(self.lrs))


def uplink_size(num_steps: int, q: int = 1, num_lrs: int = 0) -> int:
    return _UP_HEAD.size + 4 * num_steps * q + 4 * num_lrs + _CRC.size


def decode_uplink(data: bytes) -> Uplink:
    _check_frame(data, UPLINK_MAGIC, _UP_HEAD.size + _CRC.size)
    _, _, rnd, cid, n, checksum, digest, steps, q, mode, nan_steps, _ = _UP_HEAD.unpack_from(data, 0)
    if q < 1:
        raise MessageError("bad-q", "q must be >= 1")
    num_lrs = _lr_count(mode, steps)
    expected = uplink_size(steps, q, num_lrs)
    if len(data) != expected:
        raise MessageError("wrong-length", f"{len(data)} bytes, header announces T={steps}, q={q}, {num_lrs} lrs = {expected}")
    grads = _floats(data, _UP_HEAD.size, steps * q)
    lrs = _floats(data, _UP_HEAD.size + 4 * steps * q, num_lrs)
    return Uplink(rnd, cid, n, bytes(checksum), bytes(digest), q, grads, lrs, nan_steps)


@dataclass(frozen=True)
class DenseUplink:
    """A first-order (backprop) client's report: the dense fp32 delta of w_S."""

    round: int
    client_id: int
    num_examples: int
    mask_checksum: bytes
    state_digest: bytes
    num_steps: int
    delta: torch.Tensor = field(repr=False)

    def encode(self) -> bytes:
        delta = self.delta.detach().to("cpu", torch.float32).contiguous()
        head = _DENSE_UP_HEAD.pack(DENSE_UPLINK_MAGIC, VERSION, self.round, self.client_id, self.num_examples,
                                   checksum_bytes(self.mask_checksum), self.state_digest,
                                   min(self.num_steps, MAX_U16), 0, delta.numel())
        return _with_crc(head + delta.numpy().astype("<f4", copy=False).tobytes())


def dense_uplink_size(k: int) -> int:
    return _DENSE_UP_HEAD.size + 4 * k + _CRC.size


def decode_dense_uplink(data: bytes) -> DenseUplink:
    _check_frame(data, DENSE_UPLINK_MAGIC, _DENSE_UP_HEAD.size + _CRC.size)
    _, _, rnd, cid, n, checksum, digest, steps, _, k = _DENSE_UP_HEAD.unpack_from(data, 0)
    if len(data) != dense_uplink_size(k):
        raise MessageError("wrong-length", f"{len(data)} bytes for k={k} (expected {dense_uplink_size(k)})")
    delta = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=k, offset=_DENSE_UP_HEAD.size).astype(np.float32))
    return DenseUplink(rnd, cid, n, bytes(checksum), bytes(digest), steps, delta)


def decode_any_uplink(data: bytes) -> Uplink | DenseUplink:
    magic = bytes(data[:3]) if isinstance(data, (bytes, bytearray, memoryview)) else b""
    if magic == DENSE_UPLINK_MAGIC:
        return decode_dense_uplink(data)
    return decode_uplink(data)


# -- downlink -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Downlink:
    """Start of round r: participants/budgets plus the new global state, as records or dense."""

    round: int
    kind: int
    mask_checksum: bytes
    fingerprint: bytes
    state_digest: bytes
    budgets: tuple[tuple[int, int], ...]
    dense: torch.Tensor | None = field(default=None, repr=False)
    from_round: int = 0
    history: tuple[RoundRecords, ...] = ()

    def budget_of(self, client_id: int) -> int | None:
        return dict(self.budgets).get(client_id)

    def encode(self) -> bytes:
        head = _DOWN_HEAD.pack(DOWNLINK_MAGIC, VERSION, self.round, self.kind, b"\0\0\0",
                               checksum_bytes(self.mask_checksum), fingerprint_bytes(self.fingerprint),
                               self.state_digest, len(self.budgets))
        parts = [head] + [_PARTICIPANT.pack(c, min(b, MAX_U16)) for c, b in self.budgets]
        if self.kind == KIND_DENSE:
            dense = self.dense.detach().to("cpu", torch.float32).contiguous()
            parts += [struct.pack("<Q", dense.numel()), dense.numpy().astype("<f4", copy=False).tobytes()]
        else:
            parts.append(_ROUND_HEAD.pack(self.from_round, len(self.history)))
            for rr in self.history:
                parts.append(_ROUND_HEAD.pack(rr.round, len(rr.records)))
                parts += [rec.encode() for rec in rr.records]
        return _with_crc(b"".join(parts))


def downlink_size(kind: int, num_participants: int, *, k: int = 0, history: tuple[RoundRecords, ...] = ()) -> int:
    """Serialized size without serializing (to pick the smaller encoding cheaply)."""
    base = _DOWN_HEAD.size + _PARTICIPANT.size * num_participants + _CRC.size
    if kind == KIND_DENSE:
        return base + 8 + 4 * k
    return base + _ROUND_HEAD.size + sum(rr.nbytes() for rr in history)


def decode_downlink(data: bytes) -> Downlink:
    _check_frame(data, DOWNLINK_MAGIC, _DOWN_HEAD.size + _CRC.size)
    end = len(data) - _CRC.size
    _, _, rnd, kind, _, checksum, fp, digest, num = _DOWN_HEAD.unpack_from(data, 0)
    off = _DOWN_HEAD.size
    if off + num * _PARTICIPANT.size > end:
        raise MessageError("truncated", f"{num} participants do not fit in the message")
    budgets = tuple(_PARTICIPANT.unpack_from(data, off + i * _PARTICIPANT.size) for i in range(num))
    off += num * _PARTICIPANT.size
    if kind == KIND_DENSE:
        if off + 8 > end:
            raise MessageError("truncated", "dense downlink lacks k")
        (k,) = struct.unpack_from("<Q", data, off)
        off += 8
        if off + 4 * k != end:
            raise MessageError("wrong-length", f"dense downlink announces k={k} but carries {(end - off) // 4} values")
        dense = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=k, offset=off).astype(np.float32))
        return Downlink(rnd, kind, bytes(checksum), bytes(fp), bytes(digest), budgets, dense=dense)
    if kind != KIND_RECORDS:
        raise MessageError("bad-kind", f"downlink kind {kind}")
    if off + _ROUND_HEAD.size > end:
        raise MessageError("truncated", "records downlink lacks its history header")
    from_round, num_rounds = _ROUND_HEAD.unpack_from(data, off)
    off += _ROUND_HEAD.size
    history = []
    for i in range(num_rounds):
        if off + _ROUND_HEAD.size > end:
            raise MessageError("truncated", f"round {i} of {num_rounds} missing")
        r, m = _ROUND_HEAD.unpack_from(data, off)
        off += _ROUND_HEAD.size
        if r != from_round + i:
            raise MessageError("bad-history", f"history round {r} where {from_round + i} was expected")
        records = []
        for _ in range(m):
            rec, off = Record.decode_from(data, off, end)
            records.append(rec)
        history.append(RoundRecords(r, tuple(records)))
    if off != end:
        raise MessageError("wrong-length", f"{end - off} trailing bytes")
    if from_round + num_rounds != rnd:
        raise MessageError("bad-history", f"history {from_round}..{from_round + num_rounds - 1} does not lead to round {rnd}")
    return Downlink(rnd, kind, bytes(checksum), bytes(fp), bytes(digest), budgets, from_round=from_round, history=tuple(history))


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
