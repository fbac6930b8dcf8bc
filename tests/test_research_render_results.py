"""research/render_results.py keeps the documented study tables equal to the recorded runs.

The committed docs must match the committed records (the check CI runs); a changed record makes
the check fail naming the block, a render fixes it, and nothing outside the blocks ever changes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("render_results", ROOT / "research" / "render_results.py")
render_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_results)

BLOCK = re.compile(r"(<!-- generated: (\S+) \(python research/render_results\.py\) -->\n).*?(<!-- /generated: \2 -->)", re.S)


def outside_blocks(text: str) -> str:
    """The document with every block's body emptied: what a render must never touch."""
    return BLOCK.sub(r"\1\3", text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of just what the renderer reads and writes (the docs, the records, the default job)."""
    for rel in render_results.DOCS + ("meerkat_hf/federated/default.yaml",):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "research" / "results", tmp_path / "research" / "results",
                    ignore=shutil.ignore_patterns("ckpt", "*.png"))
    return tmp_path


def test_committed_docs_match_records(capsys):
    assert render_results.main(["--check"]) == 0, capsys.readouterr().out
    text = (ROOT / "research" / "RESULTS.md").read_text()
    names = [m.group(2) for m in BLOCK.finditer(text)]
    assert {"baselines", "diagnose", "learning_curves", "test_split", "across_seeds", "federated_curves"} <= set(names)
    main_job = (ROOT / "docs" / "main-job.md").read_text()
    assert "generated: study_summary" in main_job and "generated: cli_runs" in main_job


def test_changed_record_is_stale_then_rendered(repo: Path, capsys):
    results = repo / "research" / "results" / "zo_study" / "test_results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    seed2 = next(r for r in rows if r["name"] == "d1e-5_bal_lr1e-4_seed2")
    seed2["gain_over_zero_shot"]["gain"] = 0.0456  # a retest recorded a different gain
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = repo / "research" / "RESULTS.md"
    before = doc.read_text()

    assert render_results.main(["--check", "--root", str(repo)]) == 1
    out = capsys.readouterr().out.splitlines()
    stale = [("research/RESULTS.md", "test_split"), ("research/RESULTS.md", "across_seeds"), ("docs/main-job.md", "study_summary")]
    assert sorted(out) == sorted(f"{doc}: block '{b}' is stale: the records say otherwise "
                                 f"(run python research/render_results.py)" for doc, b in stale)
    assert doc.read_text() == before  # --check writes nothing

    assert render_results.main(["--root", str(repo)]) == 0
    after = doc.read_text()
    assert "| **+0.046 [+0.009, +0.034]** |" in after  # the new number, the recorded interval beside it
    assert "+0.014 / +0.021 / +0.046" in after  # and the across-seeds row follows it
    assert outside_blocks(after) == outside_blocks(before)
    assert render_results.main(["--check", "--root", str(repo)]) == 0


def test_render_leaves_text_outside_blocks_byte_for_byte(repo: Path):
    doc = repo / "research" / "RESULTS.md"
    # Stale bodies, odd whitespace and CRLF outside the blocks: only the bodies may change.
    text = BLOCK.sub(r"\1| stale |\n\3", doc.read_text()).replace("Splits (", "Splits \t(", 1) + "tail\r\nno newline"
    doc.write_bytes(text.encode())
    assert render_results.main(["--root", str(repo)]) == 0
    rendered = doc.read_bytes().decode()
    assert "| stale |" not in rendered
    assert outside_blocks(rendered) == outside_blocks(text)
    assert rendered.endswith("tail\r\nno newline")
    assert rendered == (ROOT / "research" / "RESULTS.md").read_text().replace("Splits (", "Splits \t(", 1) + "tail\r\nno newline"


def test_unknown_block_and_missing_record_are_one_line_errors(repo: Path, capsys):
    doc = repo / "research" / "RESULTS.md"
    original = doc.read_text()
    doc.write_text(original + "<!-- generated: nosuch (python research/render_results.py) -->\n<!-- /generated: nosuch -->\n")
    assert render_results.main(["--check", "--root", str(repo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("render_results: error: research/RESULTS.md: unknown block 'nosuch'") and "\n" not in err

    doc.write_text(original)
    (repo / "research" / "results" / "zo_study" / "d1e-5_bal_lr1e-4_seed2.jsonl").unlink()
    assert render_results.main(["--root", str(repo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("render_results: error: block 'learning_curves' needs the recorded file "
                   "research/results/zo_study/d1e-5_bal_lr1e-4_seed2.jsonl, which is missing")
    assert doc.read_text() == original  # an error writes nothing


def test_summary_reports_the_calibrated_detector_once_it_is_tuned(repo: Path):
    """The README's detector line says 'when they are recorded' until `tune` writes the calibration
    study's detector.json, then its held-out confusion counts."""
    readme = repo / "docs" / "measurements.md"  # the paper_summary block
    cal = repo / "research" / "results" / "vp_detector_cal"
    (cal / "detector.json").unlink(missing_ok=True)
    assert render_results.main(["--root", str(repo)]) == 0
    assert "scored on fresh federations when they are recorded" in readme.read_text()
    report = {"tp": 9, "fp": 5, "fn": 11, "tn": 75, "precision": 0.643, "recall": 0.45, "f1": 0.529}
    (cal / "detector.json").write_text(json.dumps({"tune": "0-9", "report": "10-19", "tuned_report": report,
                                                   "chance_f1": 0.31, "everyone_f1": 0.57, "setting": {}}))
    assert render_results.main(["--check", "--root", str(repo)]) == 1
    assert render_results.main(["--root", str(repo)]) == 0
    text = readme.read_text()
    assert "scores F1 0.53 on federations 10-19 (TP 9, FP 5, FN 11, TN 75) vs 0.31 for random flags" in text
    assert "when they are recorded" not in text


def test_summary_reports_vp_effect_paired_by_seed_once_it_is_tabled(repo: Path):
    """The README's detector line says VP's effect is not measured until `compare.py --study vp-effect
    table` writes its summary, then each row minus plain Meerkat paired by seed, and who was limited."""
    readme = repo / "docs" / "measurements.md"  # the paper_summary block
    summary = repo / "research" / "results" / "compare" / "summary_vp_effect.json"
    summary.unlink(missing_ok=True)
    assert render_results.main(["--root", str(repo)]) == 0
    assert "VP's effect at equal budget (`compare.py --study vp-effect`) is not measured yet." in readme.read_text()
    row = {"lr": 3e-4, "seeds": 3, "gain": [0.0, 0.0, 0.0], "gain_ci": [[0, 0]] * 3}
    summary.write_text(json.dumps({"methods": {
        "vp-none": {**row, "seed_ids": [0, 1, 2], "balanced_accuracy": [0.70, 0.72, 0.74]},
        # seed 1 not tested yet: only seeds 0 and 2 pair
        "vp-gradip": {**row, "seed_ids": [0, 2], "balanced_accuracy": [0.71, 0.76], "limited": [[2, 1, 3], [3, 3, 3]]},
    }}))
    assert render_results.main(["--check", "--root", str(repo)]) == 1
    assert render_results.main(["--root", str(repo)]) == 0
    text = readme.read_text()
    # differences +0.01 and +0.02: mean +0.015, t(1) 12.706 * 0.00707 / sqrt(2) = 0.0635
    assert ("vp-gradip minus plain Meerkat +0.015 [-0.049, +0.079] over 2 seeds, limiting 5 clients of which 4 "
            "single-label (of 6)") in text
    assert "VP's effect at equal budget (`compare.py --study vp-effect`) is not measured yet" not in text
    summary.write_text(json.dumps({"methods": {
        "vp-none": {**row, "seed_ids": [0, 1], "balanced_accuracy": [0.70, 0.72]},
        "vp-gradip": {**row, "seed_ids": [0, 1], "balanced_accuracy": [0.71, 0.72], "limited": [[2, 1, 3], [3, 3, 3]]},
        "vp-random": {**row, "seed_ids": [0, 1], "balanced_accuracy": [0.70, 0.70], "limited": [[2, 0, 3], [3, 1, 3]]},
    }}))
    assert render_results.main(["--root", str(repo)]) == 0
    # gradip - random: +0.01, +0.02
    assert "; vp-gradip minus vp-random +0.015 [-0.049, +0.079]." in readme.read_text()


def test_the_dp_line_says_each_epsilon_minus_the_same_shape_without_dp_paired_by_seed(repo: Path):
    """Issue 14's README line: per shape (federated against meerkat, single site against site) and target
    epsilon, the epsilon spent and the paired difference; rows not tested yet are named as running."""
    readme = repo / "docs" / "measurements.md"  # the paper_summary block
    summary = repo / "research" / "results" / "compare" / "summary_dp.json"
    summary.unlink(missing_ok=True)
    assert render_results.main(["--root", str(repo)]) == 0
    assert "utility at epsilon 1/3/8 not measured yet" in readme.read_text()
    row = {"lr": 3e-4, "seeds": 2, "seed_ids": [0, 1], "gain_ci": [[0, 0]] * 2}
    summary.write_text(json.dumps({"methods": {
        "meerkat": {**row, "balanced_accuracy": [0.75, 0.76], "gain": [0.01, 0.02]},
        "dp-eps8": {**row, "balanced_accuracy": [0.74, 0.74], "gain": [0.0, 0.0], "epsilon": [7.98, 8.0]},
        "dp-eps1": {**row, "balanced_accuracy": [0.73, 0.73], "gain": [0.0, 0.0], "epsilon": [0.99, 1.0]},
        "site-dp-eps8": {**row, "balanced_accuracy": [0.74, 0.75], "gain": [0.0, 0.01], "epsilon": [8.0, 8.0]},
    }, "searching": ["dp-eps3", "site"]}))
    assert render_results.main(["--root", str(repo)]) == 0
    text = readme.read_text()
    # federated: eps 8 -0.01, -0.02 (mean -0.015, half 12.706 * 0.00707 / sqrt 2 = 0.0635); eps 1 -0.02, -0.03
    assert ("federated (meerkat without DP: gain +0.015 [-0.049, +0.079]) epsilon 8 -0.015 [-0.079, +0.049] over 2 "
            "seeds, epsilon 1 -0.025 [-0.089, +0.039] over 2 seeds") in text
    # single site without its non-private row yet: the gain over zero-shot instead
    assert "single site: epsilon 8: gain over zero-shot +0.005 [-0.059, +0.069]; still running: dp-eps3, site." in text


def test_the_comparison_line_says_which_rows_differ_from_meerkat_paired_by_seed():
    methods = {"meerkat": {"seed_ids": [0, 1, 2], "balanced_accuracy": [0.75, 0.76, 0.77]},
               "random": {"seed_ids": [0, 1, 2], "balanced_accuracy": [0.74, 0.74, 0.76]},   # -0.01, -0.02, -0.01
               "lora": {"seed_ids": [0, 1, 2], "balanced_accuracy": [0.70, 0.71, 0.72]},     # -0.05 each: apart
               "one-seed": {"seed_ids": [2], "balanced_accuracy": [0.5]}}                    # no interval: left out
    # random: mean -0.0133, sd 0.00577, half 4.303 * 0.00577 / sqrt(3) = 0.0143 -> covers 0
    assert render_results._paired_verdict(methods) == (
        " Minus Meerkat, paired by seed: random -0.013 [-0.028, +0.001] (intervals covering 0);"
        " lora -0.050 [-0.050, -0.050] (excluding 0).")
    assert render_results._paired_verdict({"meerkat": {"balanced_accuracy": [0.7]}}) == ""  # an old summary
