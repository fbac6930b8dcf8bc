"""The decision logic of `research/compare.py` (the lr search, the task plan, claims) and of
`research/vp_detector.py` (confusion counts, tuning on one set, scoring on another), without a model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "research"


sys.path.insert(0, str(BENCH))  # the scripts import their siblings, as they do when run from research/


def _load(name: str):
    return load_script(f"research/{name}.py")


@pytest.fixture(scope="module")
def compare():
    return _load("compare")


def _finish(out: Path, compare, method: str, lr: float, seed: int, val: float) -> None:
    row = {"cell": compare.cell_name(method, lr, seed), "method": method, "lr": lr, "seed": seed,
           "final_validation": {"balanced_accuracy": val}, "train_seconds": 1.0}
    with (out / "cells.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _finish_long(out: Path, compare, method: str, lr: float, seed: int) -> None:
    row = {"cell": compare.long_name(method, lr, seed), "method": method, "lr": lr, "seed": seed, "long": True,
           "final_validation": {"balanced_accuracy": 0.5}, "train_seconds": 1.0}
    with (out / "cells.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def test_search_then_seeds_then_tests_and_meerkats_longer_row(tmp_path, compare):
    plan = compare.plan(tmp_path, ["meerkat"], [])
    assert [(k, lr, s) for k, _, lr, s in plan] == [("cell", 1e-4, 0), ("cell", 3e-4, 0), ("cell", 1e-3, 0)]
    for lr, val in ((1e-4, 0.74), (3e-4, 0.76), (1e-3, 0.70)):
        _finish(tmp_path, compare, "meerkat", lr, 0, val)
    plan = compare.plan(tmp_path, ["meerkat"], [])
    # 3e-4 won inside the grid: seeds 1 and 2 at the search budget; seed 0 is tested (zero-shot first) and,
    # Meerkat being `long`, continued to the long budget
    assert plan == [("cell", "meerkat", 3e-4, 1), ("cell", "meerkat", 3e-4, 2), ("zero-shot", "", 0.0, 0),
                    ("long", "meerkat", 3e-4, 0)]
    (tmp_path / "zero_shot_test.npz").write_bytes(b"")
    for s in (1, 2):
        _finish(tmp_path, compare, "meerkat", 3e-4, s, 0.7)
    plan = compare.plan(tmp_path, ["meerkat"], [])
    assert plan == [("test", "meerkat", 3e-4, s) for s in (0, 1, 2)] + [("long", "meerkat", 3e-4, s) for s in (0, 1, 2)]
    assert compare.task_name("test", "meerkat", 3e-4, 0) == "test-meerkat-lr3e-4-s0"
    _finish_long(tmp_path, compare, "meerkat", 3e-4, 0)
    assert ("test-long", "meerkat", 3e-4, 0) in compare.plan(tmp_path, ["meerkat"], [])
    assert compare.task_name("test-long", "meerkat", 3e-4, 0) == f"test-meerkat-lr3e-4-s0-r{compare.LONG_ROUNDS}"
    # the long cell continues the search cell's folder (its checkpoint) with more rounds
    overrides = compare.config_overrides("meerkat", 3e-4, 0, tmp_path, [], long=True)
    assert f"rounds={compare.LONG_ROUNDS}" in overrides
    assert overrides[-1] == compare.config_overrides("meerkat", 3e-4, 0, tmp_path, [])[-1]
    # no other method spends the long budget: its row ends with the tests of its three cells
    for lr, val in ((1e-4, 0.74), (3e-4, 0.76), (1e-3, 0.70)):
        _finish(tmp_path, compare, "random", lr, 0, val)
    for s in (1, 2):
        _finish(tmp_path, compare, "random", 3e-4, s, 0.7)
    assert compare.plan(tmp_path, ["random"], []) == [("test", "random", 3e-4, s) for s in (0, 1, 2)]


def test_one_methods_row_is_finished_before_the_next_methods_search(tmp_path, compare):
    for lr, val in ((1e-4, 0.74), (3e-4, 0.76), (1e-3, 0.70)):
        _finish(tmp_path, compare, "meerkat", lr, 0, val)
    plan = compare.plan(tmp_path, ["meerkat", "magnitude"], [])
    assert plan[:4] == [("cell", "meerkat", 3e-4, 1), ("cell", "meerkat", 3e-4, 2), ("zero-shot", "", 0.0, 0),
                        ("long", "meerkat", 3e-4, 0)]
    assert [t[1] for t in plan[4:]] == ["magnitude"] * 3


def test_a_stop_file_ends_a_worker_between_tasks(tmp_path, compare, caplog, capsys):
    (tmp_path / "STOP").touch()
    compare.main(["--out", str(tmp_path), "run"])  # returns at once: nothing was claimed
    assert "STOP file found" in capsys.readouterr().out
    assert not (tmp_path / "claims").exists()


def test_a_winner_at_the_grid_edge_gets_one_more_point_beyond_it(tmp_path, compare):
    for lr, val in ((1e-4, 0.70), (3e-4, 0.72), (1e-3, 0.75)):
        _finish(tmp_path, compare, "magnitude", lr, 0, val)
    todo, chosen = compare.search_state(compare.METHODS["magnitude"], compare.read_cells(tmp_path), [])
    assert chosen is None and todo == [pytest.approx(3e-3)]  # x3, the grid's step
    _finish(tmp_path, compare, "magnitude", todo[0], 0, 0.60)  # worse beyond the edge: back to 1e-3, no more points
    assert compare.search_state(compare.METHODS["magnitude"], compare.read_cells(tmp_path), []) == ([], 1e-3)


def test_ties_choose_the_smaller_lr(tmp_path, compare):
    for lr in (3e-3, 1e-2, 3e-2):
        _finish(tmp_path, compare, "fo-fedavg", lr, 0, 0.75)
    todo, chosen = compare.search_state(compare.METHODS["fo-fedavg"], compare.read_cells(tmp_path), [])
    # every lr scored the same (none changed a prediction): the extra point goes above the grid
    assert chosen is None and todo == [pytest.approx(0.1, rel=0.06)]
    _finish(tmp_path, compare, "fo-fedavg", todo[0], 0, 0.75)
    todo, chosen = compare.search_state(compare.METHODS["fo-fedavg"], compare.read_cells(tmp_path), [])
    assert todo == [] and chosen == 3e-3  # still all tied: the smallest lr
    # a tie that is not the whole grid: the smaller of the tied best, extended below if at the edge
    for lr, val in ((1e-4, 0.76), (3e-4, 0.76), (1e-3, 0.70)):
        _finish(tmp_path, compare, "random", lr, 0, val)
    todo, chosen = compare.search_state(compare.METHODS["random"], compare.read_cells(tmp_path), [])
    assert chosen is None and todo == [pytest.approx(1e-4 / (3e-4 / 1e-4))]


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path, compare):
    assert compare._claim(tmp_path, "cell-a")
    assert not compare._claim(tmp_path, "cell-a")  # held by this live process
    lock = tmp_path / "claims" / "cell-a.lock"
    lock.write_text(f"{os.uname().nodename} 999999999")  # a process that is gone
    assert compare._claim(tmp_path, "cell-a")


def test_cell_commands_reproduce_the_cell_without_run_plumbing(tmp_path, compare):
    overrides = compare.config_overrides("full-fedzo", 3e-6, 2, tmp_path, ["rounds=4"])
    command = compare.reproduce_command(overrides)
    assert "--set algorithm=full-fedzo" in command and "--set learning_rate=3e-06" in command and "--set seed=2" in command
    assert "--set rounds=4" in command and "output_dir" not in command and "resume" not in command
    assert overrides.index("rounds=4") > overrides.index("rounds=3")  # --set wins over the shared settings


def test_detector_confusion_and_tuning_on_one_set_scoring_on_another(tmp_path):
    vp = _load("vp_detector")
    decaying = [[10.0, 9.0, 8.0, 0.5, 0.2, 0.1, 0.05, 0.01]]
    oscillating = [[10.0, -8.0, 9.0, -11.0, 7.0, -9.0, 10.0, -8.0]]
    feds = []
    for i in range(6):
        single = [i % 3]
        feds.append({"federation": i, "single_label": single,
                     "gradip": {str(c): (decaying if c in single else oscillating) for c in range(4)}})
    with (tmp_path / "traces.jsonl").open("w") as f:
        f.writelines(json.dumps(x) + "\n" for x in feds)
    m = vp.confusion(feds, {"steps": 8, "participations": 1, "ratio_threshold": 0.2, "rule": "ratio", "min_steps": 1})
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["f1"]) == (6, 0, 0, 18, 1.0)

    class Args:
        out, tune, report = str(tmp_path), "0-2", "3-5"

    vp.tune(Args)
    text = (tmp_path / "detector.md").read_text()
    assert "| tuned | report | 3 | 0 | 0 | 9 | 1.000 | 1.000 | 1.000 |" in text
    # every resample of the report federations is perfect; everyone flagged scores 2 * 1/4 / (1 + 1/4)
    assert "interval over its federations: [1.000, 1.000]; its margin over flagging everyone: [+0.600, +0.600]" in text
    assert json.loads((tmp_path / "detector.json").read_text())["f1_ci"] == [1.0, 1.0]


def test_the_vp_effect_study_runs_its_fixed_lr_without_a_search(tmp_path, compare):
    names = list(compare.STUDIES["vp-effect"])
    assert [t[1] for t in compare.plan(tmp_path, names, [])] == names  # seed 0 of each, at Meerkat's lr
    for name in names:
        _finish(tmp_path, compare, name, 3e-4, 0, 0.7)  # a 1-point grid is never extended
    plan = compare.plan(tmp_path, names, [])
    assert plan[:3] == [("cell", names[0], 3e-4, 1), ("cell", names[0], 3e-4, 2), ("zero-shot", "", 0.0, 0)]
    assert not [t for t in plan if t[0] == "long"]
    assert {t[1] for t in plan if t[0] == "cell"} == set(names)
    overrides = compare.config_overrides("vp-gradip", 3e-4, 0, tmp_path, [])
    assert "algorithm=meerkat-vp" in overrides and "partition.num_single_label_clients=3" in overrides
    assert overrides.index("partition.num_single_label_clients=3") > overrides.index("partition.num_single_label_clients=0")


def test_the_ceilings_look_alike_probability_is_the_hypergeometric_one():
    import itertools

    vp = _load("vp_detector")
    n, minority, window = 7, 2, 3  # brute force: every order of 5 majority and 2 minority examples
    orders = set(itertools.permutations([0] * (n - minority) + [1] * minority))
    pure = sum(1 for o in orders if sum(o[:window]) == 0) / len(orders)
    assert vp.pure_window_probability(n, minority, window) == pytest.approx(pure)
    assert vp.pure_window_probability(10, 0, 5) == 1.0 and vp.pure_window_probability(10, 6, 5) == 0.0


def test_separability_scores_a_decaying_trace_above_an_oscillating_one(tmp_path):
    vp = _load("vp_detector")
    rng = np.random.default_rng(0)
    feds = []
    for i in range(4):
        gradip = {}
        for c in range(6):
            noise = rng.normal(size=10) * 10
            gradip[str(c)] = [list(noise * np.geomspace(1, 0.01, 10)) if c < 2 else list(noise)]
        feds.append({"federation": i, "single_label": [0, 1], "gradip": gradip})
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(f) + "\n" for f in feds))
    vp.main(["--out", str(tmp_path), "separability"])
    table = (tmp_path / "separability.md").read_text()
    decay_row = next(line for line in table.splitlines() if line.startswith("| decay"))
    assert float(decay_row.split("|")[2]) == 1.0  # every decaying client ranks above every oscillating one


def test_dp_rows_are_scored_at_the_search_budget_and_would_continue_from_scratch(tmp_path, compare):
    # a target epsilon's noise is solved for the run's rounds: a DP cell is never extended; DP rows
    # are compared at the search budget like every row
    for lr, val in ((1e-4, 0.74), (3e-4, 0.76), (1e-3, 0.70)):
        _finish(tmp_path, compare, "dp-eps8", lr, 0, val)
    (tmp_path / "zero_shot_test.npz").write_bytes(b"")
    assert compare.plan(tmp_path, ["dp-eps8"], []) == [("cell", "dp-eps8", 3e-4, 1), ("cell", "dp-eps8", 3e-4, 2),
                                                        ("test", "dp-eps8", 3e-4, 0)]
    long = compare.config_overrides("dp-eps8", 3e-4, 0, tmp_path, [], long=True)
    short = compare.config_overrides("dp-eps8", 3e-4, 0, tmp_path, [])
    assert long[-1] != short[-1] and long[-1].endswith(compare.long_name("dp-eps8", 3e-4, 0))
    assert "dp.target_epsilon=8" in long and f"rounds={compare.LONG_ROUNDS}" in long


def test_the_vp_effect_cells_run_the_detector_tuned_on_the_detector_studys_federations(tmp_path, compare):
    tuned = json.loads((Path(__file__).resolve().parents[1] / "research/results/vp_detector/detector.json").read_text())
    overrides = compare.config_overrides("vp-gradip", 3e-4, 0, tmp_path, [])
    for key in ("early_fraction", "late_fraction", "ratio_threshold", "quiet_rel_tau", "quiet_fraction", "rule", "min_steps"):
        assert f"vp.{key}={tuned['setting'][key]}" in overrides, key
    assert tuned["setting"]["steps"] == 10 and "local_steps=10" in overrides  # its window: a whole T = 10 round
    assert set(compare.VP_DETECTOR) <= set(compare.config_overrides("vp-random", 3e-4, 0, tmp_path, []))


def test_rows_are_compared_with_the_first_row_paired_by_seed(compare):
    lines = compare._paired_lines({"meerkat": {0: 0.74, 1: 0.75, 2: 0.76},
                                   "magnitude": {0: 0.73, 1: 0.73, 2: 0.73},
                                   "random": {0: 0.70}})  # one common seed: no interval, no row
    rows = [line for line in lines if line.startswith("| magnitude")]
    # differences -0.01, -0.02, -0.03: mean -0.02, sd 0.01, half-width 4.303 * 0.01 / sqrt(3)
    assert rows == ["| magnitude - meerkat | 3 | -0.010, -0.020, -0.030 | -0.020 [-0.045, +0.005] |"]
    assert not any(line.startswith("| random") for line in lines)
    assert compare._paired_lines({"meerkat": {0: 0.7}}) == []
    # the vp-effect study also asks VP against its control, at the same forward passes
    lines = compare._paired_lines({"vp-none": {0: 0.75, 1: 0.75}, "vp-gradip": {0: 0.74, 1: 0.76},
                                   "vp-random": {0: 0.73, 1: 0.74}})
    assert [line.split(" |")[0] for line in lines if line.startswith("| vp")] == [
        "| vp-gradip - vp-none", "| vp-random - vp-none", "| vp-gradip - vp-random"]
    assert "| vp-gradip - vp-random | 2 | +0.010, +0.020 |" in lines[-1]


def test_movement_reports_how_far_each_masked_row_moved_its_coordinates(tmp_path, compare, monkeypatch, tiny_llama):
    import torch

    from meerkat_hf import SparseMaskConfig, compute_mask
    from meerkat_hf.modeling.sparse_view import SparseView

    mask = compute_mask(tiny_llama, SparseMaskConfig(density=0.02, method="random", seed=0), progress=False)
    start = SparseView(tiny_llama, mask).gather()
    for lr, val in ((1e-4, 0.74), (3e-4, 0.76), (1e-3, 0.70)):
        _finish(tmp_path, compare, "random", lr, 0, val)
    for s in (1, 2):
        _finish(tmp_path, compare, "random", 3e-4, s, 0.7)
    with (tmp_path / "cells.jsonl").open("a") as f:  # the chosen cells' k, as a real row carries it
        for s in (0, 1, 2):
            f.write(json.dumps({"cell": compare.cell_name("random", 3e-4, s), "method": "random", "lr": 3e-4, "seed": s,
                                "k": mask.num_selected, "final_validation": {"balanced_accuracy": 0.76 if s == 0 else 0.7},
                                "train_seconds": 1.0}) + "\n")
    for s in (0, 1, 2):
        cell = tmp_path / "cells" / compare.cell_name("random", 3e-4, s)
        mask.save_pretrained(cell / "mask", model_card=False)
        torch.save(start + 0.5 * (s + 1) * start.abs(), cell / "final_values.pt")  # moved by 50/100/150% of |w|
    monkeypatch.setattr("meerkat_hf.hub.loading.load_model_and_tokenizer", lambda *a, **k: (tiny_llama, None))
    compare.main(["--out", str(tmp_path), "--methods", "random", "movement"])
    row = next(line for line in (tmp_path / "movement.md").read_text().splitlines() if line.startswith("| random"))
    cells = row.split("|")[1:-1]
    assert cells[1].strip() == "0.0003" and cells[2].strip() == "3" and cells[3].strip() == f"{mask.num_selected:,}"
    assert float(cells[7]) == pytest.approx(1.0)  # the median of 0.5, 1.0, 1.5 times |w|


def test_snapshot_keeps_what_a_resume_needs_and_nothing_git_cannot_hold(tmp_path, compare, monkeypatch):
    out, to = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setattr(compare, "SNAPSHOT_MAX_BYTES", 1000)
    for name, files in {
        "meerkat-lr3e-4-s0": {"final_values.pt": 10, "checkpoints/round_000003.pt": 10, "mask/mask.safetensors": 10},
        "random-lr1e-4-s0": {"final_values.pt": 10, "checkpoints/round_000003.pt": 10, "metrics.jsonl": 10},
        "random-lr1e-4-s1": {"checkpoints/round_000002.pt": 10, "metrics.jsonl": 10, "x.tmp": 10},
        "full-fedzo-lr1e-6-s0": {"checkpoints/round_000001.pt": 5000, "metrics.jsonl": 10},
    }.items():
        for rel, size in files.items():
            (out / "cells" / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / "cells" / name / rel).write_bytes(b"x" * size)
    (out / "cells.jsonl").write_text("")
    (out / "table.md").write_text("t\n")
    (to / "cells" / "full-fedzo-lr1e-6-s0").mkdir(parents=True)  # an earlier snapshot's partial copy
    (to / "cells" / "random-lr1e-4-s0" / "checkpoints").mkdir(parents=True)
    compare.main(["--out", str(out), "snapshot", "--to", str(to)])
    kept = sorted(str(p.relative_to(to)) for p in to.rglob("*") if p.is_file())
    assert kept == ["cells.jsonl", "cells/meerkat-lr3e-4-s0/checkpoints/round_000003.pt",  # Meerkat's long row continues it
                    "cells/meerkat-lr3e-4-s0/final_values.pt", "cells/random-lr1e-4-s0/final_values.pt",
                    "cells/random-lr1e-4-s0/metrics.jsonl", "cells/random-lr1e-4-s1/checkpoints/round_000002.pt",
                    "cells/random-lr1e-4-s1/metrics.jsonl", "table.md"]
    assert not (to / "cells" / "full-fedzo-lr1e-6-s0").exists()  # unfinished and too big: restarts elsewhere


def test_the_vp_effect_summary_says_who_was_limited_per_tested_seed(tmp_path, compare, capsys):
    """`--study vp-effect table` writes summary_vp_effect.json, which the README's line reads: the
    tested seeds and, per seed, [limited clients, of them single-label, single-label clients]."""
    gain = {"gain": 0.0, "gain_ci": [0.0, 0.0]}
    for name, limited in (("vp-none", [[], [], []]), ("vp-gradip", [[7, 8], [1, 9], [2, 7, 8]])):
        for s in (0, 1, 2):
            row = {"cell": compare.cell_name(name, 3e-4, s), "method": name, "lr": 3e-4, "seed": s,
                   "final_validation": {"balanced_accuracy": 0.7, "auc": 0.8}, "train_seconds": 60.0,
                   "curve": [{"balanced_accuracy": 0.7}], "uplink_bytes": 1000, "downlink_bytes": 1000,
                   "client_rounds": 30, "rounds": 3, "k": 1064, "forward_passes": 600,
                   "limited_clients": limited[s], "single_label_clients": [7, 8, 9]}
            with (tmp_path / "cells.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            if s < 2:  # seed 2 run but not tested yet
                test = {"balanced_accuracy": 0.7 + 0.01 * s, "macro_f1": 0.7, "accuracy": 0.7, "gain_over_zero_shot": gain}
                with (tmp_path / "tests.jsonl").open("a") as f:
                    f.write(json.dumps({"cell": row["cell"], "test": test, "test_seconds": 1.0}) + "\n")
    args = argparse.Namespace(out=str(tmp_path), methods=["vp-none", "vp-gradip"], set=[], study="vp-effect")
    text = compare.table(args)
    assert "| vp-gradip | s0: 2 / 2 / 3; s1: 2 / 1 / 3; s2: 3 / 2 / 3 | 600, 600, 600 |" in text
    summary = json.loads((tmp_path / "summary_vp_effect.json").read_text())["methods"]
    assert summary["vp-gradip"]["seed_ids"] == [0, 1] and summary["vp-gradip"]["limited"] == [[2, 2, 3], [2, 1, 3]]
    assert summary["vp-none"]["balanced_accuracy"] == [0.7, 0.71] and summary["vp-none"]["limited"] == [[0, 0, 3], [0, 0, 3]]


def test_dp_noise_sets_the_released_scalars_spread_against_the_dp_noise_in_them(tmp_path, compare, capsys):
    """`compare.py dp-noise` reads each chosen cell's replay history from its round checkpoint: the
    scalars of the search budget's rounds only (a longer row's later rounds left out), and the DP
    noise std sigma * clip / batch as the root mean square of the recorded multipliers."""
    from meerkat_hf.federated.checkpoint import save_checkpoint

    rng = np.random.default_rng(0)
    for name, privacy in (("meerkat", None), ("dp-eps8", {"epsilon": 8.0, "delta": 1e-5, "noise_multiplier": "0.3, 0.4",
                                                         "clip": 4.0})):
        for lr, val in ((1e-4, 0.70), (3e-4, 0.75), (1e-3, 0.60)):
            _finish(tmp_path, compare, name, lr, 0, val)
        for s in (0, 1):
            cell = compare.cell_name(name, 3e-4, s)
            row = {"cell": cell, "method": name, "lr": 3e-4, "seed": s, "rounds": 2,
                   "final_validation": {"balanced_accuracy": 0.75}, "train_seconds": 1.0,
                   **({"privacy": privacy} if privacy else {})}
            if s:
                with (tmp_path / "cells.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
            else:  # seed 0's row is the search cell above; give it its rounds and privacy
                lines = (tmp_path / "cells.jsonl").read_text().splitlines()
                lines = [json.dumps(row) if json.loads(line)["cell"] == cell else line for line in lines]
                (tmp_path / "cells.jsonl").write_text("\n".join(lines) + "\n")
            # rounds 0-1 are the search budget; round 2 (a longer row's) holds outliers that must not count
            history = [(r, [(c, 100, 1, (rng.normal(size=5) * 2).tolist() if r < 2 else [1e6] * 5, [3e-4] * 5)
                            for c in (0, 1)]) for r in range(3)]
            save_checkpoint(tmp_path / "cells" / cell, 3, {"config": {"batch_size": 8}, "server": {"history": history}})
    args = argparse.Namespace(out=str(tmp_path), methods=["meerkat", "dp-eps8"], set=[], study="dp")
    compare.dp_noise(args)
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["meerkat"][3] == "40" and rows["meerkat"][6] == "0 (no DP)"  # 2 cells x 2 rounds x 2 clients x 5
    expected_noise = np.sqrt(np.mean([(0.3 * 4 / 8) ** 2, (0.4 * 4 / 8) ** 2]))
    assert float(rows["dp-eps8"][6]) == pytest.approx(expected_noise, rel=1e-2)
    assert 1.0 < float(rows["dp-eps8"][4]) < 3.0  # the std of N(0, 2^2) draws, the outliers left out
    assert (tmp_path / "dp_noise.md").read_text().strip() == text.strip()


def test_the_epsilon_table_pairs_each_dp_row_with_its_own_shape_without_dp(compare):
    rows = [{"seed": s} for s in (0, 1, 2)]
    chosen = {"meerkat": (3e-4, rows), "dp-eps8": (3e-4, rows), "dp-eps3": (1e-4, rows[:1]), "dp-eps1": (None, []),
              "site": (1e-3, rows), "site-dp-eps8": (1e-3, rows), "site-dp-eps3": (None, []), "site-dp-eps1": (None, [])}
    by_seed = {"meerkat": {0: 0.75, 1: 0.76, 2: 0.77}, "dp-eps8": {0: 0.74, 1: 0.76, 2: 0.76},
               "site": {0: 0.80, 1: 0.80, 2: 0.80}, "site-dp-eps8": {0: 0.78, 1: 0.78, 2: 0.78}}
    text = "\n".join(compare._epsilon_lines(chosen, by_seed))
    assert "| no DP | 0.760 +- 0.010 (3 seeds, lr 0.0003) | | 0.800 +- 0.000 (3 seeds, lr 0.001) | |" in text
    # federated eps 8: -0.01, 0, -0.01 -> mean -0.007; single site eps 8: -0.02 each (zero spread)
    assert "| 8 | 0.753 +- 0.012 (3 seeds, lr 0.0003) | -0.007 [-0.021, +0.008] | 0.780 +- 0.000 (3 seeds, lr 0.001) | -0.020 [-0.020, -0.020] |" in text
    assert "| 3 | lr 0.0001: 1 of 3 seeds run, test pending | | searching | |" in text
    assert "| 1 | searching | | searching | |" in text
    # the paired table compares single-site DP rows with single-site Meerkat, not with the first row only
    lines = compare._paired_lines({"meerkat": by_seed["meerkat"], "site": by_seed["site"], "site-dp-eps8": by_seed["site-dp-eps8"]})
    assert "(and site-dp-eps8 against site)" in lines[1]
    assert any(line.startswith("| site-dp-eps8 - site | 3 |") for line in lines)


def test_no_study_or_benchmark_reaches_into_tests():
    """research/ and benchmarks/ use the library's public API, its test utilities included, never tests/."""
    import re

    root = Path(__file__).resolve().parents[1]
    for path in sorted([*root.glob("research/*.py"), *root.glob("benchmarks/*.py"), *root.glob("examples/**/*.py")]):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"sys\.path.*tests|from (conftest|federated_support|chaos_support) import|import test_\w+", text), path


def test_the_forgetting_probe_reads_any_saved_delta(tmp_path):
    """`learning_curve.py forgetting --delta DIR`: generic perplexity and greedy generations, base vs delta,
    from the delta folder alone (the base it records), one row appended per call."""
    import torch

    from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.testing.tiny import build_tiny_tokenizer, tiny_model

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    model, _ = load_model_and_tokenizer(str(base))
    mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(density=0.05, method="random", seed=0),
                                               progress=False))
    mm.set_values(mm.values + torch.randn(mm.num_selected, generator=torch.Generator().manual_seed(0)))
    mm.save_pretrained(tmp_path / "delta")
    curve = _load("learning_curve")
    curve.main(["--out", str(tmp_path / "out"), "forgetting", "--delta", str(tmp_path / "delta")])
    row = json.loads((tmp_path / "out" / "forgetting.jsonl").read_text())
    assert row["delta"] == str(tmp_path / "delta") and row["blocks"] >= 1
    assert row["perplexity_before"] > 1 and row["perplexity_after"] > 1
    assert row["perplexity_after"] != row["perplexity_before"]  # the delta was applied, the base restored between
    assert len(row["generations"]) == len(curve.PROMPTS)
