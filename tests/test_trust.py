"""Trust boundaries (issue 11): server-side bounds, client identity, checkpoint integrity, resume."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import FederationConfig, ValidationConfig
from meerkat_hf.federated.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from meerkat_hf.federated.driver import FederationHooks, SimulatedCrash, run_federation


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return root, make_model_dir(root), make_task_files(root)


def _config(tmp_path, assets, **kw) -> FederationConfig:
    _, model_dir, files = assets
    return FederationConfig.from_dict(base_config(tmp_path, model_dir, files, **kw))


# -- 3. checkpoints ---------------------------------------------------------------------------------
def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def test_checkpoint_hash_weights_only_and_fallback(tmp_path, caplog):
    state = {"server": {"values": torch.arange(5, dtype=torch.float32), "history": [(0, [(1, 2, 1, [0.5], [])])]},
             "config": {"lr": 1e-3, "task": {"verbalizer": [" a", " b"]}, "x": None}, "clients": [{"steps_done": 3}]}
    for r in range(3):
        save_checkpoint(tmp_path, r, {**state, "tag": r}, keep=2)
    paths = list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["round_000001.pt", "round_000002.pt"]  # the last two are kept
    assert read_checkpoint(paths[-1])["tag"] == 2
    # every single-bit flip anywhere in the newest file is detected; the previous one is used instead
    newest = paths[-1].read_bytes()
    for offset in (0, 9, 40, len(newest) // 2, len(newest) - 1):
        paths[-1].write_bytes(newest)
        _flip(paths[-1], offset)
        with pytest.raises(CheckpointError):
            read_checkpoint(paths[-1])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ck = load_latest_checkpoint(tmp_path)
        assert ck["tag"] == 1 and ck["path"].endswith("round_000001.pt")
        assert "falling back to the previous one" in caplog.text
    paths[-1].write_bytes(newest[: len(newest) // 3])  # truncated
    assert load_latest_checkpoint(tmp_path)["tag"] == 1
    _flip(paths[0], 100)
    assert load_latest_checkpoint(tmp_path) is None  # nothing intact: nothing to resume from


def test_checkpoint_refuses_pickled_code(tmp_path):
    import hashlib
    import io

    from meerkat_hf.federated import checkpoint as ckpt

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"format": ckpt.FORMAT, "round": 0, "evil": Evil()}, buf)
    payload = buf.getvalue()  # a correct hash: only weights_only=True stops it
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "round_000000.pt").write_bytes(ckpt.MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint(folder / "round_000000.pt")


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, assets, caplog):
    kw = dict(rounds=4, client_fraction=0.5, eval_every=4)
    full = run_federation(_config(tmp_path / "a", assets, **kw))

    def crash(r, row):
        if r == 2:
            raise SimulatedCrash("power cut after round 2")

    with pytest.raises(SimulatedCrash):
        run_federation(_config(tmp_path / "b", assets, **kw), hooks=FederationHooks(after_round=crash))
    paths = list_checkpoints(tmp_path / "b" / "run")
    assert len(paths) == 2  # the last two are kept
    _flip(paths[-1], len(paths[-1].read_bytes()) // 2)
    caplog.set_level(logging.WARNING)
    resumed = run_federation(_config(tmp_path / "b", assets, resume=True, **kw))
    assert "falling back to the previous one" in caplog.text
    assert resumed.state_digest == full.state_digest  # round 2 is redone from round 1's checkpoint


# -- 4. resume=True with nothing to resume from is a fresh run ------------------------------------
@pytest.mark.parametrize("algorithm", ["random-early-stop", "meerkat-vp"])
def test_resume_without_checkpoint_equals_fresh_run(tmp_path, assets, algorithm):
    kw = dict(algorithm=algorithm, rounds=3, local_steps=3, eval_every=3, vp={"random_count": 2}
              if algorithm == "random-early-stop" else {"min_steps": 2, "ratio_threshold": 0.9})
    fresh = run_federation(_config(tmp_path / "a", assets, **kw))
    resumed = run_federation(_config(tmp_path / "b", assets, resume=True, **kw))
    assert resumed.state_digest == fresh.state_digest
    assert resumed.limited_clients == fresh.limited_clients
    assert [r["budgets"] for r in resumed.metrics] == [r["budgets"] for r in fresh.metrics]
    if algorithm == "random-early-stop":
        assert len(fresh.limited_clients) == 2


# -- 1. the server decides, clients report --------------------------------------------------------
@pytest.fixture(scope="module")
def proto():
    from conftest import build_tiny_tokenizer, make_corpus, tiny_model
    from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model

    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    model = tiny_model("llama")
    mask = compute_mask(model, SparseMaskConfig(density=0.05, calibration_num_sequences=4, calibration_seq_len=32),
                        make_corpus(60), tok, progress=False)
    wrapped = get_meerkat_model(model, mask)
    enc = [tok(t)["input_ids"] for t in make_corpus(60, seed=3)]
    return wrapped, mask, enc


def _proto_round(proto, forge, params=None, caps=None, **server_kw):
    """One round, 3 clients; `forge(uplink) -> Uplink` rewrites client 0's report. Returns (server, summary, uplinks)."""
    from test_federated_protocol import _clients, _server

    from meerkat_hf.federated import LRSchedule, ProtocolParams, decode_uplink
    from meerkat_hf.federated.protocol.codec import Uplink

    wrapped, mask, enc = proto
    params = params or ProtocolParams(3, LRSchedule(1e-3))
    clients = _clients(enc)
    server = _server(wrapped, mask, params, **server_kw)
    server.example_caps = {c.client_id: c.num_examples for c in clients} | (caps or {})
    server.begin_round(0, {0: 3, 1: 3, 2: 3})
    ups = [c.train_zo(wrapped, server.values, 0, 3, params, mask.checksum, 1e-3).uplink for c in clients]
    ups[0] = forge(decode_uplink(ups[0]), Uplink).encode()
    for u in ups:
        server.receive(u)
    return server, server.finish_round(), params


def test_server_rejects_client_chosen_lr_and_bought_weight(proto):
    _, s, _ = _proto_round(proto, lambda u, U: U(**{**u.__dict__, "lrs": (10.0,)}))
    assert [(r.client_id, r.reason) for r in s.rejected] == [(0, "wrong-lr")] and s.accepted == [1, 2]
    _, s, _ = _proto_round(proto, lambda u, U: U(**{**u.__dict__, "lrs": (float(np.float32(1e-3)),) * 3}))
    assert s.accepted == [0, 1, 2]  # echoing the federation's lr is fine
    _, s, _ = _proto_round(proto, lambda u, U: U(**{**u.__dict__, "num_examples": 2**31 - 1}))
    assert [(r.client_id, r.reason) for r in s.rejected] == [(0, "bad-example-count")]
    assert "more than the 12" in s.rejected[0].detail


def test_update_norm_bound_scales_one_client_identically_everywhere(proto):
    from meerkat_hf.federated import FederatedClient, state_digest
    from meerkat_hf.federated.protocol.codec import KIND_RECORDS

    wrapped, mask, _ = proto
    w0 = wrapped.base_values.clone()
    forge = lambda u, U: U(**{**u.__dict__, "grads": tuple(1e4 if g >= 0 else -1e4 for g in u.grads)})  # noqa: E731
    # the absolute bound alone (the median-relative one is tested below)
    server, s, params = _proto_round(proto, forge, validation=ValidationConfig(max_update_median_ratio=None))
    bound = 10.0 * float(w0.double().norm())
    assert set(s.clipped) == {0} and 0 < s.clipped[0] < 1
    assert float((s.finals[0].double() - w0.double()).norm()) <= bound * (1 + 1e-4)
    assert float((s.finals[1].double() - w0.double()).norm()) < bound  # honest clients untouched
    # unbounded, the same message moves w_S by orders of magnitude more
    _, raw, _ = _proto_round(proto, forge, validation=ValidationConfig(max_update_ratio=None, max_update_median_ratio=None))
    assert not raw.clipped
    assert float((raw.finals[0].double() - w0.double()).norm()) > 20 * bound
    assert float(server.values.abs().max()) < float(raw_values_max(raw, w0))
    # a client replaying the records downlink (the scaled scalars travel) reaches the server's bits
    server.begin_round(1, {1: 3})
    client = FederatedClient(1, [[1, 2, 3]], None, batch_size=1, data_seed=0)
    values, _, _ = client.receive(server.downlink(KIND_RECORDS, 0), mask_checksum=mask.checksum,
                                  fingerprint=mask.fingerprint, params=params, cache=w0)
    assert state_digest(values) == server.digest


def raw_values_max(summary, w0):
    return max(float(f.abs().max()) for f in summary.finals.values())


def test_non_finite_round_is_refused_and_the_state_kept(proto, monkeypatch, caplog):
    from meerkat_hf.federated.protocol import server as server_mod

    honest_result = server_mod.FedAvg.result

    def poisoned(self):
        out = honest_result(self)
        out[0] = float("inf")
        return out

    monkeypatch.setattr(server_mod.FedAvg, "result", poisoned)
    caplog.set_level(logging.ERROR)
    server, s, _ = _proto_round(proto, lambda u, U: u)
    assert s.refused and s.accepted == [] and {r.reason for r in s.rejected} == {"round-refused"}
    assert torch.equal(server.values, proto[0].base_values) and server.round == 1
    assert server.history[-1].records == ()  # clients replaying round 0 keep the old state too
    assert "round 0 refused" in caplog.text


def test_validation_bounds_must_be_finite_and_weight_decay_bounded(tmp_path, assets):
    from meerkat_hf.federated import ConfigError, LRSchedule, ProtocolParams

    for bad in ({"max_abs_grad": float("inf")}, {"max_lr": float("nan")}, {"max_update_ratio": float("inf")},
                {"max_examples": 0}, {"max_abs_delta": -1}):
        with pytest.raises(ValueError, match="finite number > 0"):
            ValidationConfig(**bad)
        with pytest.raises(ConfigError, match="validation"):
            _config(tmp_path, assets, validation=bad)
    with pytest.raises(ConfigError, match="learning_rate \\* weight_decay must be < 1"):
        _config(tmp_path, assets, lr=1e-3, weight_decay=1000.0).validate()
    with pytest.raises(ValueError, match="weight_decay"):
        ProtocolParams(0, LRSchedule(0.5), weight_decay=2.0)


def test_malicious_client_through_the_driver(tmp_path, assets):
    """Client 0 reports |g| = max_abs_grad on every step: its influence is bounded, honest clients are not touched."""
    from meerkat_hf.federated import decode_uplink
    from meerkat_hf.federated.protocol.codec import Uplink

    def tamper(r, cid, data):
        if cid != 0:
            return [data]
        up = decode_uplink(data)
        return [Uplink(**{**up.__dict__, "grads": tuple(1e4 if g >= 0 else -1e4 for g in up.grads)}).encode()]

    res = run_federation(_config(tmp_path, assets, rounds=2, local_steps=10, eval_every=2),
                         hooks=FederationHooks(tamper_uplink=tamper))
    assert all(set(r["clipped"]) == {"0"} for r in res.metrics)
    assert float(res.final_values.abs().max()) < 0.2  # 0.063 before; 12.3 without the bound (1.6e6 with lr/weight)


def test_fedavg_weight_cap_water_fills_and_replays_bit_exactly(proto):
    """Client 0 (which the server knows as a 1000-example client) would hold 1000/1024 of the FedAvg weight;
    with max_client_weight=0.4 it gets 0.4, the two 12-example clients share the rest, and a client replaying
    the records (which carry the capped counts) reaches the server's bits."""
    from meerkat_hf.federated import FederatedClient, state_digest
    from meerkat_hf.federated.protocol.codec import KIND_RECORDS
    from meerkat_hf.federated.protocol.virtual_path import FedAvg

    wrapped, mask, _ = proto
    w0 = wrapped.base_values.clone()
    big = lambda u, U: U(**{**u.__dict__, "num_examples": 1000})  # noqa: E731
    server, s, params = _proto_round(proto, big, caps={0: 1000}, validation=ValidationConfig(max_client_weight=0.4))
    assert s.accepted == [0, 1, 2] and s.weight_capped == {0: (1000, 16)}  # 16 / (16 + 12 + 12) = 0.4
    counts = {r.client_id: r.num_examples for r in server.history[-1].records}
    assert counts == {0: 16, 1: 12, 2: 12} and max(n / sum(counts.values()) for n in counts.values()) <= 0.4
    avg = FedAvg(w0, counts)
    for c in sorted(s.finals):
        avg.add_state(c, s.finals[c])
    assert torch.equal(avg.result(), server.values)
    # uncapped, the same claim buys 1000/1024 of the weight
    raw_server, raw, _ = _proto_round(proto, big, caps={0: 1000})
    assert not raw.weight_capped and raw_server.history[-1].records[0].num_examples == 1000
    assert raw_server.digest != server.digest
    # a replica or a client replaying the records downlink reaches the same bits
    server.begin_round(1, {1: 3})
    client = FederatedClient(1, [[1, 2, 3]], None, batch_size=1, data_seed=0)
    values, _, _ = client.receive(server.downlink(KIND_RECORDS, 0), mask_checksum=mask.checksum,
                                  fingerprint=mask.fingerprint, params=params, cache=w0)
    assert state_digest(values) == server.digest


def test_cap_example_counts_water_filling():
    from fractions import Fraction

    from meerkat_hf.federated.protocol.virtual_path import cap_example_counts

    assert cap_example_counts({0: 100, 1: 90, 2: 5, 3: 5}, 0.3) == {0: 7, 1: 7, 2: 5, 3: 5}  # two capped
    assert cap_example_counts({0: 12, 1: 12, 2: 12}, 0.4) == {0: 12, 1: 12, 2: 12}  # nobody above: unchanged
    assert cap_example_counts({0: 1000, 1: 8}, 0.4) == {0: 8, 1: 8}  # the cap cannot be met: equal weights
    assert cap_example_counts({3: 10**9, 5: 1}, 1.0) == {3: 10**9, 5: 1}
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n, cap = int(rng.integers(1, 9)), float(rng.choice([0.1, 0.25, 1 / 3, 0.4, 0.5, 0.9]))
        counts = {c: int(rng.choice([1, 3, rng.integers(1, 10 ** int(rng.integers(1, 10)))])) for c in range(n)}
        out = cap_example_counts(counts, cap)
        assert all(1 <= out[c] <= counts[c] for c in counts)  # a count is only ever lowered
        total = sum(out.values())
        if n * Fraction(cap) > 1:
            assert all(out[c] / total <= cap for c in out)
            assert all(out[c] == counts[c] for c in out if out[c] != max(out.values()))  # the others keep theirs
        else:
            assert len(set(out.values())) == 1


def test_weight_cap_through_the_driver_keeps_replay_exact(tmp_path, assets):
    """Dirichlet partitions are unequal: with max_client_weight=0.3 the largest clients are capped every round,
    and every client that replays a records downlink (capped counts included) verifies the server's digest."""
    res = run_federation(_config(tmp_path, assets, rounds=3, eval_every=3, validation={"max_client_weight": 0.3}))
    assert any(r["weight_capped"] for r in res.metrics)
    for row in res.metrics:
        for claimed, counted in row["weight_capped"].values():
            assert counted < claimed
    assert not any(r["downlink_fallbacks"] for r in res.metrics)
    assert any(kind == "records" for r in res.metrics for kind in r["downlink_kinds"].values())  # records were replayed


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("inf"), float("nan"), "half", True])
def test_max_client_weight_must_be_a_fraction(tmp_path, assets, bad):
    from meerkat_hf.federated import ConfigError

    with pytest.raises(ConfigError, match="max_client_weight must be a finite number in \\(0, 1\\]"):
        _config(tmp_path, assets, validation={"max_client_weight": bad})
    with pytest.raises(ConfigError, match="below 1/num_clients"):
        _config(tmp_path, assets, validation={"max_client_weight": 0.2}).validate()


# -- client-side check of the downlink --------------------------------------------------------------
def _downlink_cases(w0):
    """(name, downlink fields, expected reason): each one consistent (its digest is that of what it carries, so only
    the content check can catch it)."""
    from meerkat_hf.federated.protocol.codec import Record

    lr = float(np.float32(1e-3))
    nan_state = w0.clone()
    nan_state[3] = float("nan")
    inf_state = w0.clone()
    inf_state[-1] = float("-inf")
    rec = lambda **kw: Record(**{"client_id": 1, "num_examples": 12, "q": 1, "grads": (0.5, -0.25, 1.0), **kw})  # noqa: E731
    return [
        ("dense-nan", {"dense": nan_state}, "non-finite"),
        ("dense-inf", {"dense": inf_state}, "non-finite"),
        ("dense-wrong-k", {"dense": w0[:-1].clone()}, "wrong-size"),
        ("record-nan-grad", {"records": [rec(grads=(0.5, float("nan"), 1.0))]}, "non-finite"),
        ("record-inf-grad", {"records": [rec(grads=(float("inf"),) * 3)]}, "non-finite"),
        ("record-nan-lr", {"records": [rec(lrs=(float("nan"),))]}, "non-finite"),
        ("record-inf-lr", {"records": [rec(lrs=(lr, float("inf"), lr))]}, "non-finite"),
        ("record-other-lr", {"records": [rec(lrs=(10.0,))]}, "wrong-lr"),
        ("record-zero-weight", {"records": [rec(num_examples=0)]}, "bad-example-count"),
        ("record-wrong-q", {"records": [rec(q=3)]}, "wrong-q"),
        ("record-duplicate", {"records": [rec(), rec()]}, "duplicate"),
        ("record-overflow", {"records": [rec(grads=(3e38, 3e38, 3e38), lrs=(lr,))], "lr": 0.9}, "non-finite"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_client_refuses_a_downlink_it_must_not_train_on(proto, case):
    from meerkat_hf.federated import FederatedClient, LRSchedule, MessageError, ProtocolParams, state_digest
    from meerkat_hf.federated.protocol.codec import KIND_DENSE, KIND_RECORDS, Downlink, RoundRecords
    from meerkat_hf.federated.protocol.virtual_path import aggregate_zo_round

    wrapped, mask, _ = proto
    w0 = wrapped.base_values.clone()
    name, fields, reason = _downlink_cases(w0)[case]
    params = ProtocolParams(3, LRSchedule(fields.get("lr", 1e-3)))
    lr = float(np.float32(fields.get("lr", 1e-3)))
    if name == "record-overflow":
        fields["records"] = [r.__class__(**{**r.__dict__, "lrs": (lr,)}) for r in fields["records"]]
    client = FederatedClient(0, [[1, 2, 3]], None, batch_size=1, data_seed=0)
    if "dense" in fields:
        msg = Downlink(1, KIND_DENSE, bytes.fromhex(mask.checksum), mask.fingerprint, state_digest(fields["dense"]),
                       ((0, 3),), dense=fields["dense"])
        cache = None
    else:
        try:  # the digest of what the records produce, where it can be computed (a consistent lie)
            digest = state_digest(aggregate_zo_round(w0, fields["records"], params, 0)[0])
        except ValueError:
            digest = bytes(8)
        msg = Downlink(1, KIND_RECORDS, bytes.fromhex(mask.checksum), mask.fingerprint, digest, ((0, 3),),
                       from_round=0, history=(RoundRecords(0, tuple(fields["records"])),))
        cache = w0
    with pytest.raises(MessageError) as err:
        client.receive(msg.encode(), mask_checksum=mask.checksum, fingerprint=mask.fingerprint, params=params,
                       cache=cache, k=w0.numel())
    assert err.value.reason == reason, (name, str(err.value))


def test_driver_client_refuses_a_poisoned_dense_state(tmp_path, assets, monkeypatch):
    """A server whose dense state has NaN (with a matching digest) gets no client to train on it: every
    client drops out of the round with the reason, and the server's round is empty (its state unchanged)."""
    from meerkat_hf.federated.protocol import server as server_mod

    real = server_mod.FederatedServer.downlink

    def poisoned(self, kind, from_round=None):
        saved = self.values
        self.values = saved.clone()
        self.values[0] = float("nan")
        try:
            return real(self, server_mod.KIND_DENSE)
        finally:
            self.values = saved

    monkeypatch.setattr(server_mod.FederatedServer, "downlink", poisoned)
    res = run_federation(_config(tmp_path, assets, rounds=1, eval_every=1))
    row = res.metrics[0]
    assert row["accepted"] == [] and set(row["dropped"]) == {str(c) for c in row["participants"]}
    assert all("non-finite" in why for why in row["dropped"].values())


# -- 2. client identity ---------------------------------------------------------------------------
def test_a_client_cannot_speak_for_another(tmp_path, assets, caplog):
    """Client 0 forges a valid uplink signed as client 1 (right round, mask, start state, CRC) ahead of
    client 1's own: the transport knows whose channel it was, so the forgery is refused, not the genuine one."""
    from meerkat_hf.federated import decode_uplink
    from meerkat_hf.federated.protocol.codec import Uplink

    def tamper(r, cid, data):
        if cid != 0:
            return [data]
        up = decode_uplink(data)
        forged = Uplink(**{**up.__dict__, "client_id": 1, "grads": tuple(-g for g in up.grads)}).encode()
        return [forged, data]

    caplog.set_level(logging.WARNING)
    kw = dict(rounds=2, eval_every=2)
    honest = run_federation(_config(tmp_path / "a", assets, **kw))
    res = run_federation(_config(tmp_path / "b", assets, **kw), hooks=FederationHooks(tamper_uplink=tamper))
    for row in res.metrics:
        assert [(x["client_id"], x["reason"]) for x in row["rejected"]] == [(0, "sender-mismatch")]
        assert row["accepted"] == row["participants"]
    assert res.state_digest == honest.state_digest  # the forgery changed nothing
    assert "signed as client 1" in caplog.text


def test_a_model_folder_with_custom_code_is_refused_and_never_runs(tmp_path):
    """A base record may point at any folder: one whose config has an auto_map must not run its Python."""
    import json

    from federated_support import make_model_dir

    from meerkat_hf.hub.loading import load_model_and_tokenizer

    from pathlib import Path

    folder = Path(make_model_dir(tmp_path))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    import builtins

    def no_prompt(*a, **k):
        raise AssertionError("transformers asked whether to run the folder's code")

    real_input, builtins.input = builtins.input, no_prompt
    try:
        model, _ = load_model_and_tokenizer(str(folder))  # a known architecture: transformers' own class loads
    except ValueError as err:  # an unknown one: one line, nothing run
        assert "asks to run its own Python code" in str(err) and "\n" not in str(err)
    else:
        assert type(model).__module__.startswith("transformers.")
    finally:
        builtins.input = real_input
    assert not marker.exists()


def test_a_hash_list_cannot_make_the_loader_read_outside_the_delta_folder(tmp_path):
    import json

    from conftest import tiny_model

    from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model
    from meerkat_hf.masks.mask import config_content_sha256
    from meerkat_hf.modeling.model import DELTA_CONFIG_NAME, read_delta_config

    model = tiny_model()
    mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(method="random", density=0.01), progress=False))
    folder = tmp_path / "delta"
    mm.save_pretrained(folder)
    (tmp_path / "secret").write_text("not yours")
    cfg_path = folder / DELTA_CONFIG_NAME
    for name in ("../secret", "/etc/hostname", "sub/../../secret"):
        cfg = json.loads(cfg_path.read_text())
        cfg["files_sha256"][name] = "0" * 64
        cfg["config_sha256"] = config_content_sha256(cfg)  # a forger recomputes the plain content hash
        bad = tmp_path / f"bad{len(name)}"
        bad.mkdir()
        for f in folder.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / DELTA_CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="may only name files inside the delta folder"):
            read_delta_config(bad)
    assert read_delta_config(folder)["mask_checksum"] == mm.mask.checksum
