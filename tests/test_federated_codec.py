"""Wire format: real bytes, exact sizes, and decode validation with clear reasons."""

from __future__ import annotations

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
    dense_uplink_size,
    downlink_size,
    state_digest,
    uplink_size,
)

CHECKSUM = "0123456789abcdef0123456789abcdef"
DIGEST = bytes(range(8))


def _uplink(T=10, q=1, lrs=(), **kw):
    grads = tuple(float(torch.tensor(0.1 * i - 0.3, dtype=torch.float32)) for i in range(T * q))
    base = dict(round=3, client_id=7, num_examples=123, mask_checksum=bytes.fromhex(CHECKSUM), state_digest=DIGEST,
                q=q, grads=grads, lrs=lrs)
    base.update(kw)
    return Uplink(**base)


@pytest.mark.parametrize("T", [1, 10, 100, 1000])
def test_uplink_size_is_4T_plus_small_header(T):
    data = _uplink(T).encode()
    assert len(data) == uplink_size(T) == 52 + 4 * T
    assert len(data) <= 4 * T + 128


def test_uplink_roundtrip_q_and_lr_modes():
    for q, lrs in [(1, ()), (3, ()), (2, (1e-3,)), (1, tuple(1e-3 * (i + 1) for i in range(10)))]:
        up = _uplink(10, q, lrs=tuple(float(torch.tensor(x, dtype=torch.float32)) for x in lrs), nan_steps=2)
        back = decode_uplink(up.encode())
        assert back == up
        assert back.num_steps == 10
    assert decode_any_uplink(_uplink().encode()) == _uplink()


def test_uplink_decode_rejects_bad_bytes():
    good = _uplink().encode()
    cases = {
        "truncated": good[:20],
        "bad-magic": b"XXX" + good[3:],
        "bad-crc": good[:60] + bytes([good[60] ^ 1]) + good[61:],
        "wrong-length": None,
        "bad-version": None,
    }
    # a well-framed message whose header announces more scalars than it carries
    body = bytearray(good[:-4])
    struct.pack_into("<H", body, 40, 11)
    cases["wrong-length"] = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    body = bytearray(good[:-4])
    body[3] = 99
    cases["bad-version"] = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    for reason, data in cases.items():
        with pytest.raises(MessageError) as err:
            decode_uplink(data)
        assert err.value.reason == reason, (reason, err.value)
    with pytest.raises(MessageError) as err:
        decode_uplink("not bytes")
    assert err.value.reason == "not-bytes"


def test_dense_uplink_roundtrip():
    delta = torch.randn(37)
    up = DenseUplink(1, 2, 50, bytes.fromhex(CHECKSUM), DIGEST, 5, delta)
    data = up.encode()
    assert len(data) == dense_uplink_size(37) == 56 + 4 * 37
    back = decode_dense_uplink(data)
    assert torch.equal(back.delta, delta) and back.client_id == 2 and back.num_steps == 5
    assert isinstance(decode_any_uplink(data), DenseUplink)
    with pytest.raises(MessageError):
        decode_dense_uplink(data[:-8])


def test_downlink_dense_and_records_roundtrip_and_sizes():
    values = torch.randn(50)
    budgets = ((0, 10), (3, 1))
    dense = Downlink(4, KIND_DENSE, bytes.fromhex(CHECKSUM), b"f" * 8, state_digest(values), budgets, dense=values)
    data = dense.encode()
    assert len(data) == downlink_size(KIND_DENSE, 2, k=50)
    back = decode_downlink(data)
    assert torch.equal(back.dense, values) and back.budgets == budgets and back.budget_of(3) == 1

    hist = (RoundRecords(2, (Record(0, 10, 1, (0.5, -0.25)), Record(3, 4, 2, (1.0, 2.0, 3.0, 4.0), (0.125,)))),
            RoundRecords(3, ()))
    rec = Downlink(4, KIND_RECORDS, bytes.fromhex(CHECKSUM), b"f" * 8, DIGEST, budgets, from_round=2, history=hist)
    data = rec.encode()
    assert len(data) == downlink_size(KIND_RECORDS, 2, history=hist)
    back = decode_downlink(data)
    assert back.history == hist and back.from_round == 2 and back.kind == KIND_RECORDS


def test_downlink_decode_validation():
    hist = (RoundRecords(2, (Record(0, 10, 1, (0.5,)),)),)
    msg = Downlink(4, KIND_RECORDS, bytes.fromhex(CHECKSUM), b"f" * 8, DIGEST, ((0, 1),), from_round=2, history=hist)
    data = msg.encode()  # history 2..2 does not lead to round 4
    with pytest.raises(MessageError) as err:
        decode_downlink(data)
    assert err.value.reason == "bad-history"
    with pytest.raises(MessageError) as err:
        decode_downlink(_uplink().encode())
    assert err.value.reason == "bad-magic"
