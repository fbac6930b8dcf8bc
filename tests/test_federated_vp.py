"""Meerkat-VP: the detector on synthetic GradIP sequences, the scheduler, and a real federation
where single-label clients' GradIP decays and they get flagged."""

from __future__ import annotations

import math

import numpy as np
import pytest

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import FederationConfig, GradIPDetector, StepScheduler, VPConfig, evaluate_trajectories


def _decaying(rng, n=30, rate=0.25):
    return list(rng.standard_normal(n) * np.exp(-rate * np.arange(n)))


def _oscillating(rng, n=30):
    return list(rng.standard_normal(n))


def test_detector_flags_decay_and_not_oscillation():
    rng = np.random.default_rng(0)
    cfg = VPConfig()
    for _ in range(20):
        assert evaluate_trajectories([_decaying(rng)], cfg).flagged
        assert not evaluate_trajectories([_oscillating(rng)], cfg).flagged
    d = evaluate_trajectories([_decaying(rng)], cfg, client_id=3, round_id=0)
    assert d.ratio < cfg.ratio_threshold and "extreme Non-IID" in d.reason and d.client_id == 3
    assert d.early_mean_abs > d.late_mean_abs and d.num_steps == 30


def test_detector_rules_thresholds_and_degenerate_inputs():
    flat_then_quiet = [1.0] * 10 + [0.5] * 10 + [0.001] * 10  # ratio small, quiet high
    half_quiet = [1.0] * 20 + [1e-4, 1.0] * 5  # late window (9 steps): ratio 0.56, 4/9 quiet
    assert evaluate_trajectories([flat_then_quiet], VPConfig(rule="all")).flagged
    assert not evaluate_trajectories([half_quiet], VPConfig(rule="any")).flagged
    assert evaluate_trajectories([half_quiet], VPConfig(rule="quiet", quiet_fraction=0.4)).flagged
    assert evaluate_trajectories([half_quiet], VPConfig(rule="ratio", ratio_threshold=0.6)).flagged
    assert evaluate_trajectories([half_quiet], VPConfig(quiet_tau=2.0)).flagged  # absolute tau
    zero = evaluate_trajectories([[0.0] * 10], VPConfig())
    assert not zero.flagged and math.isnan(zero.ratio) and "no signal" in zero.reason
    # pooled over several calibration rounds
    rng = np.random.default_rng(1)
    assert evaluate_trajectories([_decaying(rng, 10, 0.6), _decaying(rng, 10, 0.6)], VPConfig()).flagged
    with pytest.raises(ValueError):
        VPConfig(rule="most")
    with pytest.raises(ValueError):
        VPConfig(early_fraction=0)


def test_detector_waits_for_its_window_and_min_steps():
    det = GradIPDetector(VPConfig(calibration_participations=2, min_steps=4))
    rng = np.random.default_rng(2)
    assert det.observe(0, 5, _decaying(rng, 10)) is None and det.in_calibration(5)
    d = det.observe(3, 5, _decaying(rng, 10))
    assert d is not None and d.flagged and d.round == 3 and not det.in_calibration(5)
    assert det.observe(4, 5, _oscillating(rng)) is None  # decisions are final
    short = GradIPDetector(VPConfig(min_steps=4))
    d = short.observe(0, 1, [1.0, 0.0])
    assert not d.flagged and "not judged" in d.reason
    state = det.state_dict()
    det2 = GradIPDetector(VPConfig(calibration_participations=2))
    det2.load_state_dict(state)
    assert det2.decisions[5].flagged and det2.trajectories == det.trajectories


def test_scheduler_budgets_vp_and_random_control():
    rng = np.random.default_rng(3)
    cfg = VPConfig(calibration_local_steps=20, limited_steps=1)
    vp = StepScheduler("vp", local_steps=10, config=cfg, seed=0)
    assert vp.budgets([0, 1, 2, 3]) == {0: 20, 1: 20, 2: 20, 3: 20}  # calibration rounds
    traj = {0: _oscillating(rng, 20), 1: _decaying(rng, 20), 2: _oscillating(rng, 20), 3: _decaying(rng, 20)}
    info = vp.observe_round(0, traj)
    assert info["newly_limited"] == [1, 3] and len(info["decided"]) == 4
    assert vp.budgets([0, 1, 2, 3]) == {0: 10, 1: 1, 2: 10, 3: 1}

    rnd = StepScheduler("random", local_steps=10, config=cfg, seed=0)
    info = rnd.observe_round(0, traj)
    assert len(info["newly_limited"]) == 2  # as many as VP would flag, chosen at random
    assert sorted(rnd.budgets([0, 1, 2, 3]).values()) == [1, 1, 10, 10]
    again = StepScheduler("random", local_steps=10, config=cfg, seed=0)
    assert again.observe_round(0, traj)["newly_limited"] == info["newly_limited"]  # seeded

    fixed = StepScheduler("random", local_steps=10, config=VPConfig(random_count=3), seed=1)
    assert not fixed.needs_gradip
    assert len(fixed.start(10)) == 3 and sorted(fixed.budgets(list(range(10))).values()).count(1) == 3
    none = StepScheduler("none", local_steps=7)
    assert none.budgets([0, 1]) == {0: 7, 1: 7} and none.observe_round(0, traj)["newly_limited"] == []


def test_meerkat_vp_flags_single_label_clients_end_to_end(tmp_path):
    """Real dynamics on a tiny random model: two IID clients, two single-label clients.

    The mask is restricted to lm_head rows (a calibrated sensitivity mask with g_p), where a
    single-label client can fit its label within a round: its projected gradients and hence its
    GradIP decay to ~0, while the IID clients' GradIP keeps oscillating. Round 0 is the
    calibration window; from round 1 on the flagged clients run one step, and their data pointer
    keeps moving.
    """
    from meerkat_hf.federated import run_federation

    model_dir = make_model_dir(tmp_path)
    files = make_task_files(tmp_path, 160, 32)
    cfg = FederationConfig.from_dict(base_config(
        tmp_path, model_dir, files, algorithm="meerkat-vp", num_clients=4, rounds=2, local_steps=40, lr=0.3,
        max_length=48, seed=1, eval_every=2, plots=True,
        partition={"scheme": "iid", "num_single_label_clients": 2},
        mask={"density": 0.1, "include_patterns": ["lm_head"], "exclude_patterns": []},
    ))
    result = run_federation(cfg)
    first, second = result.metrics
    decisions = {d["client_id"]: d for d in first["vp_decisions"]}
    assert sorted(decisions) == [0, 1, 2, 3]
    assert [c for c, d in decisions.items() if d["flagged"]] == [2, 3], decisions
    for c in (2, 3):  # single-label: the loss is nearly fitted and GradIP has decayed
        assert decisions[c]["ratio"] < cfg.vp.ratio_threshold
        assert first["train_loss"][str(c)] < 0.2
    for c in (0, 1):
        assert decisions[c]["ratio"] > 2 * cfg.vp.ratio_threshold
    assert first["newly_limited"] == [2, 3] and result.limited_clients == [2, 3]
    assert second["budgets"] == {"0": 40, "1": 40, "2": 1, "3": 1}
    assert len(second["gradip_steps"]["2"]) == 1
    from meerkat_hf.federated.checkpoint import load_latest_checkpoint, unpack_client_states

    clients = unpack_client_states(load_latest_checkpoint(tmp_path / "run")["clients"])
    assert clients[2].steps_done == 41 and clients[0].steps_done == 80
    assert clients[2].examples_seen == 41 * cfg.batch_size  # the pointer advanced in the 1-step round
    assert (tmp_path / "run" / "plots" / "gradip.png").stat().st_size > 0
