"""Each protocol rule pinned by a test that fails when the rule is removed (issue 27, item 6).

* The update's direction and size against an independent computation (numpy, not `apply_step`/`replay`):
  flipping the sign of the ZO update, dropping the 1/q, or the weight decay fails here.
* Every server check: one uplink that breaks exactly that rule, refused with exactly that reason.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from meerkat_hf import zo
from meerkat_hf.federated import FederatedServer, LRSchedule, ProtocolParams, ValidationConfig
from meerkat_hf.federated.protocol.codec import DenseUplink, Uplink
from meerkat_hf.federated.protocol.virtual_path import step_seed


def _independent_z(seed: int, k: int) -> np.ndarray:
    """z for `seed`, straight from torch's documented generator (not through the library)."""
    return torch.randn(k, generator=torch.Generator("cpu").manual_seed(seed)).numpy().astype(np.float64)


def test_a_zo_step_descends_along_its_scalars_as_computed_independently():
    k, lr, wd = 257, 0.05, 0.1
    w0 = np.linspace(-1, 1, k)
    step = zo.ZOStep(seeds=(11, 12), grads=(2.0, -0.5), lr=lr, weight_decay=wd)
    got = zo.apply_step(torch.tensor(w0, dtype=torch.float32), step).double().numpy()
    expected = w0 * (1 - lr * wd) - lr * (2.0 * _independent_z(11, k) - 0.5 * _independent_z(12, k)) / 2
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # a positive projected gradient moves w against z: the loss along z goes down
    one = zo.apply_step(torch.zeros(k), zo.ZOStep(seeds=(5,), grads=(1.0,), lr=0.1)).double().numpy()
    assert float(one @ _independent_z(5, k)) < 0


def test_seeds_are_blake2b_of_their_coordinates():
    parts = (7, 3, 2, 11, 0)
    data = b"".join(struct.pack("<Q", p) for p in parts)
    want = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)
    assert zo.derive_seed(*parts) == want
    assert step_seed(7, 3, 2, 11, 0) != step_seed(7, 3, 2, 11, 1)


K = 40
CHECKSUM, FINGERPRINT = "ab" * 16, "cd" * 16


def _server(**validation) -> FederatedServer:
    params = ProtocolParams(1, LRSchedule(1e-3), q=2)
    server = FederatedServer(torch.linspace(-1, 1, K), CHECKSUM, FINGERPRINT, params, num_clients=4,
                             validation=ValidationConfig(**validation))
    server.example_caps = {c: 10 for c in range(4)}
    return server


def _uplink(server: FederatedServer, client: int = 0, **changes) -> Uplink:
    base = Uplink(round=server.round, client_id=client, num_examples=10, mask_checksum=server.checksum,
                  state_digest=server.digest, q=2, grads=(0.5, -0.25, 1.0, 0.125), lrs=())
    return replace(base, **changes)


CASES = {  # reason -> how to break exactly that rule (a stale round has its own test below)
    "future-round": lambda s: _uplink(s, round=s.round + 1),
    "unknown-client": lambda s: _uplink(s, client=9),
    "not-a-participant": lambda s: _uplink(s, client=3),
    "wrong-mask": lambda s: _uplink(s, mask_checksum=bytes(16)),
    "wrong-start-state": lambda s: _uplink(s, state_digest=bytes(8)),
    "bad-example-count": lambda s: _uplink(s, num_examples=11),
    "wrong-q": lambda s: _uplink(s, q=1),
    "wrong-number-of-scalars": lambda s: _uplink(s, grads=(0.5, -0.25)),
    "non-finite": lambda s: _uplink(s, grads=(float("nan"), 0.0, 1.0, 1.0)),
    "bad-counter": lambda s: _uplink(s, nan_steps=1),
    "absurd-magnitude": lambda s: _uplink(s, grads=(2e4, 0.0, 1.0, 1.0)),
    "bad-lr": lambda s: _uplink(s, lrs=(50.0,)),
    "wrong-lr": lambda s: _uplink(s, lrs=(2e-3,)),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_server_check_refuses_exactly_its_case(reason):
    server = _server()
    server.begin_round(0, {0: 2, 1: 2, 2: 2})
    rejection = server.receive(CASES[reason](server).encode())
    assert rejection is not None and rejection.reason == reason, rejection
    assert server.receive(_uplink(server).encode()) is None  # the honest uplink still goes in


def test_a_stale_round_is_refused():
    server = _server()
    server.begin_round(0, {0: 2})
    old = _uplink(server)
    assert server.receive(old.encode()) is None
    server.finish_round()
    server.begin_round(1, {0: 2})
    rejection = server.receive(replace(old, grads=(0.1, 0.2, 0.3, 0.4)).encode())
    assert rejection is not None and rejection.reason == "stale-round"


def test_duplicates_sender_mismatch_and_replays_are_refused():
    server = _server()
    server.begin_round(0, {0: 2, 1: 2})
    first = _uplink(server)
    assert server.receive(first.encode(), sender=0) is None
    assert server.receive(first.encode(), sender=0).reason == "duplicate"
    assert server.receive(_uplink(server, client=1).encode(), sender=0).reason == "sender-mismatch"
    server.finish_round()
    server.begin_round(1, {0: 2})
    restamped = replace(first, round=1, state_digest=server.digest)
    assert server.receive(restamped.encode()).reason == "replayed-scalars"


def test_a_dense_uplink_in_a_zo_federation_is_the_wrong_type():
    server = _server()
    server.begin_round(0, {0: 2})
    dense = DenseUplink(round=0, client_id=0, num_examples=10, mask_checksum=server.checksum,
                        state_digest=server.digest, num_steps=2, delta=torch.zeros(K))
    assert server.receive(dense.encode()).reason == "wrong-message-type"
