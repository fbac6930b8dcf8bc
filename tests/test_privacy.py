"""Differential privacy (issue 14): clipping bounds influence, the accountant is Opacus's, the
noised scalar replays bit-exactly, central noise is identical on every replica, bad settings fail early."""

from __future__ import annotations

import json
import math

import pytest
import torch

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf import privacy
from meerkat_hf.privacy import ExampleDP, clipped_mean, private_generator, private_scalar


# -- the private scalar (no accountant needed) ---------------------------------------------------
def test_clipping_bounds_each_examples_influence():
    """Change one example arbitrarily: the pre-noise scalar moves by at most 2 C / B."""
    torch.manual_seed(0)
    clip, batch = 0.5, 8
    base = torch.randn(batch, dtype=torch.float64) * 3
    for value in (1e6, -1e6, float("nan"), float("inf"), 0.0, 0.49):
        changed = base.clone()
        changed[3] = value
        a, _ = clipped_mean(base, clip, batch)
        b, _ = clipped_mean(changed, clip, batch)
        assert abs(a - b) <= 2 * clip / batch + 1e-15
    # and the bound is attained: one example from -C to +C
    lo, hi = base.clone(), base.clone()
    lo[0], hi[0] = -100.0, 100.0
    assert clipped_mean(hi, clip, batch)[0] - clipped_mean(lo, clip, batch)[0] == pytest.approx(2 * clip / batch)
    # removing an example (Poisson neighbours): at most C / B
    assert abs(clipped_mean(base, clip, batch)[0] - clipped_mean(base[1:], clip, batch)[0]) <= clip / batch + 1e-15


def test_private_scalar_noise_has_the_stated_std_and_is_private():
    dp = ExampleDP(clip=1.0, noise_multiplier=2.0, batch_size=4, num_examples=100)
    assert dp.noise_std == pytest.approx(0.5) and dp.sample_rate == pytest.approx(0.04)
    zeros = torch.zeros(4, dtype=torch.float64)
    gen = private_generator(123)
    draws = torch.tensor([private_scalar(zeros, dp, gen)[0] for _ in range(4000)])
    assert float(draws.std()) == pytest.approx(0.5, rel=0.05) and abs(float(draws.mean())) < 0.03
    # seeded from secrets: two generators without a seed disagree
    assert private_scalar(zeros, dp, private_generator())[0] != private_scalar(zeros, dp, private_generator())[0]


def test_poisson_batches_have_the_expected_size():
    gen = private_generator(7)
    sizes = [len(privacy.poisson_indices(200, 0.05, gen)) for _ in range(2000)]
    assert sum(sizes) / len(sizes) == pytest.approx(10, rel=0.05)
    assert 0 in sizes or min(sizes) <= 3  # sizes vary: Poisson, not fixed
    assert privacy.poisson_indices(5, 1.0, gen) == [0, 1, 2, 3, 4]


def test_per_example_losses_match_the_batch_losses(tiny_llama, tiny_tokenizer):
    from meerkat_hf.tasks import candidate_loss

    model, tok = tiny_llama.eval(), tiny_tokenizer
    batch = tok(["good movie", "bad plot here", "a"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    per = privacy.causal_lm_per_example_loss(model, batch)
    assert per.shape == (3,)
    # token-weighted mean of per-example means == the model's own loss
    counts = (labels[:, 1:] != -100).sum(1).double()
    assert float((per.double() * counts).sum() / counts.sum()) == pytest.approx(float(model(**batch).loss.detach()), rel=1e-5)
    cand = torch.tensor([5, 6])
    cbatch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "label": torch.tensor([0, 1, 1])}
    per_c = candidate_loss(model, cbatch, cand, reduction="none")
    assert per_c.shape == (3,) and float(per_c.mean()) == pytest.approx(float(candidate_loss(model, cbatch, cand)), rel=1e-6)
    w = torch.tensor([2.0, 0.5])
    per_w = candidate_loss(model, cbatch, cand, w, reduction="none")
    assert torch.allclose(per_w, per_c * w[cbatch["label"]])


# -- accounting (Opacus) ----------------------------------------------------------------------------
def test_our_epsilons_are_the_librarys():
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    for sigma, q, steps, delta in ((1.0, 0.01, 1000, 1e-5), (0.8, 0.1, 50, 1e-6), (4.0, 1.0, 10, 1e-5)):
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert privacy.gaussian_epsilon(sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    # a known setting (Abadi et al.'s MNIST scale): sigma 1.1, q 256/60000, 60 epochs -> epsilon ~ 3
    assert 2.5 < privacy.gaussian_epsilon(1.1, 256 / 60000, int(60 * 60000 / 256), 1e-5) < 3.5
    sigma = privacy.solve_noise_multiplier(3.0, 1e-5, 0.05, 300)
    assert privacy.gaussian_epsilon(sigma, 0.05, 300, 1e-5) <= 3.0
    assert privacy.gaussian_epsilon(sigma, 0.05, 300, 1e-5) > 2.9
    assert sigma == pytest.approx(get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05,
                                                       steps=300, epsilon_tolerance=0.03), rel=0.05)
    with pytest.raises(ValueError, match="unreachable"):
        privacy.solve_noise_multiplier(0.01, 1e-5, 0.05, 300)


def test_solving_for_a_target_epsilon_does_not_warn_about_the_searchs_own_probes(recwarn):
    # Opacus's search probes multipliers large enough that their best RDP order is its largest one and
    # warns; the study's settings (10 clients' sample rates, 30 steps each) triggered it on every run
    pytest.importorskip("opacus")
    sigma = privacy.solve_noise_multiplier(3.0, 1e-5, 8 / 1850, 30)
    assert sigma > 0 and not [w for w in recwarn if "largest alpha" in str(w.message)]


# -- federated ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    return root, make_model_dir(root), make_task_files(root)


def _config(tmp_path, assets, **kw):
    from meerkat_hf.federated import FederationConfig

    _, model_dir, files = assets
    return FederationConfig.from_dict(base_config(tmp_path, model_dir, files, **kw))


@pytest.mark.parametrize("dp,message", [
    ({"clip": 0}, "dp.clip must be a finite number > 0"),
    ({"clip": -1, "noise_multiplier": 1}, "dp.clip must be a finite number > 0"),
    ({"clip": 1, "noise_multiplier": 0}, "dp.noise_multiplier must be a finite number > 0"),
    ({"clip": 1, "noise_multiplier": -2}, "dp.noise_multiplier must be a finite number > 0"),
    ({"clip": 1}, "give exactly one of dp.noise_multiplier and dp.target_epsilon"),
    ({"clip": 1, "noise_multiplier": 1, "target_epsilon": 3}, "give exactly one of"),
    ({"clip": 1, "noise_multiplier": 1, "delta": 0}, "dp.delta must be in (0, 1)"),
    ({"clip": 1, "noise_multiplier": 1, "delta": 1.5}, "dp.delta must be in (0, 1)"),
    ({"central_noise_multiplier": 0}, "dp.central_noise_multiplier must be a finite number > 0"),
])
def test_bad_dp_settings_fail_at_config_time(tmp_path, assets, dp, message):
    from meerkat_hf.federated import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, assets, dp=dp)


def test_unreachable_target_epsilon_fails_before_training(tmp_path, assets):
    pytest.importorskip("opacus")
    from meerkat_hf.federated import ConfigError

    with pytest.raises(ConfigError, match="unreachable"):
        _config(tmp_path, assets, dp={"clip": 1, "target_epsilon": 0.01})
    with pytest.raises(ConfigError, match="needs the per-client update bound"):
        _config(tmp_path, assets, dp={"central_noise_multiplier": 1}, validation={"max_update_ratio": None})
    with pytest.raises(ConfigError, match="ZO algorithms"):
        _config(tmp_path, assets, algorithm="fo-fedavg", dp={"clip": 1, "noise_multiplier": 1})
    # a reachable target is solved per client from its own sample rate, for the run's worst-case step count
    from meerkat_hf.federated.assets import client_noise_multiplier, planned_steps

    cfg = _config(tmp_path, assets, dp={"clip": 1, "target_epsilon": 2.0})
    sigma = client_noise_multiplier(cfg, 24)
    assert privacy.gaussian_epsilon(sigma, cfg.batch_size / 24, planned_steps(cfg), 1e-5) <= 2.0
    assert client_noise_multiplier(cfg, 12) > sigma  # a smaller client samples more often: more noise


def test_dp_federation_replays_exactly_and_reports_epsilon(tmp_path, assets):
    """Example-level + central noise: the server's replay matches every client bit for bit, epsilon is
    reported in every row, the report and the card, and equals the library's for the steps taken."""
    pytest.importorskip("opacus")
    from meerkat_hf.federated.driver import run_federation
    from meerkat_hf.federated.engine import RoundEngine  # noqa: F401
    from meerkat_hf.federated.reporting import format_report

    dp = {"clip": 2.0, "noise_multiplier": 1.5, "delta": 1e-5, "central_noise_multiplier": 0.5}
    cfg = _config(tmp_path, assets, dp=dp, rounds=2, client_fraction=0.75, save_final=True)
    res = run_federation(cfg)
    rows = res.metrics
    assert all(r["replay_mismatches"] == [] and not r["rejected"] for r in rows)
    # clients rebuilt every noised aggregate from the records themselves (a digest mismatch would fall back to dense)
    assert all(not r["downlink_fallbacks"] and set(r["downlink_kinds"].values()) <= {"records"} for r in rows)
    assert all(v is None or math.isnan(v) for r in rows for v in r["train_loss"].values())  # no clean loss leaves
    sizes = dict(enumerate(json.loads((tmp_path / "run" / "run_info.json").read_text())["client_sizes"]))
    steps = {}
    for r in rows:
        for c in r["participants"]:
            steps[c] = steps.get(c, 0) + cfg.local_steps
        for c, eps in r["dp_epsilon_clients"].items():
            want = privacy.gaussian_epsilon(1.5, min(1.0, cfg.batch_size / sizes[int(c)]), steps[int(c)], 1e-5)
            assert eps == pytest.approx(want, rel=1e-12)
        assert r["dp_epsilon"] == max(r["dp_epsilon_clients"].values()) and r["dp_delta"] == 1e-5
        assert r["dp_user_epsilon"] > 0
    assert rows[1]["dp_epsilon"] > rows[0]["dp_epsilon"]
    report = format_report(res)
    assert "example-level DP: epsilon" in report and "user-level DP" in report
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "example-level" in card and "Dp epsilon" in card


def test_central_noise_is_the_same_on_every_replica_and_client():
    """Server replicas and a client replaying the round's records reach the same bits; the noise
    has the stated scale and is absent without the setting."""
    from meerkat_hf.federated.protocol.virtual_path import (
        LRSchedule, ProtocolParams, add_central_noise, aggregate_zo_round, central_noise_std, fedavg_finals,
        replay_client, client_steps, update_bound)
    from meerkat_hf.federated.protocol.codec import Record

    torch.manual_seed(0)
    w = torch.randn(500)
    bound = update_bound(w, 0.1)
    assert bound == pytest.approx(0.1 * float(w.double().norm()), rel=1e-12)
    params = ProtocolParams(7, LRSchedule(1e-2), central_noise=2.0 * bound)
    records = [Record(0, 30, 1, (0.5, -0.25), ()), Record(2, 10, 1, (1.0, 0.1), ())]
    finals = {r.client_id: replay_client(w, client_steps(params, 3, r.client_id, r.grads, 1, r.lrs))[0] for r in records}
    server = fedavg_finals(w, records, finals, params, 3)
    client, _, _ = aggregate_zo_round(w, records, params, 3)
    assert torch.equal(server, client)
    plain = fedavg_finals(w, records, finals)
    std = central_noise_std(params, {0: 30, 2: 10})
    assert std == pytest.approx(2.0 * bound * 0.75)
    assert float((server.double() - plain.double()).std()) == pytest.approx(std, rel=0.1)
    assert not torch.equal(add_central_noise(plain, params, 4, {0: 30}), add_central_noise(plain, params, 3, {0: 30}))
    noiseless = ProtocolParams(7, LRSchedule(1e-2))
    assert torch.equal(aggregate_zo_round(w, records, noiseless, 3)[0], plain)


# -- MeerkatZOTrainer ---------------------------------------------------------------------------------
def test_trainer_dp_applies_the_noised_scalars_and_logs_epsilon(tmp_path, one_thread):
    """A DP run: Poisson batches (empty ones included), every step's scalar is noised, the history
    replays the model bit for bit, epsilon is logged and equals the library's for the steps taken."""
    pytest.importorskip("opacus")
    from test_trainer import cyclic_dataset, meerkat, zo_args
    from meerkat_hf import zo
    from meerkat_hf.trainer import MeerkatZOTrainer

    model = meerkat()
    start = model.values.clone()
    # 8 examples, batch 2: q = 0.25 (an empty draw, P = 0.1 a step, is a noise-only step)
    args = zo_args(tmp_path, max_steps=12, per_device_train_batch_size=2, logging_steps=4,
                   dp_clip=1.0, dp_noise_multiplier=1.0, dp_noise_seed=3)
    trainer = MeerkatZOTrainer(model=model, args=args, train_dataset=cyclic_dataset(8))
    trainer.train()
    history = trainer.zo_optimizer.history
    assert len(history) == 12 and all(math.isfinite(s.grads[0]) for s in history)
    assert torch.equal(zo.replay(start, history), model.values)
    logged = [h for h in trainer.state.log_history if "dp_epsilon" in h]
    assert [h["step"] for h in logged] == [4, 8, 12]
    assert logged[-1]["dp_epsilon"] == pytest.approx(privacy.gaussian_epsilon(1.0, 0.25, 12, 1e-5), rel=1e-12)
    assert logged[0]["dp_epsilon"] < logged[-1]["dp_epsilon"]
    # the same private seed reproduces the run; the noise is real (|g| is not bounded by clip / batch)
    model2 = meerkat()
    MeerkatZOTrainer(model=model2, args=args, train_dataset=cyclic_dataset(8)).train()
    assert torch.equal(model2.values, model.values)


def test_trainer_dp_target_epsilon_and_bad_settings(tmp_path, one_thread):
    pytest.importorskip("opacus")
    from test_trainer import cyclic_dataset, meerkat, zo_args
    from meerkat_hf.trainer import MeerkatZOTrainer

    for bad, message in (({"dp_clip": 0, "dp_noise_multiplier": 1}, "dp_clip must be a finite number > 0"),
                         ({"dp_clip": 1, "dp_noise_multiplier": -1}, "dp_noise_multiplier must be a finite number > 0"),
                         ({"dp_clip": 1, "dp_noise_multiplier": 1, "dp_delta": 1}, "dp_delta must be in (0, 1)"),
                         ({"dp_clip": 1}, "give exactly one of dp_noise_multiplier and dp_target_epsilon"),
                         ({"dp_clip": 1, "dp_noise_multiplier": 1, "gradient_accumulation_steps": 2},
                          "gradient_accumulation_steps=1")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            zo_args(tmp_path, **bad)
    model = meerkat()
    trainer = MeerkatZOTrainer(model=model, args=zo_args(tmp_path, max_steps=3, dp_clip=1.0, dp_target_epsilon=0.01),
                               train_dataset=cyclic_dataset(16))
    before = model.values.clone()
    with pytest.raises(ValueError, match="unreachable"):
        trainer.train()
    assert torch.equal(model.values, before)  # refused before the first step
    trainer = MeerkatZOTrainer(model=model, args=zo_args(tmp_path, max_steps=3, dp_clip=1.0, dp_target_epsilon=2.0),
                               train_dataset=cyclic_dataset(16))
    trainer.train()
    assert trainer.dp_epsilon() <= 2.0 and trainer.dp.noise_multiplier > 0


def _dp_trainer_run(output_dir, resume=None, data=None, **overrides):
    from test_trainer import cyclic_dataset, meerkat, zo_args
    from meerkat_hf.trainer import MeerkatZOTrainer

    model = meerkat()
    settings = dict(max_steps=6, per_device_train_batch_size=2, save_strategy="steps", save_steps=3,
                    dp_clip=1.0, dp_noise_multiplier=1.0, dp_noise_seed=3)
    settings.update(overrides)
    trainer = MeerkatZOTrainer(model=model, args=zo_args(output_dir, **{k: v for k, v in settings.items() if v is not None}),
                               train_dataset=data if data is not None else cyclic_dataset(8))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_trainer_dp_resume_draws_fresh_noise_and_is_the_uninterrupted_run(tmp_path, one_thread, monkeypatch):
    """Every step has its own private streams (noise, Poisson batch) keyed by the global step: a
    resumed run never re-draws released noise, and a seeded run resumed mid-epoch (step 3 of a 4-step
    epoch) is the uninterrupted run bit for bit."""
    pytest.importorskip("opacus")
    from meerkat_hf.trainer import dp_resume as trainer_privacy

    keys = {"noise": [], "batch": []}
    real_scalar, real_poisson = privacy.private_scalar, privacy.poisson_indices

    def scalar(per_example, dp, generator):
        keys["noise"].append(generator.initial_seed())
        return real_scalar(per_example, dp, generator)

    def poisson(n, rate, generator):
        keys["batch"].append(generator.initial_seed())
        return real_poisson(n, rate, generator)

    monkeypatch.setattr(privacy, "private_scalar", scalar)
    monkeypatch.setattr(privacy, "poisson_indices", poisson)
    full, trainer = _dp_trainer_run(tmp_path / "a")
    first = {k: list(v) for k, v in keys.items()}
    assert len(set(first["noise"])) == 6 and len(set(first["batch"])) >= 6  # one stream per step, none shared
    assert json.loads((tmp_path / "a" / "checkpoint-3" / trainer_privacy.DP_STATE_NAME).read_text())["clip"] == 1.0

    for k in keys:
        keys[k].clear()
    resumed, trainer2 = _dp_trainer_run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert keys["noise"] == first["noise"][3:]  # steps 4-6: their own streams, not steps 1-3's again
    assert torch.equal(resumed.values, full.values)
    assert trainer2.dp_epsilon() == pytest.approx(trainer.dp_epsilon(), rel=1e-12)


def test_trainer_dp_resume_refuses_other_privacy_settings(tmp_path, one_thread):
    """Resuming with another clip, delta, multiplier or seed, with DP switched on or off, or (with a
    target epsilon) with more steps than the noise was solved for is refused before any step; a fixed
    multiplier may be extended, and its epsilon composes over every step."""
    pytest.importorskip("opacus")
    from test_trainer import meerkat, zo_args
    from meerkat_hf.trainer import MeerkatZOTrainer

    _dp_trainer_run(tmp_path / "a")
    ckpt = str(tmp_path / "a" / "checkpoint-3")
    for change, message in (({"dp_clip": 2.0}, "clip"), ({"dp_delta": 1e-6}, "delta"),
                            ({"dp_noise_multiplier": 2.0}, "noise_multiplier"), ({"dp_noise_seed": 4}, "noise_seed"),
                            ({"dp_clip": None, "dp_noise_multiplier": None, "dp_noise_seed": None},
                             "without differential privacy")):
        model = meerkat()
        before = model.values.clone()
        settings = dict(max_steps=6, per_device_train_batch_size=2, dp_clip=1.0, dp_noise_multiplier=1.0, dp_noise_seed=3)
        settings.update(change)
        from test_trainer import cyclic_dataset
        trainer = MeerkatZOTrainer(model=model, args=zo_args(tmp_path / "x", **{k: v for k, v in settings.items()
                                                                              if v is not None}),
                                   train_dataset=cyclic_dataset(8))
        with pytest.raises(ValueError, match=message):
            trainer.train(resume_from_checkpoint=ckpt)
        assert torch.equal(model.values, before)

    _dp_trainer_run(tmp_path / "plain", dp_clip=None, dp_noise_multiplier=None, dp_noise_seed=None)
    with pytest.raises(ValueError, match="trained without it"):
        _dp_trainer_run(tmp_path / "y", resume=str(tmp_path / "plain" / "checkpoint-3"))

    old = tmp_path / "old"  # a private checkpoint of a build that wrote no dp_state.json
    import shutil
    shutil.copytree(ckpt, old)
    (old / "dp_state.json").unlink()
    with pytest.raises(ValueError, match="older meerkat-hf"):
        _dp_trainer_run(tmp_path / "v", resume=str(old))

    _dp_trainer_run(tmp_path / "target", dp_noise_multiplier=None, dp_target_epsilon=8.0)
    with pytest.raises(ValueError, match="planned steps"):
        _dp_trainer_run(tmp_path / "z", resume=str(tmp_path / "target" / "checkpoint-3"), max_steps=9,
                        dp_noise_multiplier=None, dp_target_epsilon=8.0)
    _, longer = _dp_trainer_run(tmp_path / "w", resume=ckpt, max_steps=9)
    assert longer.state.global_step == 9
    assert longer.dp_epsilon() == pytest.approx(privacy.gaussian_epsilon(1.0, 0.25, 9, 1e-5), rel=1e-12)


def test_private_federation_example_runs(tmp_path, capsys):
    """examples/configs/private_federation.yaml, as its comment runs it, on a tiny model."""
    pytest.importorskip("opacus")
    from pathlib import Path

    from meerkat_hf.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "configs" / "private_federation.yaml"
    assert main(["federate", "--config", str(example), "--model", make_model_dir(tmp_path), "--output-dir",
                 str(tmp_path / "run"), "--set", "rounds=1", "--set", "num_clients=4", "--set", "eval_examples=16",
                 "--set", "task.max_train_examples=120", "--set", "mask.calibration_num_sequences=4",
                 "--set", "mask.calibration_seq_len=32", "--set", "progress=false", "--set", "plots=false",
                 "--set", "device=cpu", "--set", "dp.central_noise_multiplier=1.0"]) == 0
    report = capsys.readouterr().out
    assert "example-level DP: epsilon" in report and "user-level DP" in report
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < row["dp_epsilon"] <= 3.0 and row["dp_user_epsilon"] > 0
