"""Client and server without the driver: replay exactness, FedAvg arithmetic, downlinks, validation."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

from conftest import build_tiny_tokenizer, make_corpus, tiny_model
from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model
from meerkat_hf.federated import (
    FederatedClient,
    FederatedServer,
    LRSchedule,
    MessageError,
    ProtocolParams,
    ValidationConfig,
    decode_uplink,
    state_digest,
)
from meerkat_hf.federated.protocol.codec import KIND_DENSE, KIND_RECORDS, Uplink
from meerkat_hf.federated.protocol.virtual_path import FedAvg, client_steps, replay_client


class _LMCollate:
    def __call__(self, feats):
        L = max(len(f) for f in feats)
        return {
            "input_ids": torch.tensor([f + [3] * (L - len(f)) for f in feats]),
            "attention_mask": torch.tensor([[1] * len(f) + [0] * (L - len(f)) for f in feats]),
            "labels": torch.tensor([f + [-100] * (L - len(f)) for f in feats]),
        }


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    model = tiny_model("llama")
    mask = compute_mask(model, SparseMaskConfig(density=0.05, calibration_num_sequences=4, calibration_seq_len=32),
                        make_corpus(60), tok, progress=False)
    wrapped = get_meerkat_model(model, mask)
    enc = [tok(t)["input_ids"] for t in make_corpus(60, seed=3)]
    return wrapped, mask, enc


def _clients(enc, n=3, per=12, batch_size=4, seed=5):
    return [FederatedClient(c, enc[c * per:(c + 1) * per], _LMCollate(), batch_size=batch_size, data_seed=seed)
            for c in range(n)]


def _server(wrapped, mask, params, n=3, **kw):
    return FederatedServer(wrapped.base_values, mask.checksum, mask.fingerprint, params, num_clients=n,
                           pretrain_grad=mask.pretrain_grad, keep_client_finals=True, **kw)


@pytest.mark.parametrize("q,wd", [(1, 0.0), (2, 0.01)])
def test_server_replay_equals_client_state_bit_for_bit(setup, q, wd):
    wrapped, mask, enc = setup
    params = ProtocolParams(11, LRSchedule(1e-2), q=q, weight_decay=wd)
    clients = _clients(enc)
    server = _server(wrapped, mask, params)
    server.begin_round(0, {0: 4, 1: 4, 2: 2})
    finals = {}
    for c in clients:
        res = c.train_zo(wrapped, server.values, 0, server.budgets[c.client_id], params, mask.checksum, 1e-3, keep_final=True)
        finals[c.client_id] = res.final_values
        assert len(res.uplink) == 52 + 4 * server.budgets[c.client_id] * q
        assert server.receive(res.uplink) is None
        assert not torch.equal(res.final_values, server.values)  # it did move
    summary = server.finish_round()
    assert summary.accepted == [0, 1, 2]
    for cid, final in finals.items():
        assert torch.equal(summary.finals[cid], final), f"client {cid}: replay differs from the client's own state"
        assert next(p for p in summary.paths if p.client_id == cid).final_digest == state_digest(final)
    # GradIP: one value per step, = mean_j g_j <g_p, z_j>
    path = summary.paths[0]
    assert len(path.gradips) == 4 and all(math.isfinite(x) for x in path.gradips)


def test_fedavg_exact_arithmetic_and_order_independence(setup):
    wrapped, mask, enc = setup
    params = ProtocolParams(3, LRSchedule(5e-2))
    clients = _clients(enc)
    uplinks, finals = [], {}
    s1 = _server(wrapped, mask, params)
    s1.begin_round(0, {0: 3, 1: 3, 2: 3})
    for c in clients:
        res = c.train_zo(wrapped, s1.values, 0, 3, params, mask.checksum, 1e-3, keep_final=True)
        uplinks.append(res.uplink)
        finals[c.client_id] = res.final_values
    for u in uplinks:
        s1.receive(u)
    s1.finish_round()
    s2 = _server(wrapped, mask, params)
    s2.begin_round(0, {0: 3, 1: 3, 2: 3})
    for u in reversed(uplinks):  # arrival order does not matter: aggregation sorts by client id
        s2.receive(u)
    s2.finish_round()
    assert torch.equal(s1.values, s2.values)
    # the documented arithmetic, written out
    w64 = wrapped.base_values.double()
    counts = {c.client_id: c.num_examples for c in clients}
    N = sum(counts.values())
    acc = torch.zeros_like(w64)
    for cid in sorted(finals):
        acc = acc + (finals[cid].double() - w64) * (counts[cid] / N)
    assert torch.equal(s1.values, (w64 + acc).float())
    # one client: the global state is exactly that client's state
    one = FedAvg(wrapped.base_values, {1: 17})
    one.add_state(1, finals[1])
    assert torch.equal(one.result(), finals[1])


def test_downlink_records_dense_and_late_joiner(setup):
    wrapped, mask, enc = setup
    params = ProtocolParams(1, LRSchedule(1e-2))
    clients = _clients(enc)
    server = _server(wrapped, mask, params)
    server.synced[2] = None  # a late joiner: holds nothing usable
    kw = dict(mask_checksum=mask.checksum, fingerprint=mask.fingerprint, params=params)
    states = {0: wrapped.base_values}
    for r in range(3):
        server.begin_round(r, {0: 2, 1: 2} if r != 1 else {0: 2})
        for cid in server.budgets:
            dl = server.downlink_for(cid)
            assert len(dl) == server.downlink_nbytes(cid)
            kind, frm = server.downlink_plan(cid)
            assert kind == KIND_RECORDS  # a few scalars beat the dense k-vector
            values, rnd, budget = clients[cid].receive(dl, cache=states[clients[cid].state.synced_round], **kw)
            assert rnd == r and budget == 2 and torch.equal(values, server.values)
            res = clients[cid].train_zo(wrapped, values, r, budget, params, mask.checksum, 1e-3)
            clients[cid].state = res.new_state
            server.receive(res.uplink)
        server.finish_round()
        states[r + 1] = server.values
    # client 1 skipped round 1: it gets a two-round records chain and reaches the same state
    server.begin_round(3, {1: 2, 2: 2})
    assert server.downlink_plan(1) == (KIND_RECORDS, 2)
    values, _, _ = clients[1].receive(server.downlink_for(1), cache=states[2], **kw)
    assert torch.equal(values, server.values)
    # late joiner: dense
    assert server.downlink_plan(2) == (KIND_DENSE, None)
    dense = server.downlink_for(2)
    assert len(dense) == 48 + 6 * 2 + 8 + 4 * server.k + 4
    values, _, _ = clients[2].receive(dense, cache=None, **kw)
    assert torch.equal(values, server.values)
    # a records message the client cannot apply (it holds another round) is refused, not misapplied
    with pytest.raises(MessageError) as err:
        clients[2].receive(server.downlink_for(1), cache=None, **kw)
    assert err.value.reason == "cache-mismatch"
    # a cap on the directions a client must replay: client 1's chain (the records of rounds 2 on) is
    # sent as records up to the cap, dense beyond it, and both bring it to the same state
    chain = [rr for rr in server.history if rr.round >= 2]
    directions = sum(len(r.grads) for rr in chain for r in rr.records)
    assert directions > 0
    server.max_catchup_directions = directions
    assert server.downlink_plan(1) == (KIND_RECORDS, 2)
    server.max_catchup_directions = directions - 1
    assert server.downlink_plan(1) == (KIND_DENSE, None)
    assert len(server.downlink_for(1)) == server.downlink_nbytes(1) == len(dense)
    values, _, _ = clients[1].receive(server.downlink_for(1), cache=states[2], **kw)
    assert torch.equal(values, server.values)
    server.max_catchup_directions = None
    # the smaller encoding wins: with a tiny max history the chain is dropped and dense is sent
    server.max_history_rounds = 0
    server._prune_history()
    assert server.downlink_plan(1) == (KIND_DENSE, None)


def _resign(data: bytes, mutate) -> bytes:
    body = bytearray(data[:-4])
    mutate(body)
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_validation_rejects_bad_uplinks_and_keeps_the_good(setup, caplog):
    wrapped, mask, enc = setup
    params = ProtocolParams(2, LRSchedule(1e-2))
    clients = _clients(enc, n=4, per=10)
    server = _server(wrapped, mask, params, n=4, validation=ValidationConfig(max_abs_grad=1e3))
    server.begin_round(0, {0: 3, 1: 3, 2: 3})
    good = {c.client_id: c.train_zo(wrapped, server.values, 0, 3, params, mask.checksum, 1e-3) for c in clients[:3]}
    up0 = decode_uplink(good[0].uplink)

    def variant(**kw):
        fields = {**up0.__dict__, **kw}
        return Uplink(**fields).encode()

    bad = {
        "duplicate": good[1].uplink,
        "unknown-client": variant(client_id=99),
        "not-a-participant": variant(client_id=3),
        "wrong-mask": variant(mask_checksum=b"\x00" * 16),
        "wrong-start-state": variant(state_digest=b"\x01" * 8),
        "wrong-number-of-scalars": variant(grads=up0.grads[:2]),
        "non-finite": variant(grads=(float("nan"),) + up0.grads[1:]),
        "absurd-magnitude": variant(grads=(1e6,) + up0.grads[1:]),
        # one uplink claiming 65,535 NaN steps used to stop the whole federation (DivergedError)
        "bad-counter": variant(nan_steps=65535),
        "bad-crc": good[0].uplink[:-1] + bytes([good[0].uplink[-1] ^ 0xFF]),
        "truncated": b"MKU\x01",
        "future-round": variant(round=1),
        "wrong-q": variant(q=3, grads=up0.grads * 1),
    }
    assert server.receive(good[1].uplink) is None
    caplog.set_level("WARNING")
    for reason, data in bad.items():
        rej = server.receive(data)
        assert rej is not None and rej.reason == reason, (reason, rej)
        assert reason in caplog.text
    inf = variant(grads=(float("inf"),) + up0.grads[1:])
    assert server.receive(inf).reason == "non-finite"
    assert server.receive(good[0].uplink) is None  # the genuine message of client 0 still gets in
    # client 2's message never arrives (dropped out mid-round)
    summary = server.finish_round()
    assert summary.accepted == [0, 1] and summary.missing == [2]
    # nothing accepted is lost: same state as a server that only ever saw the good messages
    ref = _server(wrapped, mask, params, n=4)
    ref.begin_round(0, {0: 3, 1: 3, 2: 3})
    ref.receive(good[0].uplink)
    ref.receive(good[1].uplink)
    ref.finish_round()
    assert torch.equal(server.values, ref.values)
    # a message from round 0 is now stale
    server.begin_round(1, {0: 3})
    assert server.receive(good[0].uplink).reason == "stale-round"


def test_all_rejected_leaves_state_unchanged(setup):
    wrapped, mask, enc = setup
    params = ProtocolParams(2, LRSchedule(1e-2))
    server = _server(wrapped, mask, params)
    before = server.values.clone()
    server.begin_round(0, {0: 2, 1: 2})
    up = Uplink(0, 0, 10, bytes.fromhex(mask.checksum), server.digest, 1, (float("nan"), 1.0)).encode()
    assert server.receive(up).reason == "non-finite"
    assert server.receive(b"garbage").reason in ("truncated", "bad-magic")
    summary = server.finish_round()
    assert summary.accepted == [] and len(summary.rejected) == 2
    assert torch.equal(server.values, before) and server.round == 1
    # the next round starts from the unchanged state; records for the empty round replay to it
    server.begin_round(1, {0: 1})
    values, _, _ = _clients(setup[2])[0].receive(
        server.downlink_for(0), cache=before, mask_checksum=mask.checksum, fingerprint=mask.fingerprint, params=params)
    assert torch.equal(values, before)


def test_nan_loss_step_is_reported_as_zero_and_replays(setup):
    wrapped, mask, enc = setup
    params = ProtocolParams(4, LRSchedule(1e-2))
    calls = {"n": 0}

    def flaky_loss(model, batch):
        calls["n"] += 1
        loss = model(**batch).loss
        return loss * float("nan") if calls["n"] in (3, 4) else loss  # the 2nd step's pair of forwards

    client = FederatedClient(0, enc[:12], _LMCollate(), batch_size=4, data_seed=1, loss_fn=flaky_loss)
    server = _server(wrapped, mask, params, n=1)
    server.begin_round(0, {0: 3})
    res = client.train_zo(wrapped, server.values, 0, 3, params, mask.checksum, 1e-3, keep_final=True)
    up = decode_uplink(res.uplink)
    assert up.grads[1] == 0.0 and up.nan_steps == 1 and res.nan_steps == 1
    assert server.receive(res.uplink) is None
    summary = server.finish_round()
    assert torch.equal(summary.finals[0], res.final_values)
    assert summary.nan_steps == {0: 1}


def test_data_pointer_walks_through_all_data_across_rounds(setup):
    _, _, enc = setup
    client = FederatedClient(0, enc[:10], _LMCollate(), batch_size=4, data_seed=9)
    state = client.state
    seen = []
    for _ in range(5):  # 5 rounds of one step (an early-stopped client) = 20 examples = 2 epochs
        idx, state = client.take(state, 4)
        seen += idx
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert state.epoch == 2 and state.position == 0 and state.examples_seen == 20
    # pure: the same state gives the same batch (what makes resume exact)
    assert client.take(client.state, 4) == client.take(client.state, 4)
    assert np.unique(seen[:10]).size == 10


def test_replay_helpers_match_zo_module(setup):
    wrapped, mask, _ = setup
    params = ProtocolParams(8, LRSchedule(1e-2), q=2)
    steps = client_steps(params, 5, 1, [0.5, -0.25, 1.0, 2.0], 2)
    from meerkat_hf.zo import replay

    final, gips = replay_client(wrapped.base_values, steps, mask.pretrain_grad.double().numpy())
    assert torch.equal(final, replay(wrapped.base_values, steps)) and len(gips) == 2


def _synthetic_round(clients, *, k=2000, poison=None, keep=False, q=2):
    """A server on a synthetic k-vector fed valid synthetic uplinks (no model): fast protocol checks."""
    from meerkat_hf.federated.protocol import server as server_mod

    gen = torch.Generator().manual_seed(0)
    values, gp = torch.randn(k, generator=gen) * 0.02, torch.randn(k, generator=gen)
    params = ProtocolParams(11, LRSchedule(1e-3), q=q, weight_decay=0.01)
    server = FederatedServer(values, "ab" * 16, "cd" * 8, params, num_clients=4, pretrain_grad=gp,
                             keep_client_finals=keep)
    server.begin_round(0, {c: 3 for c in clients})
    for c in clients:
        grads = tuple(float(np.float32(0.5 * (c + 1) * (-1) ** j)) for j in range(3 * q))
        assert server.receive(Uplink(0, c, 10 + 7 * c, server.checksum, server.digest, q, grads).encode()) is None
    honest = server_mod.replay_client

    def replay(values, steps, *args, **kw):  # client `poison`'s path leaves finite values
        final, gips = honest(values, steps, *args, **kw)
        if poison is not None and steps[0].seeds[0] == client_steps(params, 0, poison, [0.0] * q, q)[0].seeds[0]:
            final[0] = float("nan")
        return final, gips

    server_mod.replay_client, old = replay, server_mod.replay_client
    try:
        return server, server.finish_round()
    finally:
        server_mod.replay_client = old


def test_streaming_fedavg_equals_the_documented_arithmetic_and_survives_a_non_finite_path():
    from meerkat_hf.federated.protocol.virtual_path import fedavg_finals

    server, s = _synthetic_round([0, 1, 2], keep=True)
    start = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 0.02  # the round-0 state
    records = server.history[-1].records
    assert not torch.equal(server.values, start)
    assert torch.equal(server.values, fedavg_finals(start, records, s.finals))
    assert s.finals and _synthetic_round([0, 1, 2])[1].finals == {}  # finals only kept on request
    # client 1's path is not finite: it is rejected and the others are aggregated with N over them only
    poisoned, p = _synthetic_round([0, 1, 2], poison=1)
    assert [(r.client_id, r.reason) for r in p.rejected] == [(1, "non-finite-path")] and p.accepted == [0, 2]
    without, _ = _synthetic_round([0, 2])
    assert torch.equal(poisoned.values, without.values)
    assert [r.client_id for r in poisoned.history[-1].records] == [0, 2]


def test_directions_into_a_buffer_and_cached_record_sizes_keep_the_bits():
    from meerkat_hf.federated.protocol.codec import Record, RoundRecords
    from meerkat_hf.zo import gaussian_direction

    buf = torch.empty(5000)
    for seed in (0, 7, 2**62):
        assert torch.equal(gaussian_direction(seed, 5000, out=buf), gaussian_direction(seed, 5000))
    with pytest.raises(ValueError, match="fp32 CPU tensor of k values"):
        gaussian_direction(1, 5000, out=torch.empty(10))
    rr = RoundRecords(3, (Record(1, 5, 1, (1.0, 2.0)), Record(2, 6, 2, (0.5,) * 4, (1e-3,))))
    assert rr.nbytes() == rr.nbytes() == 8 + sum(len(r.encode()) for r in rr.records)
    assert rr == RoundRecords(3, rr.records)  # the cache is no field: equality and repr unchanged
