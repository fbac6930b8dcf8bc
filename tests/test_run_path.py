"""The path from a run to reading its result: the gain with its interval, a diverged run stopping
with one line, an existing run folder never overwritten silently, one round numbering, progress."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.classification_metrics import paired_gain
from meerkat_hf.federated import FederationConfig
from meerkat_hf.federated.driver import run_federation
from meerkat_hf.federated.engine import DivergedError, decode_predictions, encode_predictions
from meerkat_hf.federated.reporting import format_report


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("path")
    return root, make_model_dir(root), make_task_files(root)


def _yaml(tmp_path, assets, **kw):
    _, model_dir, files = assets
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, model_dir, files, **kw)))
    return path


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_predictions_encoding_round_trips():
    assert encode_predictions([0, 1, 1, 0]) == "0110"
    assert decode_predictions("0110").tolist() == [0, 1, 1, 0]
    assert encode_predictions([3, 12]) == [3, 12] and decode_predictions([3, 12]).tolist() == [3, 12]
    assert decode_predictions(None) is None


def test_report_and_summary_json_carry_the_paired_gain(tmp_path, assets, capsys):
    from meerkat_hf.cli import main

    path = _yaml(tmp_path, assets, rounds=2)
    summary_path = tmp_path / "summary.json"
    assert main(["federate", "--config", str(path), "--summary-json", str(summary_path)]) == 0
    report = capsys.readouterr().out
    out = tmp_path / "run"
    info = json.loads((out / "run_info.json").read_text())
    before = decode_predictions(info["initial_predictions"])
    assert before is not None and len(before) == 32  # every eval example's zero-shot prediction, compactly
    summary = json.loads(summary_path.read_text())
    gain = summary["balanced_accuracy_gain"]
    b, a = summary["balanced_accuracy_before"], summary["balanced_accuracy_after"]
    assert a["value"] - b["value"] == pytest.approx(gain["value"])
    assert gain["ci95"][0] <= gain["value"] <= gain["ci95"][1] and gain["n"] == 32
    assert b["ci95"][0] <= b["value"] <= b["ci95"][1]
    line = next(l for l in report.splitlines() if l.startswith("balanced accuracy "))
    assert f"{b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] -> {a['value']:.3f}" in line
    assert f"gain {gain['value']:+.3f} [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}] (paired bootstrap" in line
    assert "95%" in line
    # the ranking beside the threshold: AUC before/after and its paired gain, on the same examples
    auc_b, auc_a, auc_g = summary["auc_before"], summary["auc_after"], summary["auc_gain"]
    assert summary["eval_examples"] == 32 and auc_g["n"] == 32
    assert auc_a["value"] - auc_b["value"] == pytest.approx(auc_g["value"])
    assert auc_g["ci95"][0] <= auc_g["value"] <= auc_g["ci95"][1] and auc_b["ci95"][0] <= auc_b["value"] <= auc_b["ci95"][1]
    scores = np.asarray(info["initial_scores"])
    from meerkat_hf.classification_metrics import macro_auc
    assert scores.shape == (32, 2) and macro_auc(scores, [r % 2 for r in range(32)]) == pytest.approx(auc_b["value"], abs=1e-6)
    auc_line = next(l for l in report.splitlines() if l.startswith("AUC (prior-free ranking) "))
    assert f"{auc_b['value']:.3f}" in auc_line and f"gain {auc_g['value']:+.3f}" in auc_line


def test_gain_is_the_paired_bootstrap_of_the_same_examples(tmp_path, assets):
    _, model_dir, files = assets
    config = FederationConfig.from_dict(base_config(tmp_path, model_dir, files, rounds=1, lr=5e-2))
    result = run_federation(config)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    labels = np.asarray([r % 2 for r in range(32)])  # toy_rows: label = i % 2
    after = result.gain
    assert after["metric"] == "balanced_accuracy" and set(after["gain_ci"]) and "paired bootstrap" in after["method"]
    key = "balanced_accuracy"
    assert after["gain"] == pytest.approx(result.final_eval[key] - result.initial_eval[key])
    before = decode_predictions(info["initial_predictions"])
    assert paired_gain(before, before, labels)["gain"] == 0  # the stored predictions are the zero-shot ones:
    from meerkat_hf.classification_metrics import balanced_accuracy
    assert balanced_accuracy(before, labels) == pytest.approx(result.initial_eval[key])
    assert result.training_summary["balanced_accuracy_gain"] == pytest.approx(after["gain"])
    assert decode_predictions(info["initial_predictions"]).shape == labels.shape
    report = format_report(result)
    assert "gain" in report and "paired bootstrap" in report
    assert after["num_classes"] == 2 and "balanced accuracy 0.5)" in report  # a constant answer scores 1 / C
    result.gain["num_classes"] = 5
    assert "balanced accuracy 0.2)" in format_report(result)


def _nan_losses(monkeypatch):
    """Every client's training loss NaN (a diverged model; eps and lr are bounded, so they cannot do it)."""
    from meerkat_hf.federated.protocol import client as client_mod

    real_init = client_mod.FederatedClient.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.loss_fn = lambda model, batch: torch.tensor(float("nan"))

    monkeypatch.setattr(client_mod.FederatedClient, "__init__", init)


def test_every_loss_nan_stops_the_run_with_one_line(tmp_path, assets, capsys, monkeypatch):
    from meerkat_hf.cli import main

    _nan_losses(monkeypatch)
    path = _yaml(tmp_path, assets, rounds=5, max_consecutive_skips=20)
    assert main(["federate", "--config", str(path)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]  # (stderr also has loading bars)
    assert len(err) == 1 and err[0].startswith("meerkat-hf: error: ")
    assert "NaN/inf" in err[0] and "learning_rate=0.001" in err[0] and "zo_eps=0.001" in err[0] and "lower them" in err[0]
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2  # 4 clients x 3 steps = 12 per round: the 20th skipped step falls in round 2
    assert all(r["skipped_steps"] == 12 for r in rows) and rows[-1]["cumulative_skipped_steps"] == 24
    assert rows[0]["nan_steps"] == {str(c): 3 for c in range(4)}


def test_some_nan_steps_are_counted_but_do_not_stop(tmp_path, assets, monkeypatch):
    _, model_dir, files = assets
    _nan_losses(monkeypatch)
    config = FederationConfig.from_dict(base_config(tmp_path, model_dir, files, rounds=2,
                                                    max_consecutive_skips=0))
    result = run_federation(config)  # 0: never stop
    assert [r["skipped_steps"] for r in result.metrics] == [12, 12]
    with pytest.raises(DivergedError, match="learning_rate=0.001"):
        config = FederationConfig.from_dict(base_config(tmp_path, model_dir, files, rounds=2,
                                                        max_consecutive_skips=12, output_dir=str(tmp_path / "b")))
        run_federation(config)


def test_an_existing_run_is_never_overwritten_silently(tmp_path, assets, capsys):
    from meerkat_hf.cli import main

    path = _yaml(tmp_path, assets, rounds=1)
    out = tmp_path / "run"
    assert main(["federate", "--config", str(path)]) == 0
    first = (out / "metrics.jsonl").read_text()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()

    assert main(["federate", "--config", str(path)]) == 2  # no --resume, no --overwrite: one line, nothing touched
    err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert (out / "metrics.jsonl").read_text() == first
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts

    assert main(["federate", "--config", str(path), "--resume", "--overwrite"]) == 2
    assert "pick one" in capsys.readouterr().err

    assert main(["federate", "--config", str(path), "--overwrite"]) == 0  # the old run moves aside, whole
    printed = capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the previous run in {out} to {aside[0]}" in printed
    assert (aside[0] / "metrics.jsonl").read_text() == first
    assert sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == ckpts
    assert (out / "metrics.jsonl").is_file()

    assert main(["federate", "--config", str(path), "--resume", "--set", "rounds=2"]) == 0  # --resume continues it
    assert len(_rows(out)) == 2


def test_an_empty_or_mask_only_folder_is_not_a_run(tmp_path):
    from meerkat_hf.federated.run_dir import RunExistsError, check_output_dir, existing_run_files

    out = tmp_path / "o"
    assert check_output_dir(out, resume=False, overwrite=False) == []  # missing
    (out / "checkpoints").mkdir(parents=True)
    (out / "mask").mkdir()
    assert existing_run_files(out) == []  # an empty checkpoints/ and a mask are no run
    (out / "run_info.json").write_text("{}")
    with pytest.raises(RunExistsError, match="--resume"):
        check_output_dir(out, resume=False, overwrite=False)
    assert check_output_dir(out, resume=True, overwrite=False) == ["run_info.json"]


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_one_round_numbering_and_old_runs_still_resume(tmp_path, assets, capsys):
    from meerkat_hf.cli import main

    full_dir, old_dir = tmp_path / "full", tmp_path / "old"
    path = _yaml(tmp_path, assets, rounds=3, plots=True)
    assert main(["federate", "--config", str(path), "--output-dir", str(full_dir)]) == 0
    report = capsys.readouterr().out
    rows = _rows(full_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]  # rounds done; round 0 is the zero-shot state
    assert [p.name for p in sorted((full_dir / "checkpoints").iterdir())] == ["round_000002.pt", "round_000003.pt"]
    assert "after round 3:" in report
    assert {p.name for p in (full_dir / "plots").iterdir()} == {"accuracy.png", "bytes.png", "gradip.png"}

    # A run written with the old 0-based numbering (rows 0, 1; checkpoint round_000001 after 2 rounds)
    # resumes, and its rows are renumbered.
    assert main(["federate", "--config", str(path), "--output-dir", str(old_dir), "--set", "rounds=2"]) == 0
    old_rows = _rows(old_dir)
    (old_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "round": r["round"] - 1}) + "\n" for r in old_rows))
    for p in sorted((old_dir / "checkpoints").iterdir()):
        n = int(p.stem.split("_")[1])
        p.rename(p.with_name(f"round_{n - 1:06d}.pt"))
    assert main(["federate", "--config", str(path), "--output-dir", str(old_dir), "--resume"]) == 0
    assert _strip(_rows(old_dir)) == _strip(rows)


def _synthetic_rows(num_clients: int, rounds: int, single: list[int]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for r in range(1, rounds + 1):
        steps = {}
        for c in range(num_clients):
            if rng.random() < 0.3 and num_clients > 10:
                continue  # sat out
            scale = (0.05 ** (r / rounds)) if c in single else 1.0
            steps[str(c)] = [float(rng.normal() * scale * 3) for _ in range(2 if r > 1 else 6)]
        acc = 0.75 + rng.normal() * 0.01
        rows.append({"round": r, "gradip_steps": steps, "limited_clients": single[:1] if r > 1 else [],
                     "accuracy": acc, "balanced_accuracy": acc - 0.1, "balanced_accuracy_ci_low": acc - 0.15,
                     "balanced_accuracy_ci_high": acc - 0.05, "majority_rate": 0.69, "cumulative_bytes": 1000 * r,
                     "cumulative_uplink_bytes": 300 * r, "cumulative_fedavg_full_bytes": 10 ** 9 * r})
    return rows


@pytest.mark.parametrize("num_clients", [10, 100])
def test_plots_are_written_at_10_and_100_clients(tmp_path, num_clients):
    from meerkat_hf.federated.reporting import write_plots

    single = list(range(num_clients - max(2, num_clients // 10), num_clients))
    groups = {"single-label clients": single, "mixed-label clients": [c for c in range(num_clients) if c not in single]}
    initial = {"accuracy": 0.76, "balanced_accuracy": 0.66, "balanced_accuracy_ci_low": 0.6,
               "balanced_accuracy_ci_high": 0.72, "majority_rate": 0.69}
    written = write_plots(_synthetic_rows(num_clients, 8, single), tmp_path / f"plots{num_clients}", title="meerkat-vp",
                          initial=initial, groups=groups)
    assert [p.name for p in written] == ["accuracy.png", "bytes.png", "gradip.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_progress_names_client_step_loss_and_eta_and_false_is_silent(tmp_path, assets, capsys, caplog):
    import logging

    _, model_dir, files = assets
    cache = tmp_path / "mask-cache"
    mask = {"cache": True, "density": 0.021}  # a spec no other test computes
    with caplog.at_level(logging.INFO, logger="meerkat_hf"):
        run_federation(FederationConfig.from_dict(base_config(tmp_path, model_dir, files, rounds=2, progress=True,
                                                              mask=mask, output_dir=str(tmp_path / "a"))))
    err, logs = capsys.readouterr().err, caplog.text
    assert "round 1/2 | client 1/4 (id 0)" in err and "client 4/4 (id 3)" in err
    assert "step 3/3, loss " in err and "eta" in err
    assert "round 1/2 done in" in logs and "left" in logs
    # the first run says why it computes a mask and where later runs find it; the next one reuses it
    assert "computing the sensitivity mask" in logs and "later runs with the same model" in logs
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meerkat_hf"):
        run_federation(FederationConfig.from_dict(base_config(tmp_path, model_dir, files, rounds=2, progress=False,
                                                              mask=mask, output_dir=str(tmp_path / "b"))))
    err, logs = capsys.readouterr().err, caplog.text
    assert "using the cached mask" in logs and "computing the sensitivity mask" not in logs
    assert "client 1/4" not in err and "rounds" not in err and "step 1/" not in err  # progress: false is silent
    assert "done in" not in logs


def test_eta_counts_the_steps_and_evaluations_left():
    from meerkat_hf.federated.progress import eta_seconds, format_duration

    assert eta_seconds(2.0, [10, 10], 1, 5.0) == 45.0
    assert format_duration(45) == "45 s" and format_duration(125) == "2 min 05 s" and format_duration(3725) == "1 h 02 min"


def test_versions_are_recorded_in_run_info_and_the_card(tmp_path, assets):
    import importlib.metadata as md

    _, model_dir, files = assets
    run_federation(FederationConfig.from_dict(base_config(tmp_path, model_dir, files, rounds=1, save_final=True)))
    out = tmp_path / "run"
    info = json.loads((out / "run_info.json").read_text())
    versions = info["versions"]
    for dist in ("python", "meerkat-hf", "torch", "transformers", "datasets", "huggingface-hub", "peft", "accelerate"):
        assert versions[dist], dist
    assert versions["transformers"] == md.version("transformers")
    assert info["environment"]["torch_threads"] == 1  # the config's torch_threads, what the run used
    card = (out / "final" / "README.md").read_text()
    assert "Library versions" in card and f"transformers {md.version('transformers')}" in card
    assert f"torch {md.version('torch')}" in card


def test_constraints_file_pins_the_core_dependencies():
    from pathlib import Path

    lines = [l.strip() for l in (Path(__file__).parents[1] / "constraints.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    pins = dict(l.split("==", 1) for l in lines)
    assert all("==" in l for l in lines)
    for dist in ("torch", "transformers", "datasets", "huggingface_hub", "peft", "accelerate", "safetensors", "tokenizers"):
        assert dist in pins, dist


def test_a_second_run_into_a_busy_folder_gets_one_line_naming_the_holder(tmp_path, assets, capsys):
    """Two `meerkat-hf federate` into one --output-dir used to both run and interleave metrics.jsonl."""
    import subprocess
    import sys
    import textwrap

    from meerkat_hf.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from meerkat_hf.federated.run_dir import lock_output_dir
        lock_output_dir({str(out)!r}); print("locked", flush=True); time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = _yaml(tmp_path, assets, rounds=1)
        assert main(["federate", "--config", str(path)]) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "in use by another run" in err[0], err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["federate", "--config", str(path)]) == 0  # the kernel released the killed holder's lock
