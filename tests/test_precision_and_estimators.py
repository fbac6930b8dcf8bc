"""bf16 forwards over the fp32 master (meerkat_hf.modeling.precision) and the fzoo estimator (zo.step_scalars)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_zo import _meerkat
from test_zo import _batch as _zo_batch

from meerkat_hf import zo
from meerkat_hf.modeling import precision
from meerkat_hf.trainer.arguments import MeerkatZOArguments

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=4, length=12, seed=0):
    return _zo_batch(n, length, seed)


@pytest.fixture(autouse=True)
def _fast_bf16(monkeypatch):
    """Pretend the hardware has a fast bf16 path (tests must not depend on the CPU's flags)."""
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device_type="cpu": 3.0)


# ------------------------------------------------------------------------------ forward precision
def test_bf16_mixed_keeps_the_master_fp32_and_casts_only_matrices():
    mm = _meerkat(exclude=[])  # norms may be masked too
    master = mm.values.clone()
    mm.set_forward_precision("bf16-mixed")
    dtypes = {name: p.dtype for name, p in mm.base_model.named_parameters()}
    assert all(d == (torch.bfloat16 if p.dim() >= 2 else torch.float32)
               for (name, d), p in zip(dtypes.items(), mm.base_model.parameters()))
    assert mm.values.dtype == torch.float32 and torch.equal(mm.values, master)  # the protocol's state untouched
    # the weights hold the master, rounded to each weight's dtype
    assert torch.equal(mm.sparse.gather(), torch.cat([
        s.param.detach().view(-1)[s.index].float() if s.index is not None else s.param.detach().view(-1).float()
        for s in mm.sparse.slices]))
    assert torch.allclose(mm.sparse.gather(), master, rtol=2 ** -8, atol=0)


def test_every_forward_path_runs_under_bf16_autocast():
    """The candidate loss calls the base model directly (not MeerkatModel.forward): it must get bf16 too."""
    from meerkat_hf.modeling.model import forward_module
    from meerkat_hf.tasks import candidate_loss

    mm = _meerkat()
    mm.set_forward_precision("bf16-mixed")
    seen = []
    layer = mm.base_model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu"))))
    batch = _batch()
    mm(**batch)
    classify = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"]),
                "label": torch.tensor([0, 1, 0, 1])}
    candidate_loss(forward_module(mm), classify, torch.tensor([5, 6]))
    candidate_loss(forward_module(mm), classify, torch.tensor([5, 6]), torch.tensor([0.7, 1.3]))  # balanced
    candidate_loss(forward_module(mm), classify, torch.tensor([5, 6]), reduction="none")  # DP's per-example losses
    mm.base_model.generate(batch["input_ids"][:1, :4], max_new_tokens=2, do_sample=False)
    handle.remove()
    assert len(seen) >= 5 and all(s == (torch.bfloat16, True) for s in seen), seen
    mm.set_forward_precision("fp32")
    out = mm(**batch)
    assert out.logits.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def test_bf16_finite_difference_still_estimates_the_gradient():
    """On a tiny model, the bf16-mixed SPSA estimate at eps 1e-2 correlates with the exact g.z (fp32 backprop)."""
    mm = _meerkat()
    batch = _batch(n=8)
    names = set(mm.mask.indices)
    params = dict(mm.base_model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    mm.base_model(**batch).loss.backward()
    g = torch.cat([params[n].grad.view(-1)[i] for n, i in mm.mask.indices.items()]).double()
    for n in names:
        params[n].grad = None
        params[n].requires_grad_(False)
    mm.set_forward_precision("bf16-mixed")
    dirs = [zo.gaussian_direction(zo.derive_seed(5, j), mm.num_selected) for j in range(24)]
    exact = torch.tensor([float(g @ z.double()) for z in dirs])
    est = torch.tensor([zo.projected_gradient(mm, lambda: mm(**batch).loss, z, 1e-2) for z in dirs])
    corr = torch.corrcoef(torch.stack([exact, est]))[0, 1]
    assert corr > 0.9, (corr, exact[:4], est[:4])


def test_slow_bf16_hardware_gets_one_warning_with_the_measured_speed(monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device_type="cpu": 0.21)
    mm = _meerkat()
    with caplog.at_level(logging.WARNING, logger="meerkat_hf.modeling.precision"):
        mm.set_forward_precision("bf16-mixed")
        mm.set_forward_precision("bf16-mixed")  # no second warning for the same setting
    warnings = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(warnings) == 1 and "0.21x the speed of fp32" in warnings[0], warnings


def test_unknown_precision_is_one_line():
    with pytest.raises(ValueError, match="forward precision must be one of"):
        precision.normalize_precision("int4")


# ------------------------------------------------------------------------------ the fzoo estimator
def test_fzoo_scalars_are_one_sided_differences_over_their_spread():
    """Against an independent computation: N + 1 forwards, c_j = (L_j - L_0) / std(L_1..L_N), weights restored."""
    mm = _meerkat()
    batch = _batch()
    calls = []

    def loss():
        calls.append(1)
        return mm(**batch).loss

    w = mm.values.clone()
    dirs = [zo.gaussian_direction(zo.derive_seed(3, j), mm.num_selected) for j in range(4)]
    got = zo.step_scalars(mm, loss, dirs, 1e-2, "fzoo")
    assert len(calls) == zo.forwards_per_step("fzoo", 4) == 5
    assert torch.equal(mm.sparse.gather(), w)

    def loss_at(values):
        mm.write(values)
        out = float(mm(**batch).loss)
        mm.write(w)
        return out

    base = loss_at(w)
    perturbed = [loss_at(w + 1e-2 * z) for z in dirs]
    mean = sum(perturbed) / 4
    spread = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / 4)
    assert got == pytest.approx([(x - base) / spread for x in perturbed], rel=1e-9)
    # the step moves downhill: the loss after a small fzoo step falls
    zo.apply_step(mm.values, zo.ZOStep(tuple(range(4)), tuple(got), 1e-3), directions=dirs)
    mm.sync_weights()
    assert float(mm(**batch).loss) < base


def test_fzoo_step_with_no_spread_is_skipped_and_spsa_is_unchanged():
    mm = _meerkat()
    dirs = [zo.gaussian_direction(j, mm.num_selected) for j in range(3)]
    assert zo.step_scalars(mm, lambda: 1.0, dirs, 1e-3, "fzoo") is None
    batch = _batch()
    spsa = zo.step_scalars(mm, lambda: mm(**batch).loss, dirs, 1e-3, "spsa")
    assert spsa == [zo.projected_gradient(mm, lambda: mm(**batch).loss, z, 1e-3) for z in dirs]
    nan = zo.step_scalars(mm, lambda: float("nan"), dirs, 1e-3, "fzoo")
    assert len(nan) == 3 and all(math.isnan(x) for x in nan)


def test_estimator_settings_are_checked_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="N >= 2"):
        MeerkatZOArguments(output_dir=str(tmp_path), zo_estimator="fzoo", zo_num_perturbations=1)
    with pytest.raises(ValueError, match="one of spsa, fzoo"):
        MeerkatZOArguments(output_dir=str(tmp_path), zo_estimator="adam")
    with pytest.raises(ValueError, match="zo_estimator='spsa'"):
        MeerkatZOArguments(output_dir=str(tmp_path), zo_estimator="fzoo", zo_num_perturbations=2, dp_clip=1.0,
                           dp_noise_multiplier=1.0)


# ------------------------------------------------------------------------------ the protocol
@pytest.mark.parametrize("estimator,forward", [("fzoo", "fp32"), ("spsa", "bf16-mixed"), ("fzoo", "bf16-mixed")])
def test_server_replays_fzoo_and_bf16_clients_bit_for_bit(estimator, forward):
    """Whatever the forwards' precision or the estimator, the uplink's scalars replay to the client's exact bits."""
    from conftest import build_tiny_tokenizer, make_corpus
    from meerkat_hf.federated import FederatedClient, FederatedServer, LRSchedule, ProtocolParams, state_digest

    tok = build_tiny_tokenizer()
    mm = _meerkat()
    mm.set_forward_precision(forward)
    enc = [tok(t)["input_ids"] for t in make_corpus(40, seed=3)]

    def collate(feats):
        n = max(len(f) for f in feats)
        return {"input_ids": torch.tensor([f + [3] * (n - len(f)) for f in feats]),
                "attention_mask": torch.tensor([[1] * len(f) + [0] * (n - len(f)) for f in feats]),
                "labels": torch.tensor([f + [-100] * (n - len(f)) for f in feats])}

    params = ProtocolParams(11, LRSchedule(1e-3), q=3)
    server = FederatedServer(mm.base_values, mm.mask.checksum, mm.mask.fingerprint, params, num_clients=2,
                             pretrain_grad=mm.mask.pretrain_grad, keep_client_finals=True)
    server.begin_round(0, {0: 3, 1: 3})
    finals = {}
    for cid in (0, 1):
        client = FederatedClient(cid, enc[cid * 20:(cid + 1) * 20], collate, batch_size=4, data_seed=5)
        res = client.train_zo(mm, server.values, 0, 3, params, mm.mask.checksum, 1e-2, keep_final=True,
                              estimator=estimator)
        assert res.nan_steps == 0
        finals[cid] = res.final_values
        assert server.receive(res.uplink) is None
    summary = server.finish_round()
    assert summary.accepted == [0, 1]
    for cid, final in finals.items():
        assert torch.equal(summary.finals[cid], final)
        assert not torch.equal(final, mm.base_values)
        assert next(p for p in summary.paths if p.client_id == cid).final_digest == state_digest(final)


# ------------------------------------------------------------------------------ the Trainer
def test_trainer_bf16_runs_every_loss_in_bf16_and_fzoo_learns(tmp_path):
    """`bf16=True` reaches the candidate loss's forwards (a hook sees bf16 under autocast), `zo_estimator="fzoo"`
    spends N + 1 forwards a step, the run is recorded, and the toy task is learned without a .grad."""
    from test_trainer import cyclic_dataset, zo_args

    from meerkat_hf.trainer import MeerkatZOTrainer

    mm = _meerkat()
    seen, forwards = [], []
    layer = mm.base_model.model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda mod, args, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu"))))
    mm.base_model.register_forward_hook(lambda *a: forwards.append(1))
    data = cyclic_dataset()
    args = zo_args(tmp_path, bf16=True, zo_estimator="fzoo", zo_num_perturbations=4, learning_rate=5e-2,
                   max_steps=40, zo_eps=1e-2)
    trainer = MeerkatZOTrainer(model=mm, args=args, train_dataset=data)
    batch = {k: torch.tensor(data[:16][k]) for k in ("input_ids", "attention_mask", "labels")}
    before = float(mm(**batch).loss)
    forwards.clear()
    trainer.train()
    assert len(forwards) == 40 * 5  # N + 1 forwards per step
    assert mm.forward_precision == "bf16-mixed"
    assert seen and all(s == (torch.bfloat16, True) for s in seen)
    assert all(p.grad is None for p in mm.parameters())
    after = float(mm(**batch).loss)
    assert after < before - 0.05, (before, after)
    trainer.save_model(str(tmp_path / "out"))
    import json
    training = json.loads((tmp_path / "out" / "meerkat_config.json").read_text())["training"]
    assert training["zo_estimator"] == "fzoo" and training["forward_precision"] == "bf16-mixed"


def test_bf16_throughput_benchmark_runs_both_paths(tmp_path):
    """`benchmarks/bf16_throughput.py` on a tiny model: both paths timed, ratios and the CPU's capability recorded."""
    import json

    from conftest import load_script
    from federated_support import make_model_dir

    bench = load_script("benchmarks/bf16_throughput.py")
    out = tmp_path / "r.json"
    result = bench.main(["--model", make_model_dir(tmp_path), "--steps", "1", "--batch-size", "2", "--seq-len", "8",
                         "--density", "0.01", "--json", str(out)])
    assert set(result["median_s_per_step"]) == {"trainer:fp32", "trainer:bf16", "client:fp32", "client:bf16"}
    assert result["trainer_speedup_bf16"] > 0 and result["client_speedup_bf16"] > 0
    assert json.loads(out.read_text())["cpu_capability"] == result["cpu_capability"]


def test_stacked_forward_benchmark_times_both_forms(tmp_path):
    from conftest import load_script
    from federated_support import make_model_dir

    bench = load_script("benchmarks/stacked_forward.py")
    rows = bench.main(["--model", make_model_dir(tmp_path), "--n", "1", "3", "--batch-size", "2", "--seq-len", "8",
                       "--repeats", "1", "--dtypes", "float32", "bfloat16", "--json", str(tmp_path / "r.json")])
    assert [(r["dtype"], r["n"]) for r in rows] == [("float32", 1), ("float32", 3), ("bfloat16", 1), ("bfloat16", 3)]
    assert all(r["sequential_s"] > 0 and r["stacked_s"] > 0 for r in rows)


def test_bf16_with_an_eps_below_its_resolution_warns(tmp_path, caplog):
    from test_trainer import cyclic_dataset, zo_args

    from meerkat_hf.trainer import MeerkatZOTrainer

    with caplog.at_level(logging.WARNING, logger="meerkat_hf.modeling.precision"):
        MeerkatZOTrainer(model=_meerkat(), args=zo_args(tmp_path, bf16=True, zo_eps=1e-3), train_dataset=cyclic_dataset())
    assert "bf16 forwards with eps=0.001" in caplog.text and "use eps >= 0.01" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meerkat_hf.modeling.precision"):
        MeerkatZOTrainer(model=_meerkat(), args=zo_args(tmp_path, bf16=True, zo_eps=1e-2), train_dataset=cyclic_dataset())
        assert not precision.warn_if_eps_below_bf16_resolution("fp32", 1e-4)
    assert "bf16 forwards with eps" not in caplog.text


def test_fp32_forwards_on_cuda_without_tf32_get_one_warning(monkeypatch, caplog):
    mm = _meerkat()
    assert not precision.warn_if_fp32_on_cuda(mm.base_model, "fp32")  # a CPU model: nothing to say
    monkeypatch.setattr(precision, "model_device", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(precision, "tf32_enabled", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert precision.warn_if_fp32_on_cuda(mm.base_model, "fp32")
    assert "NVIDIA H100" in caplog.text and "tensor cores idle" in caplog.text and "bf16=True" in caplog.text
    assert not precision.warn_if_fp32_on_cuda(mm.base_model, "bf16-mixed")  # the user already chose bf16
    monkeypatch.setattr(precision, "tf32_enabled", lambda: True)
    assert not precision.warn_if_fp32_on_cuda(mm.base_model, "fp32")  # TF32 uses the tensor cores
