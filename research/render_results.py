"""Regenerate the result tables in research/RESULTS.md and docs/ from the recorded runs.

Numbers typed by hand drift from the files they were read off (issue 12), so every table that comes
from a file under research/results/ lives between two markers,

    <!-- generated: NAME (python research/render_results.py) -->
    ...
    <!-- /generated: NAME -->

and is rewritten from the records by the renderer RENDERERS[NAME]; text outside the markers is left
byte for byte as it is. The sources, all under research/results/:

    baselines      zo_study/baselines.json         (zo_study.py prepare)
    diagnose       zo_study/diagnose.jsonl         (zo_study.py diagnose)
    learning_curves zo_study/RUN.jsonl for RUN in LEARNING_CURVE_RUNS (zo_study.py run)
    test_split     zo_study/test_results.jsonl     (zo_study.py test; a run tested twice: latest row)
    across_seeds   zo_study/test_results.jsonl, the SEED_RUNS at SEED_STEP
    study_summary  (docs/main-job.md) test_split's gains in short, then across_seeds
    federated_curves curves/*.jsonl                (learning_curve.py federated)
    comparison     compare/table.md                (compare.py table, from compare/cells.jsonl + tests.jsonl)
    vp_detector    vp_detector/detector.md         (vp_detector.py tune, from vp_detector/traces.jsonl)
    drift_grid     drift_grid/grid.md              (drift_grid.py: hostile clients, robust bound off and on)
    vp_separability vp_detector/separability.md    (vp_detector.py separability)
    vp_cal_separability vp_detector_cal/separability.md (the same, 20-step lr-3e-3 traces)
    vp_cal_detector vp_detector_cal/detector.md     (vp_detector.py tune on those traces)
    vp_ceiling     vp_detector/ceiling.md          (vp_detector.py ceiling: partitions only)
    vp_effect      compare/table_vp_effect.md      (compare.py --study vp-effect table)
    compare_movement compare/movement.md           (compare.py movement: how far the masked rows moved)
    dp_utility     compare/table_dp.md             (compare.py --study dp table)
    dp_noise       compare/dp_noise.md             (compare.py --study dp dp-noise: DP noise vs the scalars' spread)
    paper_summary  (docs/measurements.md) compare/summary.json, vp_detector/separability.json + detector.json,
                   compare/summary_dp.json if the dp study has been tabled

    python research/render_results.py            # rewrite the blocks in place
    python research/render_results.py --check    # exit 1 naming each stale block (for CI)

Exit status 2 with one line for an unknown block name, an unclosed marker or a missing record.
Only the standard library (and PyYAML, already a dependency) is used, so the check costs well
under a second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("research/RESULTS.md", "docs/main-job.md", "docs/measurements.md")  # the files whose blocks are rendered
SCRIPT = "python research/render_results.py"

# The single-site runs of the learning-curve table, in table order (a run not listed is not shown:
# the study's dead ends on the 0.1% mask are summarised in prose).
LEARNING_CURVE_RUNS = (
    "d1e-5_bal_lr1e-4_long",  # seed 0 continued from its step-1000 checkpoint to 1600 (same batches/seeds)
    "d1e-5_bal_lr1e-4_seed1",
    "d1e-5_bal_lr1e-4_seed2",
    "d1e-5_bal_lr3e-4_cos_seed1",  # lr 3e-4 with cosine decay to 0 over 700 steps, seed 1
    "d1e-5_bal_lr3e-4",
    "d1e-5_bal_lr1e-3",
    "fo_d1e-5_bal_lr1e-2",
)
# Order of the test-split rows: seed 0 at step 700, then the curves' runs (seed 0 continued to 1600 among them).
TEST_ORDER = ("d1e-5_bal_lr1e-4",) + LEARNING_CURVE_RUNS
# The same recipe under different seeds (batches and perturbations), compared at one fixed step.
SEED_RUNS = ("d1e-5_bal_lr1e-4", "d1e-5_bal_lr1e-4_seed1", "d1e-5_bal_lr1e-4_seed2")
SEED_STEP = 700
# diagnose.jsonl rows in table order: (mask spec, label, bold). A diagnosed mask not listed here is
# appended under its spec, so a new record never silently goes missing.
DIAGNOSE_ROWS = (
    ("docs64x256-0.001", "density 1e-3 (the paper's 0.1%)", False),
    ("docs64x256-0.0001", "density 1e-4", False),
    ("docs64x256-1e-05", "density 1e-5", True),
    ("docs64x256-1e-05@320", "top 320 (density 3e-6)", False),
    ("head", "label words' embedding rows (\"task head\")", False),
)
# Two-sided 95% t quantiles t_{0.975, df}; scipy is not a dependency.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


class RenderError(Exception):
    """A one-line, user-facing problem: unknown block, unclosed marker, missing or malformed record."""


# ------------------------------------------------------------------------------------ formatting
def f3(x: float) -> str:
    return f"{x:.3f}"


def s3(x: float) -> str:
    return f"{x:+.3f}"


def ci(lo: float, hi: float, signed: bool = False) -> str:
    f = s3 if signed else f3
    return f"[{f(lo)}, {f(hi)}]"


def sci(x: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04, as the run names and tables write learning rates."""
    mantissa, exponent = f"{x:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def sig(x: float, digits: int) -> str:
    """`digits` significant figures, integers of 1,000 and more with a thousands separator."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}" if decimals else f"{round(x):,}"


def kilo(n: int) -> str:
    return f"{n / 1000:.1f}k"


def bold(text: str, on: bool = True) -> str:
    return f"**{text}**" if on else text


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- records
class Records:
    """Read access to research/results/ that names the missing file and the block that needed it."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "research" / "results"
        self.block = "?"

    def path(self, rel: str) -> Path:
        p = self.dir / rel
        if not p.is_file():
            raise RenderError(f"block {self.block!r} needs the recorded file {p.relative_to(self.root)}, which is missing")
        return p

    def json(self, rel: str):
        return json.loads(self.path(rel).read_text())

    def jsonl(self, rel: str) -> list[dict]:
        # NaN is valid for json.loads (Python wrote it), so diagnose rows with lr* = NaN parse.
        return [json.loads(line) for line in self.path(rel).read_text().splitlines() if line.strip()]

    def test_rows(self) -> dict[str, dict]:
        """test_results.jsonl by run name, in file order of first test; a run tested again keeps its latest row."""
        rows: dict[str, dict] = {}
        for r in self.jsonl("zo_study/test_results.jsonl"):
            rows[r["name"]] = r
        return rows


# ------------------------------------------------------------------------------------- renderers
def render_baselines(rec: Records) -> str:
    b = rec.json("zo_study/baselines.json")
    rows = []
    for split, note in (("validation", ""), ("test", " (offsets fitted on validation)")):
        zs, pc = b[split]["zero_shot"], b[split]["prior_corrected"]
        rows.append([split, f3(zs["accuracy"]),
                     f"{f3(zs['balanced_accuracy'])} {ci(*zs['balanced_accuracy_ci'])}",
                     f"{f3(pc['balanced_accuracy'])} {ci(*pc['balanced_accuracy_ci'])}{note}",
                     f3(zs["auc"])])
    return table(["split", "zero-shot acc", "zero-shot balanced acc", "prior-corrected balanced acc", "zero-shot AUC"], rows)


def render_diagnose(rec: Records) -> str:
    latest: dict[str, dict] = {}
    for r in rec.jsonl("zo_study/diagnose.jsonl"):
        latest[r["mask"]] = r
    known = {m for m, _, _ in DIAGNOSE_ROWS}
    specs = [(m, label, b) for m, label, b in DIAGNOSE_ROWS if m in latest]
    specs += [(m, f"`{m}`", False) for m in latest if m not in known]
    missing = [m for m in known if m not in latest]
    if missing:
        raise RenderError(f"block 'diagnose': zo_study/diagnose.jsonl has no row for mask {sorted(missing)[0]!r}")

    def num(x, fmt):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt(x)

    rows = []
    for mask, label, b in specs:
        r = latest[mask]
        # diagnose estimates |G|^2 unbiasedly (|mean of batch gradients|^2 minus its noise term), so a
        # gradient with no consistent direction can come out negative: that is "zero within noise".
        g2 = r["full_grad_sq"]
        rows.append([bold(label, b), bold(f"{r['k']:,}", b), "~0 (noise)" if g2 <= 0 else f"{g2:.2f}",
                     sig(r["minibatch_grad_sq"], 3), sig(r["zHz_eps3e-3"], 3), sig(r["zHz_per_coord"], 2),
                     num(r["lr_star"], lambda x: f"{x:.1e}".replace("e-0", "e-")),
                     bold(num(r["loss_drop_per_step_at_lr_star"], lambda x: f"{x:.1e}".replace("e-0", "e-")), b),
                     bold(num(r["steps_for_0.01_loss_drop"], lambda x: f"{round(x):,}"), b)])
    return table(["mask (64 x 256 `python_docs` calibration)", "k", "\\|G\\|^2 (full data)", "E\\|g_b\\|^2 (batch 8)",
                  "E[z^T H z]", "per coordinate", "lr*", "loss drop / step at lr*", "steps for 0.01"], rows)


def _run_rows(rec: Records, name: str) -> tuple[dict, list[dict]]:
    rows = rec.jsonl(f"zo_study/{name}.jsonl")
    if not rows or rows[0].get("step") != 0 or "config" not in rows[0]:
        raise RenderError(f"block {rec.block!r}: zo_study/{name}.jsonl does not start with the step-0 row holding 'config'")
    evals: dict[int, dict] = {}
    for r in rows[1:]:
        evals[r["step"]] = r  # a resumed run may log a step again: the latest reading wins
    return rows[0], [evals[s] for s in sorted(evals)]


def _optimizer(cfg: dict, long: bool) -> str:
    opt = cfg.get("optimizer", "zo")
    return {"zo": "ZO", "fo": "first-order SGD" if long else "FO"}.get(opt, opt)


def _spaced(values: list[int], step_values: list[int]) -> str:
    """Forward passes per eval, or "1.6k per 100 steps" when a long run is evenly spaced."""
    if len(values) > 4:
        d = {b - a for a, b in zip([0] + values, values)}
        s = {b - a for a, b in zip([0] + step_values, step_values)}
        if len(d) == 1 and len(s) == 1:
            return f"{kilo(d.pop())} per {s.pop()} steps"
    return " / ".join(kilo(v) for v in values)


def render_learning_curves(rec: Records) -> str:
    first = [_run_rows(rec, n) for n in LEARNING_CURVE_RUNS]
    zero = first[0][0]
    for name, (head, _) in zip(LEARNING_CURVE_RUNS, first):
        if (head["bal_acc"], head["auc"]) != (zero["bal_acc"], zero["auc"]):
            raise RenderError(f"block {rec.block!r}: {name} starts from another zero-shot reading than "
                              f"{LEARNING_CURVE_RUNS[0]} (different validation batch?); it needs a table of its own")
    rows = [["zero-shot (same 512)", "-", "-", "-", "0", "0", f3(zero["bal_acc"]), f3(zero["auc"]), f"{zero['pred_pos']:.2f}"]]
    for name, (head, evals) in zip(LEARNING_CURVE_RUNS, first):
        cfg = head["config"]
        opt = _optimizer(cfg, long=True) + (f", seed {cfg['seed']}" if cfg.get("seed", 0) else "")
        steps = [e["step"] for e in evals]
        rows.append([f"`{name}`", opt, f"{head['k']:,}", sci(cfg["lr"]), " / ".join(map(str, steps)),
                     _spaced([e["forward_passes"] for e in evals], steps),
                     " / ".join(f3(e["bal_acc"]) for e in evals), " / ".join(f3(e["auc"]) for e in evals),
                     " / ".join(f"{e['pred_pos']:.2f}" for e in evals)])
    return table(["run", "optimizer", "k", "lr", "steps", "forward passes", "balanced acc", "AUC", "P(positive)"], rows)


def _gain(g: dict) -> str:
    return bold(f"{s3(g['gain'])} {ci(*g['gain_ci'], signed=True)}", g.get("excludes_zero", False))


def render_test_split(rec: Records) -> str:
    tests = rec.test_rows()
    order = [n for n in TEST_ORDER if n in tests] + [n for n in tests if n not in TEST_ORDER]
    b = rec.json("zo_study/baselines.json")["test"]
    zs_ref, pc_ref = b["zero_shot"]["balanced_accuracy"], b["prior_corrected"]["balanced_accuracy"]
    ppl_ref = next(iter(tests.values()))["forgetting"]["perplexity_before"] if tests else float("nan")
    rows = []
    for name in order:
        r = tests[name]
        t, cfg, fg = r["trained"], r["config"], r["forgetting"]
        label = f"{_optimizer(cfg, long=False)} `{name}`" + (f" (seed {cfg['seed']})" if cfg.get("seed", 0) else "")
        gz, gp = _gain(r["gain_over_zero_shot"]), _gain(r["gain_over_prior_corrected"])
        # The header names one baseline; a row measured against another (a changed split) says so.
        if f3(r["zero_shot"]["balanced_accuracy"]) != f3(zs_ref):
            gz += f" (vs {f3(r['zero_shot']['balanced_accuracy'])})"
        if f3(r["prior_corrected"]["balanced_accuracy"]) != f3(pc_ref):
            gp += f" (vs {f3(r['prior_corrected']['balanced_accuracy'])})"
        both = "-"
        if "trained_prior_corrected" in r:
            cg = r["corrected_gain_over_prior_corrected"]
            both = f"{f3(r['trained_prior_corrected']['balanced_accuracy'])}, {s3(cg['gain'])} {ci(*cg['gain_ci'], signed=True)}"
        ppl = f"{fg['perplexity_after']:.2f}"
        if f"{fg['perplexity_before']:.2f}" != f"{ppl_ref:.2f}":
            ppl += f" (from {fg['perplexity_before']:.2f})"
        rows.append([label, str(r["step"]), f"{f3(t['balanced_accuracy'])} {ci(*t['balanced_accuracy_ci'])}",
                     gz, gp, both, ppl])
    return table(["run", "step", "test balanced acc", f"gain over zero-shot ({f3(zs_ref)})",
                  f"gain over prior-corrected zero-shot ({f3(pc_ref)})", "both prior-corrected",
                  f"generic perplexity ({ppl_ref:.2f} before)"], rows)


def t975(df: int) -> float:
    try:
        from scipy.stats import t  # exact when available
        return float(t.ppf(0.975, df))
    except ImportError:
        if df not in T975:
            raise RenderError(f"block 'across_seeds': no t quantile for {df} degrees of freedom (T975 covers 1-10)")
        return T975[df]


def render_across_seeds(rec: Records) -> str:
    tests = rec.test_rows()
    gains = []
    for name in SEED_RUNS:
        r = tests.get(name)
        if r is None or r["step"] != SEED_STEP:
            got = "no test" if r is None else f"its latest test is at step {r['step']}"
            raise RenderError(f"block 'across_seeds': zo_study/test_results.jsonl has no step-{SEED_STEP} test of {name} ({got})")
        gains.append(r["gain_over_zero_shot"]["gain"])
    n = len(gains)
    mean, sd = statistics.fmean(gains), statistics.stdev(gains)
    half = t975(n - 1) * sd / math.sqrt(n)
    names = ", ".join(f"`{n_}`" for n_ in SEED_RUNS)
    caption = (f"**Across seeds** (the same recipe, seeds differing in batches and perturbations; test gain over "
               f"zero-shot at step {SEED_STEP}; t-interval = mean +- t(0.975, n-1) x std / sqrt(n)):\n\n")
    return caption + table(["runs (one seed each)", "step", "test gain over zero-shot, per seed", "mean", "sample std",
                  f"95% t-interval over seeds (n = {n})"],
                 [[names, str(SEED_STEP), " / ".join(s3(g) for g in gains), s3(mean), f3(sd),
                   ci(mean - half, mean + half, signed=True)]])


def _settings(command: str, defaults: dict) -> dict:
    """The --set key=value pairs of a recorded command over the default job's values (dotted keys)."""
    flat = {"lr": defaults.get("learning_rate", defaults.get("lr")), "local_steps": defaults.get("local_steps"), "rounds": defaults.get("rounds"),
            "partition.scheme": defaults.get("partition", {}).get("scheme"),
            "partition.alpha": defaults.get("partition", {}).get("alpha"), "task.loss": "candidates",
            "eval_examples": "1000"}  # learning_curve.py's --eval-examples default
    argv = shlex.split(command)
    for a, b in zip(argv, argv[1:]):
        if a == "--set" and "=" in b:
            k, v = b.split("=", 1)
            flat["lr" if k == "learning_rate" else k] = v  # recorded commands use either name
        if a == "--eval-examples":
            flat["eval_examples"] = b
    return flat


def render_federated_test(rec: Records) -> str:
    """Test split of the federated curves that were tested (`learning_curve.py test`), latest row per curve."""
    tests: dict[str, dict] = {}
    for r in rec.jsonl("curves/test_results.jsonl"):
        tests[r["curve"]] = r
    rows = []
    for name, r in tests.items():
        curve = rec.jsonl(f"curves/{name}.jsonl")
        last = curve[-1]
        fg = r["forgetting"]
        rows.append([f"`{name}`", str(last["round"]), kilo(int(last["forward_passes"])),
                     f"{f3(r['trained']['balanced_accuracy'])} {ci(*r['trained']['balanced_accuracy_ci'])}",
                     _gain(r["gain_over_zero_shot"]), _gain(r["gain_over_prior_corrected"]),
                     f"{fg['perplexity_before']:.2f} -> {fg['perplexity_after']:.2f}"])
    caption = ("**Federated, test split** (`research/learning_curve.py test --name CURVE`: the curve's final state "
               "on all 2,314 test tweets; paired bootstrap 95% intervals; forgetting as above):\n\n")
    return caption + table(["curve", "rounds", "forward passes", "test balanced acc", "gain over zero-shot",
                            "gain over prior-corrected zero-shot", "generic perplexity"], rows)


def render_federated_curves(rec: Records) -> str:
    import yaml

    default = rec.root / "meerkat_hf" / "federated" / "default.yaml"
    defaults = yaml.safe_load(default.read_text()) if default.is_file() else {}
    curves = sorted(p for p in (rec.dir / "curves").glob("*.jsonl")
                    if not p.name.endswith(".metrics.jsonl") and p.name != "test_results.jsonl")
    if not curves:
        raise RenderError("block 'federated_curves' needs research/results/curves/*.jsonl, and there is none")
    rows = []
    for p in curves:
        recs = rec.jsonl(f"curves/{p.name}")
        if not recs or "command" not in recs[0]:
            raise RenderError(f"block 'federated_curves': curves/{p.name} does not start with the row holding 'command'")
        if "round" not in recs[0]:
            continue  # a single-site curve (learning_curve.py single): not a federated row
        s = _settings(recs[0]["command"], defaults)
        scheme = s["partition.scheme"]
        partition = f"{scheme} {s['partition.alpha']}" if scheme == "dirichlet" else str(scheme)
        lr = s["lr"]
        lr = sci(float(lr)) if lr is not None else "-"
        ev = [r for r in recs if r.get("balanced_accuracy") is not None]
        rows.append([f"`{recs[0]['curve']}`", lr, partition, str(s["task.loss"]), str(s["local_steps"]), s["eval_examples"],
                     " / ".join(str(r["round"]) for r in ev),
                     " / ".join(f"{f3(r['balanced_accuracy'])} {ci(r['balanced_accuracy_ci_low'], r['balanced_accuracy_ci_high'])}"
                                for r in ev),
                     " / ".join(f3(r["auc"]) for r in ev)])
    caption = ("**Federated learning curves** (`research/learning_curve.py federated`, each curve's command in the "
               "first row of `research/results/curves/NAME.jsonl`; validation balanced accuracy with 95% bootstrap "
               "intervals on the curve's own `--eval-examples` subset; round 0 = zero-shot, T = local steps):\n\n")
    return caption + table(["curve", "lr", "partition", "loss", "T", "eval examples", "evaluated rounds",
                            "balanced acc [95% CI]", "AUC"], rows)


def render_study_summary(rec: Records) -> str:
    """The README's short form of test_split + across_seeds: what a reader needs before RESULTS.md."""
    tests = rec.test_rows()
    zs = rec.json("zo_study/baselines.json")["test"]["zero_shot"]["balanced_accuracy"]
    rows = []
    for name in [n for n in TEST_ORDER if n in tests] + [n for n in tests if n not in TEST_ORDER]:
        r = tests[name]
        cfg, fg = r["config"], r["forgetting"]
        what = f"{_optimizer(cfg, long=True)}, lr {sci(cfg['lr'])}, seed {cfg.get('seed', 0)}"
        rows.append([f"`{name}`", what, str(r["step"]), f3(r["trained"]["balanced_accuracy"]),
                     _gain(r["gain_over_zero_shot"]),
                     f"{fg['perplexity_before']:.1f} -> {fg['perplexity_after']:.1f}"])
    caption = (f"Test split of the study's tested runs (`research/results/zo_study/test_results.jsonl`; all 2,314 "
               f"test examples, zero-shot balanced accuracy {f3(zs)}; paired bootstrap 95% intervals; "
               f"generic perplexity = forgetting):\n\n")
    return caption + table(["run", "optimizer", "step", "test balanced acc", "gain over zero-shot",
                            "generic perplexity"], rows) + "\n\n" + render_across_seeds(rec)


def render_cli_runs(rec: Records) -> str:
    """`meerkat-hf federate` runs recorded under research/results/cli/: NAME.summary.json (--summary-json)
    + NAME.report.txt (its printed report, then `command:` and `wall:` lines)."""
    summaries = sorted((rec.dir / "cli").glob("*.summary.json"))
    if not summaries:
        raise RenderError("block 'cli_runs' needs research/results/cli/*.summary.json, and there is none")
    rows = []
    for p in summaries:
        name = p.name[: -len(".summary.json")]
        s = rec.json(f"cli/{p.name}")
        facts = {}
        for line in rec.path(f"cli/{name}.report.txt").read_text().splitlines():
            key, _, value = line.partition(": ")
            if key in ("command", "wall"):
                facts[key] = value.strip()
        if set(facts) != {"command", "wall"}:
            raise RenderError(f"block 'cli_runs': cli/{name}.report.txt needs a 'command:' and a 'wall:' line")
        b, a, g = s["balanced_accuracy_before"], s["balanced_accuracy_after"], s["balanced_accuracy_gain"]
        auc = "not recorded"  # runs from before the report carried AUC
        if s.get("auc_gain"):
            ab, aa, ag = s["auc_before"], s["auc_after"], s["auc_gain"]
            auc = (f"{f3(ab['value'])} -> {f3(aa['value'])}, "
                   + bold(f"{s3(ag['value'])} {ci(*ag['ci95'], signed=True)}", ag["ci95"][0] > 0 or ag["ci95"][1] < 0))
        rows.append([f"`{facts['command'].replace('HF_HUB_OFFLINE=1 ', '').replace('OMP_NUM_THREADS=1 ', '')}`",
                     str(s.get("eval_examples") or g.get("n") or "?"),
                     f"{f3(b['value'])} {ci(*b['ci95'])}", f"{f3(a['value'])} {ci(*a['ci95'])}",
                     bold(f"{s3(g['value'])} {ci(*g['ci95'], signed=True)}", g["ci95"][0] > 0 or g["ci95"][1] < 0),
                     auc, facts["wall"]])
    caption = ("`meerkat-hf federate` runs as a user runs them (recorded in `research/results/cli/`: the "
               "`--summary-json` output and the printed report; balanced accuracy and AUC on the config's eval examples, "
               "paired bootstrap 95% intervals of the gains; bold where it excludes 0):\n\n")
    return caption + table(["command", "eval examples", "balanced acc before", "after", "gain", "AUC before -> after, gain",
                            "wall time"], rows)


def render_comparison(rec: Records) -> str:
    """The paper's comparison: the tables `research/compare.py table` wrote next to its records."""
    return rec.path("compare/table.md").read_text().rstrip("\n")


def render_vp_detector(rec: Records) -> str:
    """Meerkat-VP's detector as a classifier: `research/vp_detector.py tune`'s report."""
    return rec.path("vp_detector/detector.md").read_text().rstrip("\n")


def render_drift_grid(rec: Records) -> str:
    """The hostile-client drift grid: `research/drift_grid.py`'s table, robust bound off and on."""
    return rec.path("drift_grid/grid.md").read_text().strip("\n")


def render_paper_summary(rec: Records) -> str:
    """README's three lines on issue 13/14: the comparison, the detector, DP, from their recorded summaries."""
    cmp_ = rec.json("compare/summary.json")
    sep, det = rec.json("vp_detector/separability.json"), rec.json("vp_detector/detector.json")
    rows = []
    for name, m in cmp_["methods"].items():
        gains = m["gain"]
        mean = statistics.fmean(gains)
        if len(gains) > 1:
            half = T975[len(gains) - 1] * statistics.stdev(gains) / math.sqrt(len(gains))
            rows.append(f"{name} (lr {m['lr']:g}) {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] over {len(gains)} seeds")
        else:
            lo, hi = m["gain_ci"][0]
            rows.append(f"{name} (lr {m['lr']:g}) {mean:+.3f} [{lo:+.3f}, {hi:+.3f}], 1 seed")
    longer = sorted(cmp_.get("long_tests", {}).items())
    extra = ""
    if longer:
        g = [v["gain"] for _, v in longer]
        extra = (f". Meerkat continued to {cmp_['long_rounds']} rounds: {', '.join(f'{x:+.3f}' for x in g)}"
                 + (f" (mean {statistics.fmean(g):+.3f})" if len(g) > 1 else ""))
        if "meerkat" in cmp_["methods"]:  # the same seeds at the comparison's budget
            seeds = [int(c.rsplit("-s", 1)[1].split("-")[0]) for c, _ in longer]
            short = [cmp_["methods"]["meerkat"]["gain"][s] for s in seeds if s < len(cmp_["methods"]["meerkat"]["gain"])]
            extra += (f" vs {', '.join(f'{x:+.3f}' for x in short)} for the same seeds at {cmp_.get('rounds', 3)} rounds"
                      if short else "")
    line1 = (f"- **The paper's comparison** (`research/compare.py`, 10 clients, Dirichlet 0.5, T = 10; test balanced-accuracy "
             f"gain over zero-shot {cmp_['zero_shot_balanced_accuracy']:.3f} after {cmp_.get('rounds', 3)} rounds, mean "
             f"[95% t-interval over seeds]): "
             + ("; ".join(rows) if rows else "no method scored yet")
             + extra
             + (f". Still measuring: {', '.join(cmp_['searching'])}." if cmp_["searching"] else ".")
             + _paired_verdict(cmp_["methods"])
             + "".join(f" The paper on {model} (accuracy): {', '.join(f'{m} {v:.3f}' for m, v in rows.items())}."
                       for model, rows in cmp_.get("paper", {}).items() if rows))
    d = sep["auc"].get("decay: early / late mean abs(GradIP)")
    rep = det["tuned_report"]
    line2 = (f"- **Meerkat-VP's detector** (`research/vp_detector.py`, T = 10 at the training lr): GradIP does not tell "
             f"single-label clients from mixed ones on this model, ROC-AUC {d[0]:.2f} [{d[1]:.2f}, {d[2]:.2f}] over "
             f"{sep['federations']} federations (0.5 = no information); tuned F1 {rep['f1']:.2f} on fresh federations vs "
             f"{det['chance_f1']:.2f} for random flags and {det['everyone_f1']:.2f} for flagging everyone.")
    cal_path = rec.dir / "vp_detector_cal" / "separability.json"
    if cal_path.is_file():  # the calibration study: a longer window at a larger lr
        cal = json.loads(cal_path.read_text())
        c = cal["auc"]["decay: early / late mean abs(GradIP)"]
        line2 += (f" With a 20-step calibration window at lr 3e-3 the decay carries some information, ROC-AUC "
                  f"{c[0]:.2f} [{c[1]:.2f}, {c[2]:.2f}] over {cal['federations']} tuning federations")
        cal_det = rec.dir / "vp_detector_cal" / "detector.json"
        if cal_det.is_file():  # the detector tuned on those federations, scored once on fresh ones
            cd = json.loads(cal_det.read_text())
            r = cd["tuned_report"]
            line2 += (f"; the detector tuned there scores F1 {r['f1']:.2f} on federations {cd['report']} (TP {r['tp']}, "
                      f"FP {r['fp']}, FN {r['fn']}, TN {r['tn']}) vs {cd['chance_f1']:.2f} for random flags and "
                      f"{cd['everyone_f1']:.2f} for flagging everyone: the paper's F1 >= 0.9 is not reproduced.")
        else:
            line2 += " (the detector tuned there is scored on fresh federations when they are recorded)."
    line2 += _vp_effect_sentence(rec)
    line3 = _dp_line(rec)
    return "\n".join((line1, line2, line3))


def _paired_verdict(methods: dict[str, dict]) -> str:
    """Which rows differ from Meerkat, paired by seed, with a 95% t-interval that excludes 0."""
    if "meerkat" not in methods or "seed_ids" not in methods["meerkat"]:
        return ""
    base = dict(zip(methods["meerkat"]["seed_ids"], methods["meerkat"]["balanced_accuracy"]))
    apart, close = [], []
    for name, m in methods.items():
        diffs = [ba - base[s] for s, ba in zip(m.get("seed_ids", []), m["balanced_accuracy"]) if s in base]
        if name == "meerkat" or len(diffs) < 2:
            continue
        mean, lo, hi = t_interval(diffs)
        (apart if lo > 0 or hi < 0 else close).append(f"{name} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if not apart and not close:
        return ""
    text = " Minus Meerkat, paired by seed:"
    if close:
        text += f" {'; '.join(close)} (intervals covering 0)"
    if apart:
        text += f"{';' if close else ''} {'; '.join(apart)} (excluding 0)"
    return text + "."


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """mean and 95% Student-t interval of a few (>= 2) per-seed numbers."""
    mean = statistics.fmean(xs)
    half = T975[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def _mean_t(xs: list[float]) -> str:
    """mean [95% t-interval] of a few per-seed numbers (just the mean for one)."""
    if len(xs) < 2:
        return f"{statistics.fmean(xs):+.3f} (1 seed)"
    return "{:+.3f} [{:+.3f}, {:+.3f}]".format(*t_interval(xs))


def _vp_effect_sentence(rec: Records) -> str:
    """Issue 13 item 3 in the README's detector line: VP vs plain Meerkat vs random early stopping,
    paired by seed (same partition, data order and test tweets), once `--study vp-effect table` ran."""
    path = rec.dir / "compare" / "summary_vp_effect.json"
    if not path.is_file():
        return " VP's effect at equal budget (`compare.py --study vp-effect`) is not measured yet."
    methods = json.loads(path.read_text())["methods"]
    if "vp-none" not in methods or len(methods) < 2:
        return " VP's effect at equal budget (`compare.py --study vp-effect`) is still running."
    base = dict(zip(methods["vp-none"]["seed_ids"], methods["vp-none"]["balanced_accuracy"]))
    parts = []
    for name in ("vp-gradip", "vp-random"):
        m = methods.get(name)
        if not m:
            continue
        diffs = [ba - base[s] for s, ba in zip(m["seed_ids"], m["balanced_accuracy"]) if s in base]
        limited = m.get("limited", [])
        who = (f", limiting {sum(x[0] for x in limited)} clients of which {sum(x[1] for x in limited)} single-label "
               f"(of {sum(x[2] for x in limited)})" if limited else "")
        parts.append(f"{name} minus plain Meerkat {_mean_t(diffs)} over {len(diffs)} seeds{who}")
    if "vp-gradip" in methods and "vp-random" in methods:  # VP against its control, at the same forward passes
        control = dict(zip(methods["vp-random"]["seed_ids"], methods["vp-random"]["balanced_accuracy"]))
        diffs = [ba - control[s] for s, ba in zip(methods["vp-gradip"]["seed_ids"], methods["vp-gradip"]["balanced_accuracy"])
                 if s in control]
        if diffs:
            parts.append(f"vp-gradip minus vp-random {_mean_t(diffs)}")
    return (" VP's effect at equal budget (`compare.py --study vp-effect`, 3 of 10 clients forced single-label, test balanced "
            "accuracy paired by seed): " + "; ".join(parts) + ".") if parts else ""


DP_SHAPES = (("federated", "meerkat", "dp-eps"), ("single site", "site", "site-dp-eps"))


def _dp_line(rec: Records) -> str:
    """Issue 14 item 4 in the README: per shape and target epsilon, test balanced accuracy minus the same
    shape without DP, paired by seed (`compare.py --study dp table` -> summary_dp.json)."""
    path = rec.dir / "compare" / "summary_dp.json"
    head = "- **Differential privacy** (`compare.py --study dp`"
    if not path.is_file():
        return head + "): utility at epsilon 1/3/8 not measured yet (the grid's last study, after the comparison and VP's effect)."
    summary = json.loads(path.read_text())
    methods = summary["methods"]
    parts = []
    for shape, base_name, prefix in DP_SHAPES:
        base = methods.get(base_name)
        rows = sorted(((name, m) for name, m in methods.items() if name.startswith(prefix)),
                      key=lambda nm: -float(nm[0][len(prefix):]))
        said = []
        for name, m in rows:
            eps = max(m["epsilon"]) if m.get("epsilon") else float(name[len(prefix):])
            if base is None or "seed_ids" not in base:
                said.append(f"epsilon {eps:.2g}: gain over zero-shot {_mean_t(m['gain'])}")
                continue
            ref = dict(zip(base["seed_ids"], base["balanced_accuracy"]))
            diffs = [ba - ref[s] for s, ba in zip(m["seed_ids"], m["balanced_accuracy"]) if s in ref]
            said.append(f"epsilon {eps:.2g} {_mean_t(diffs)} over {len(diffs)} seeds" if diffs else
                        f"epsilon {eps:.2g}: gain over zero-shot {_mean_t(m['gain'])}")
        if said:
            parts.append(f"{shape} ({base_name} without DP: gain {_mean_t(base['gain'])}) " if base else f"{shape}: ")
            parts[-1] += ", ".join(said)
    waiting = [n for n in summary.get("searching", []) if n.startswith(("dp-", "site"))]
    text = (head + ", delta 1e-5, test balanced accuracy minus the same shape without DP, paired by seed; the largest "
            "epsilon any client spent): " + ("; ".join(parts) if parts else "no DP row scored on test yet"))
    if waiting:
        text += f"; still running: {', '.join(waiting)}"
    return text + "."


def _recorded(relative: str) -> Callable[[Records], str]:
    """A block that is one markdown file a benchmark command wrote under research/results/."""
    def render(rec: Records) -> str:
        return rec.path(relative).read_text().rstrip("\n")
    render.__doc__ = f"research/results/{relative}, as its command wrote it."
    return render


RENDERERS: dict[str, Callable[[Records], str]] = {
    "paper_summary": render_paper_summary,
    "vp_separability": _recorded("vp_detector/separability.md"),
    "vp_cal_separability": _recorded("vp_detector_cal/separability.md"),
    "vp_cal_detector": _recorded("vp_detector_cal/detector.md"),
    "vp_ceiling": _recorded("vp_detector/ceiling.md"),
    "vp_effect": _recorded("compare/table_vp_effect.md"),
    "dp_utility": _recorded("compare/table_dp.md"),
    "dp_noise": _recorded("compare/dp_noise.md"),
    "compare_movement": _recorded("compare/movement.md"),
    "comparison": render_comparison,
    "vp_detector": render_vp_detector,
    "drift_grid": render_drift_grid,
    "cli_runs": render_cli_runs,
    "study_summary": render_study_summary,
    "baselines": render_baselines,
    "diagnose": render_diagnose,
    "learning_curves": render_learning_curves,
    "test_split": render_test_split,
    "across_seeds": render_across_seeds,
    "federated_curves": render_federated_curves,
    "federated_test": render_federated_test,
}

# ----------------------------------------------------------------------------------------- blocks
_OPEN = re.compile(r"<!-- generated: ([^ ]+) \(python research/render_results\.py\) -->\n")


def render_text(text: str, rec: Records, where: str) -> tuple[str, list[str]]:
    """`text` with every block re-rendered, and the names of the blocks whose content changed."""
    out, stale, pos = [], [], 0
    while (m := _OPEN.search(text, pos)) is not None:
        name = m.group(1)
        if name not in RENDERERS:
            raise RenderError(f"{where}: unknown block {name!r} (known: {', '.join(RENDERERS)})")
        close = f"<!-- /generated: {name} -->"
        end = text.find(close, m.end())
        if end < 0:
            raise RenderError(f"{where}: block {name!r} has no closing '{close}'")
        rec.block = name
        body = RENDERERS[name](rec).rstrip("\n") + "\n"
        if text[m.end():end] != body:
            stale.append(name)
        out += [text[pos:m.end()], body, close]
        pos = end + len(close)
    out.append(text[pos:])
    return "".join(out), stale


def write_atomic(path: Path, text: str) -> None:
    """A reader never sees a half-written document: the library's atomic writer (temp file, fsync, rename),
    imported here so that `--check` stays standard-library only."""
    from meerkat_hf.hub import write_files_atomically

    write_files_atomically(path.parent, {path.name: text.encode("utf-8")})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each block that differs from the records")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = ap.parse_args(argv)
    rec = Records(args.root)
    rendered: list[tuple[Path, str, str]] = []
    stale_total = 0
    try:
        # Everything is rendered before anything is written, so an error leaves every file as it was.
        for rel in DOCS:
            path = args.root / rel
            if path.is_file():
                text = path.read_bytes().decode("utf-8")  # bytes, not read_text: keep the line endings
                new, stale = render_text(text, rec, rel)
                rendered.append((path, text, new))
                stale_total += len(stale)
                for name in stale:
                    print(f"{rel}: block '{name}' is stale: the records say otherwise (run {SCRIPT})" if args.check
                          else f"{rel}: block '{name}' regenerated")
    except RenderError as e:
        print(f"render_results: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if not stale_total:
            print("render_results: every generated block matches the records")
        return 1 if stale_total else 0
    for path, text, new in rendered:
        if new != text:
            write_atomic(path, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
