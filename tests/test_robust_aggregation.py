"""Robust aggregation (issue 29): the median-relative update bound, replay refusal, the drift bound end to end."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import (
    FederatedClient,
    FederationConfig,
    FederationHooks,
    LRSchedule,
    ProtocolParams,
    ValidationConfig,
    decode_uplink,
    run_federation,
    state_digest,
)
from meerkat_hf.federated.protocol.codec import KIND_RECORDS, Uplink
from meerkat_hf.federated.protocol.virtual_path import aggregate_zo_round, exact_norm
from test_federated_protocol import _clients, _server
from test_federated_protocol import setup as proto  # noqa: F401  (the module-scoped fixture)


def _round(proto, n, forge=None, params=None, **server_kw):
    """One round of `n` honest clients (client 0's uplink rewritten by `forge`); returns (server, summary, uplinks)."""
    wrapped, mask, enc = proto
    params = params or ProtocolParams(3, LRSchedule(1e-3))
    clients = _clients(enc, n=n, per=60 // n)
    server = _server(wrapped, mask, params, n=n, **server_kw)
    server.begin_round(0, {c: 3 for c in range(n)})
    ups = [c.train_zo(wrapped, server.values, 0, 3, params, mask.checksum, 1e-3).uplink for c in clients]
    if forge is not None:
        ups[0] = Uplink(**{**decode_uplink(ups[0]).__dict__, "grads": forge(decode_uplink(ups[0]).grads)}).encode()
    for u in ups:
        assert server.receive(u) is None
    return server, server.finish_round(), params


def _norm(final, w0):
    return exact_norm(final.double() - w0.double())


def test_one_hostile_client_is_scaled_to_three_median_honest_updates_identically_everywhere(proto):
    wrapped, mask, _ = proto
    w0 = wrapped.base_values.clone()
    flip = lambda grads: tuple(-1e4 if g >= 0 else 1e4 for g in grads)  # noqa: E731  (within max_abs_grad)
    server, s, params = _round(proto, 5, flip)
    honest = sorted(_norm(s.finals[c], w0) for c in range(1, 5))
    assert set(s.clipped) == {0}, "only the hostile client is scaled; the four honest ones are untouched"
    median = honest[2]  # the lower median of the five norms: the hostile one is the largest
    bound = ValidationConfig().max_update_median_ratio * median
    assert _norm(s.finals[0], w0) == pytest.approx(bound, rel=1e-4)
    assert _norm(s.finals[0], w0) <= 3 * max(honest) * (1 + 1e-4)
    # without it only the absolute bound (10 x ||w_S||) applies: the same message moves w_S far further
    _, off, _ = _round(proto, 5, flip, validation=ValidationConfig(max_update_median_ratio=None))
    assert _norm(off.finals[0], w0) > 100 * _norm(s.finals[0], w0)
    # replicas and clients reach the server's bits from the records (the scaled scalars travel)
    records = server.history[-1].records
    assert state_digest(aggregate_zo_round(w0, records, params, 0, with_paths=False)[0]) == server.digest
    server.begin_round(1, {1: 3})
    client = FederatedClient(1, [[1, 2, 3]], None, batch_size=1, data_seed=0)
    values, _, _ = client.receive(server.downlink(KIND_RECORDS, 0), mask_checksum=mask.checksum,
                                  fingerprint=mask.fingerprint, params=params, cache=w0)
    assert state_digest(values) == server.digest


def test_median_bound_needs_three_clients_and_steps_aside_under_central_dp(proto):
    w0 = proto[0].base_values
    flip = lambda grads: tuple(-1e4 if g >= 0 else 1e4 for g in grads)  # noqa: E731
    # 2 clients: no majority says which one is honest, so only the absolute bound (10 x ||w_S||) applies;
    # under central DP neither does the median one: the sensitivity needs a bound independent of the others
    dp = ProtocolParams(3, LRSchedule(1e-3), central_noise=1e-6)
    for server, s, _ in (_round(proto, 2, flip), _round(proto, 4, flip, params=dp)):
        assert set(s.clipped) == {0}
        assert _norm(s.finals[0], w0) == pytest.approx(server.max_update_norm, rel=1e-4)
    with pytest.raises(ValueError, match="max_update_median_ratio must be >= 1"):
        ValidationConfig(max_update_median_ratio=0.5)


def test_a_replay_of_last_rounds_scalars_is_refused_and_the_memory_survives_a_checkpoint(proto):
    wrapped, mask, enc = proto
    params = ProtocolParams(3, LRSchedule(1e-3))
    clients = _clients(enc, n=3)
    server = _server(wrapped, mask, params)
    server.begin_round(0, {0: 2, 1: 2, 2: 2})
    first = [c.train_zo(wrapped, server.values, 0, 2, params, mask.checksum, 1e-3).uplink for c in clients]
    for u in first:
        assert server.receive(u) is None
    server.finish_round()
    restored = _server(wrapped, mask, params)
    restored.load_state_dict(server.state_dict())
    for srv in (server, restored):
        srv.begin_round(1, {0: 2})
        old = decode_uplink(first[0])
        restamped = replace(old, round=1, state_digest=srv.digest).encode()
        rej = srv.receive(restamped)
        assert rej is not None and rej.reason == "replayed-scalars"
        # a skipped round (every g = 0) is not a replay
        zeros = replace(old, round=1, state_digest=srv.digest, grads=(0.0,) * len(old.grads), nan_steps=2).encode()
        assert srv.receive(zeros) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    return root, make_model_dir(root), make_task_files(root, n_train=240)


def _federation(tiny, name, attack: bool, **validation):
    root, model_dir, files = tiny
    cfg = FederationConfig.from_dict(base_config(
        root / name, model_dir, files, num_clients=6, rounds=6, local_steps=2, partition={"scheme": "iid"},
        client_fraction=1.0, eval_every=6, eval_examples=8, validation=validation))

    def tamper(r, cid, data):
        if cid != 0:
            return [data]
        up = decode_uplink(data)
        return [Uplink(**{**up.__dict__, "grads": tuple(-1e4 if g >= 0 else 1e4 for g in up.grads)}).encode()]

    result = run_federation(cfg, hooks=FederationHooks(tamper_uplink=tamper) if attack else None)
    return result.final_values.double(), result.initial_values.double()


def test_one_sign_flipping_client_of_six_moves_the_model_about_as_far_as_the_honest_federation(tiny):
    honest, w0 = _federation(tiny, "honest", attack=False)
    attacked, _ = _federation(tiny, "attacked", attack=True)
    own = float((honest - w0).norm())
    drift = float((attacked - honest).norm()) / own
    assert drift <= 2.0, f"one hostile client of six moved the model {drift:.2f}x the honest federation's movement"
    off_honest, _ = _federation(tiny, "honest-off", attack=False, max_update_median_ratio=None)
    off_attacked, _ = _federation(tiny, "attacked-off", attack=True, max_update_median_ratio=None)
    assert float((off_attacked - off_honest).norm()) / float((off_honest - w0).norm()) > 20 * drift
