"""Fuzz the wire codec: a mutated message decodes to an equal message or raises `MessageError`.

Valid uplinks (ZO, every lr mode, q > 1), dense first-order uplinks and downlinks (dense and
records with histories) are mutated at random: bit flips, byte overwrites, truncations,
extensions, insertions and deletions. Each mutant is fed to every decoder twice: as mutated
(the CRC catches it) and with its CRC-32 recomputed, which is what a buggy or hostile sender
produces and exercises every length/range check behind the CRC. Any exception other than
`MessageError`, or a hang (pytest-timeout), fails. A decode that succeeds must be canonical:
re-encoding the decoded message and decoding again gives the same bytes. Fixed seed; a few
thousand mutants per run, about a second.
"""

from __future__ import annotations

import random
import struct
import zlib

import pytest
import torch

from meerkat_hf.federated.protocol.codec import (
    KIND_DENSE,
    KIND_RECORDS,
    DenseUplink,
    Downlink,
    MessageError,
    Record,
    RoundRecords,
    Uplink,
    decode_any_uplink,
    decode_dense_uplink,
    decode_downlink,
    decode_uplink,
)

SEED = 20261202
MUTANTS_PER_MESSAGE = 60
REASONS: set[str] = set()
DECODERS = (decode_uplink, decode_dense_uplink, decode_any_uplink, decode_downlink)


def _floats(rng: random.Random, n: int) -> tuple[float, ...]:
    # values that survive the float32 round trip exactly
    return tuple(float(torch.tensor(rng.uniform(-5, 5), dtype=torch.float32)) for _ in range(n))


def _bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _record(rng: random.Random) -> Record:
    q = rng.choice([1, 1, 2, 3])
    steps = rng.randint(0, 6)
    lrs = rng.choice([(), _floats(rng, 1), _floats(rng, steps)]) if steps else ()
    return Record(rng.randrange(50), rng.randrange(1, 1000), q, _floats(rng, steps * q), lrs)


def valid_messages(rng: random.Random) -> list[bytes]:
    """A varied set of well-formed messages (every message type and encoding branch)."""
    out: list[bytes] = []
    for _ in range(12):
        q = rng.choice([1, 1, 2, 4])
        steps = rng.randint(1, 12)
        lrs = rng.choice([(), _floats(rng, 1), _floats(rng, steps)])
        out.append(Uplink(rng.randrange(100), rng.randrange(64), rng.randrange(1, 10_000), _bytes(rng, 16),
                          _bytes(rng, 8), q, _floats(rng, steps * q), lrs, rng.randrange(3)).encode())
    for _ in range(6):
        out.append(DenseUplink(rng.randrange(100), rng.randrange(64), rng.randrange(1, 10_000), _bytes(rng, 16),
                               _bytes(rng, 8), rng.randint(1, 8),
                               torch.tensor(_floats(rng, rng.randint(0, 40)), dtype=torch.float32)).encode())
    for _ in range(6):
        budgets = tuple((rng.randrange(64), rng.randint(1, 20)) for _ in range(rng.randint(0, 5)))
        dense = torch.tensor(_floats(rng, rng.randint(0, 40)), dtype=torch.float32)
        out.append(Downlink(rng.randrange(100), KIND_DENSE, _bytes(rng, 16), _bytes(rng, 8), _bytes(rng, 8), budgets,
                            dense=dense).encode())
    for _ in range(10):
        budgets = tuple((rng.randrange(64), rng.randint(1, 20)) for _ in range(rng.randint(0, 5)))
        start, rounds = rng.randrange(50), rng.randint(0, 3)
        history = tuple(RoundRecords(start + i, tuple(_record(rng) for _ in range(rng.randint(0, 3))))
                        for i in range(rounds))
        out.append(Downlink(start + rounds, KIND_RECORDS, _bytes(rng, 16), _bytes(rng, 8), _bytes(rng, 8), budgets,
                            from_round=start, history=history).encode())
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # flip 1-3 bits
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # overwrite bytes, biased towards the header (lengths, counts, modes)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(buf), 64)) if rng.random() < 0.7 else rng.randrange(len(buf))
            buf[pos] = rng.choice([0, 1, 2, 3, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 2:  # truncate
        del buf[rng.randrange(len(buf)):]
    elif kind == 3:  # extend
        buf += _bytes(rng, rng.choice([1, 2, 4, 8, 12, 64]))
    elif kind == 4:  # insert in the middle
        pos = rng.randrange(len(buf) + 1)
        buf[pos:pos] = _bytes(rng, rng.choice([1, 4, 6, 8, 12]))
    elif kind == 5:  # delete from the middle
        pos = rng.randrange(len(buf))
        del buf[pos:pos + rng.choice([1, 4, 6, 8, 12])]
    else:  # a 32-bit count field set to something large
        if len(buf) >= 8:
            pos = rng.randrange(0, len(buf) - 4)
            struct.pack_into("<I", buf, pos, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 20, 1 << 16, 255]))
    return bytes(buf)


def with_fixed_crc(data: bytes) -> bytes:
    if len(data) < 4:
        return data
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def check(decoder, data: bytes, original: bytes | None) -> str:
    """Decode `data`; 'ok' or 'rejected'. Any exception other than MessageError propagates (test fails).

    `original`: the valid message `data` was made from, when its CRC was NOT recomputed; then only
    an unchanged message may get through (the CRC-32 misses a random change with probability 2^-32).
    """
    try:
        message = decoder(data)
    except MessageError as err:
        REASONS.add(err.reason)
        return "rejected"
    reencoded = message.encode()
    assert decoder(reencoded).encode() == reencoded, (decoder.__name__, data.hex())  # canonical after one pass
    if original is not None:
        assert data == original and reencoded == original, (decoder.__name__, data.hex())
    return "ok"


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # NaN payloads
def test_mutated_messages_decode_equal_or_raise_message_error():
    rng = random.Random(SEED)
    messages = valid_messages(rng)
    counts = {"ok": 0, "rejected": 0}
    for data in messages:
        assert sum(check(decoder, data, data) == "ok" for decoder in DECODERS) >= 1  # its own decoder accepts it
        for _ in range(MUTANTS_PER_MESSAGE):
            mutant = mutate(rng, data)
            for decoder in DECODERS:
                counts[check(decoder, mutant, data)] += 1
                counts[check(decoder, with_fixed_crc(mutant), None)] += 1
    total = counts["ok"] + counts["rejected"]
    assert total == len(messages) * MUTANTS_PER_MESSAGE * len(DECODERS) * 2 >= 5000
    assert counts["rejected"] > counts["ok"] > 0, counts
    # the CRC-fixed mutants reach the checks behind the CRC, not just the frame
    assert {"bad-crc", "wrong-length", "truncated", "bad-lr-mode", "bad-q", "bad-history"} <= REASONS, REASONS


def test_non_bytes_and_tiny_inputs_are_message_errors():
    for decoder in DECODERS:
        for data in (b"", b"M", b"MKU", b"MKD\x01", b"\x00" * 7, bytearray(b"MKF\x01" + b"\x00" * 60)):
            with pytest.raises(MessageError):
                decoder(data)
        for bad in ("not bytes", None, 12, [1, 2, 3]):
            with pytest.raises(MessageError):
                decoder(bad)
