"""Meerkat-VP's GradIP detector measured as a classifier (issue 13, item 2).

Each federation: SmolLM2-135M-Instruct, `tweets_binary`, 10 clients, 1-3 of them single-label
(federation i has 1 + i % 3), the rest Dirichlet alpha=0.5, the recipe (density-1e-5 mask,
class-balanced loss), seed 1000 + i (partition, data order and perturbations all differ), every
client in every round. The server's replayed GradIP of every client step is recorded
(`metrics.jsonl` -> `gradip_steps`); plain Meerkat runs (nobody is limited), so the traces do not
depend on the detector's settings and every setting can be scored on the same traces.

    python research/vp_detector.py traces --federations 0-29     # resumable: one JSON line per federation
    python research/vp_detector.py tune --tune 0-9 --report 10-29  # thresholds chosen on 0-9, scored on 10-29
    python research/vp_detector.py plot                           # GradIP traces, single-label vs mixed
    python research/vp_detector.py ceiling --federations 0-29     # the best F1 *any* detector can reach
    python research/vp_detector.py separability                   # threshold-free: ROC-AUC of each statistic

`ceiling` needs no training. A Dirichlet client whose calibration batches happen to hold one label
only is, to anything computed from those batches, distributed exactly like a single-label client
(the partition deals tweets to clients at random within each label): no detector can tell them
apart, so flagging exactly the single-label clients has an F1 ceiling below 1, computed here from
the partitions themselves (expected number of such look-alikes per calibration window).

`tune` grid-searches the detector's settings (`meerkat_hf.federated.protocol.gradip.VPConfig`:
window = steps and participations used, early/late fractions, ratio and quiet thresholds, rule)
for the best F1 of "flag exactly the single-label clients" on the tuning federations, then
reports precision, recall, F1 and the confusion counts of that one setting, and of the package's
default setting, on the fresh report federations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

COMMON = [
    "algorithm=meerkat", "num_clients=10", "client_fraction=1.0", "partition.scheme=dirichlet", "partition.alpha=0.5",
    "batch_size=8", "max_length=64", "zo_eps=1e-3", "task.loss=balanced", "task.max_train_examples=null",
    "mask.density=1e-5", "mask.calibration=python_docs", "mask.calibration_num_sequences=64",
    "mask.calibration_seq_len=256", "vp.calibration_local_steps=null", "simulate_downlink=false",
    "torch_threads=1", "progress=false", "plots=false", "save_final=false", "keep_checkpoints=1",
]


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def parse_range(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def read_traces(out: Path) -> dict[int, dict]:
    path = out / "traces.jsonl"
    if not path.exists():
        return {}
    return {r["federation"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}


def federation_overrides(i: int, args) -> list[str]:
    return [*COMMON, f"seed={1000 + i}", f"partition.num_single_label_clients={1 + i % 3}", f"rounds={args.rounds}",
            f"local_steps={args.local_steps}", f"learning_rate={args.lr:g}", *args.set,
            f"output_dir={Path(args.out) / 'runs' / f'fed{i:03d}'}"]


def traces(args) -> None:
    from meerkat_hf.federated import FederationConfig
    from meerkat_hf.federated.driver import InProcessTransport, torch_threads
    from meerkat_hf.federated.engine import RoundEngine
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in parse_range(args.federations):
        if i in read_traces(out):
            continue
        overrides = federation_overrides(i, args)
        config = FederationConfig.from_yaml(DEFAULT_CONFIG, overrides)
        start = time.perf_counter()
        with torch_threads(1):
            engine = RoundEngine(config, evaluate=False)
            engine.run(InProcessTransport())
        data = engine.data
        single = [c for c, part in enumerate(data.parts) if len(set(data.labels[part].tolist())) == 1]
        rows = [json.loads(x) for x in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
        row = {
            "federation": i, "seed": config.seed, "single_label": single,
            "label_counts": {str(c): np.bincount(data.labels[p], minlength=2).tolist() for c, p in enumerate(data.parts)},
            "gradip": {str(c): [r["gradip_steps"].get(str(c), []) for r in rows] for c in range(config.num_clients)},
            "seconds": round(time.perf_counter() - start, 1), "lr": config.learning_rate, "local_steps": config.local_steps,
            "command": "python research/vp_detector.py traces " + " ".join(sys.argv[2:]),
        }
        with (out / "traces.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        _log(f"federation {i}: single-label {single}, {row['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------- scoring
def decide(trace: list[list[float]], setting: dict) -> bool:
    from meerkat_hf.federated.protocol.gradip import VPConfig, evaluate_trajectories

    window = [t[: setting["steps"]] for t in trace[: setting["participations"]]]
    cfg = VPConfig(**{k: v for k, v in setting.items() if k not in ("steps", "participations")})
    return evaluate_trajectories(window, cfg).flagged


def confusion(feds: list[dict], setting: dict) -> dict:
    tp = fp = fn = tn = 0
    for fed in feds:
        truth = set(fed["single_label"])
        for c, trace in fed["gradip"].items():
            flagged, positive = decide(trace, setting), int(c) in truth
            tp += flagged and positive
            fp += flagged and not positive
            fn += (not flagged) and positive
            tn += (not flagged) and not positive
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall, "f1": f1}


def f1_interval(feds: list[dict], setting: dict, draws: int = 2000, seed: int = 0) -> dict:
    """95% bootstrap intervals over federations (the unit that was sampled) of the setting's F1 and
    of its margin over flagging every client."""
    counts = []  # per federation: tp, fp, fn of the setting; positives and clients for "everyone"
    for fed in feds:
        m = confusion([fed], setting)
        counts.append((m["tp"], m["fp"], m["fn"], m["tp"] + m["fn"], m["tp"] + m["fp"] + m["fn"] + m["tn"]))
    counts = np.array(counts, dtype=float)

    rng = np.random.default_rng(seed)
    tp, fp, fn, pos, n = counts[rng.integers(0, len(feds), size=(draws, len(feds)))].sum(axis=1).T
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    everyone = np.divide(2 * pos, pos + n, out=np.zeros_like(pos), where=(pos + n) > 0)
    lo, hi = np.percentile(f1, [2.5, 97.5])
    dlo, dhi = np.percentile(f1 - everyone, [2.5, 97.5])
    return {"f1_ci": [float(lo), float(hi)], "minus_everyone_ci": [float(dlo), float(dhi)]}


def settings_grid(max_steps: int, max_participations: int):
    steps = sorted({s for s in (4, 6, 8, 10, 12, 16, 20) if s <= max_steps} | {max_steps})
    for values in itertools.product(steps, range(1, max_participations + 1), (0.2, 0.3, 0.5), (0.2, 0.3, 0.5),
                                    (0.1, 0.2, 0.3, 0.5), (0.05, 0.1, 0.2), (0.5, 0.75), ("any", "all", "ratio", "quiet")):
        s, p, ef, lf, rt, qt, qf, rule = values
        yield {"steps": s, "participations": p, "early_fraction": ef, "late_fraction": lf, "ratio_threshold": rt,
               "quiet_rel_tau": qt, "quiet_fraction": qf, "rule": rule, "min_steps": 1}


def tune(args) -> None:
    feds = read_traces(Path(args.out))
    tune_set = [feds[i] for i in parse_range(args.tune) if i in feds]
    report_set = [feds[i] for i in parse_range(args.report) if i in feds]
    if not tune_set or not report_set:
        raise SystemExit(f"need traces of both sets (have {sorted(feds)})")
    max_steps = min(len(t) for f in tune_set for tr in f["gradip"].values() for t in tr if t)
    max_parts = min(len(tr) for f in tune_set for tr in f["gradip"].values())
    best, best_key = None, None
    for setting in settings_grid(max_steps, max_parts):
        m = confusion(tune_set, setting)
        key = (m["f1"], -setting["steps"] * setting["participations"])  # ties: the shorter window
        if best_key is None or key > best_key:
            best, best_key = (setting, m), key
    setting, tuned = best
    default = {"steps": max_steps, "participations": 1, "min_steps": 4}
    lines = [f"Meerkat-VP detector: flag exactly the single-label clients ({len(tune_set)} tuning federations "
             f"{args.tune}, {len(report_set)} report federations {args.report}; 10 clients each)", "",
             f"chosen on the tuning set (F1 {tuned['f1']:.3f}): {json.dumps(setting)}", "",
             "| setting | set | TP | FP | FN | TN | precision | recall | F1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in (("tuned", setting), ("package default", default)):
        for set_name, feds_ in (("tuning", tune_set), ("report", report_set)):
            m = confusion(feds_, s)
            lines.append(f"| {name} | {set_name} | {m['tp']} | {m['fp']} | {m['fn']} | {m['tn']} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} | {m['f1']:.3f} |")
    # What no information buys: flags at random (at the tuned setting's flag rate), or everyone flagged.
    m = confusion(report_set, setting)
    n_pos, n = m["tp"] + m["fn"], m["tp"] + m["fp"] + m["fn"] + m["tn"]
    base, rate = n_pos / n, (m["tp"] + m["fp"]) / n
    chance = 2 * base * rate / (base + rate) if base + rate else 0.0
    lines += ["", f"Without information, on the report set ({n_pos} of {n} clients single-label, base rate {base:.3f}): "
              f"random flags at the tuned rate ({rate:.3f}) expect F1 {chance:.3f}; flagging everyone gives F1 "
              f"{2 * base / (1 + base):.3f}."]
    ci = f1_interval(report_set, setting)
    lines.append(f"Tuned F1 on the report set, 95% bootstrap interval over its federations: [{ci['f1_ci'][0]:.3f}, "
                 f"{ci['f1_ci'][1]:.3f}]; its margin over flagging everyone: [{ci['minus_everyone_ci'][0]:+.3f}, "
                 f"{ci['minus_everyone_ci'][1]:+.3f}].")
    text = "\n".join(lines)
    print(text)
    (Path(args.out) / "detector.md").write_text(text + "\n")
    rep = confusion(report_set, setting)
    (Path(args.out) / "detector.json").write_text(json.dumps(
        {"tune": args.tune, "report": args.report, "tuned_report": rep, "chance_f1": chance,
         "everyone_f1": 2 * base / (1 + base), **ci, "setting": setting}, indent=1) + "\n")


def pure_window_probability(n: int, minority: int, window: int) -> float:
    """P(the first `window` of a client's n examples, dealt in random order, hold no minority-label one)."""
    from math import lgamma, exp

    if minority == 0:
        return 1.0
    if window > n - minority:
        return 0.0
    # C(n - m, w) / C(n, w)
    return exp(lgamma(n - minority + 1) - lgamma(n - minority - window + 1) - lgamma(n + 1) + lgamma(n - window + 1))


def ceiling(args) -> None:
    """Upper bound on F1 of flagging exactly the single-label clients from a calibration window."""
    from meerkat_hf.federated import FederationConfig
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG
    from meerkat_hf.federated.task_data import config_partition
    from meerkat_hf.tasks import load_task_dataset

    labels = np.asarray(load_task_dataset("tweets_binary", "train")["label"], dtype=np.int64)
    feds = parse_range(args.federations)
    windows = [int(x) for x in args.windows.split(",")]
    singles, lookalikes = 0, {w: 0.0 for w in windows}
    near = {0.95: 0, 0.99: 0}
    mixed = 0
    for i in feds:
        config = FederationConfig.from_yaml(DEFAULT_CONFIG, federation_overrides(i, args))
        parts = config_partition(config, labels, len(labels))
        for part in parts:
            counts = np.bincount(labels[part], minlength=2)
            n, minority = int(counts.sum()), int(counts.min())
            if minority == 0:
                singles += 1
                continue
            mixed += 1
            for t in near:
                near[t] += counts.max() / n >= t
            for w in windows:
                lookalikes[w] += pure_window_probability(n, minority, w)
    lines = [f"F1 ceiling of 'flag exactly the single-label clients' ({len(feds)} federations {args.federations}, "
             f"{singles} single-label and {mixed} Dirichlet-0.5 clients; of these, {near[0.95]} hold >= 95% one label, "
             f"{near[0.99]} >= 99%)", "",
             "| calibration window (examples = steps x batch 8) | expected look-alikes (mixed clients whose window holds one label) "
             "| best precision at recall 1 | F1 ceiling |", "|---|---|---|---|"]
    for w in windows:
        m = lookalikes[w]
        precision = singles / (singles + m)
        lines.append(f"| {w} ({w // 8} steps) | {m:.1f} | {precision:.3f} | {2 * singles / (2 * singles + m):.3f} |")
    lines += ["", "Flagging all of an indistinguishable group is F1-optimal here (single-label clients outnumber "
              "look-alikes); any detector computed from the window's batches does no better in expectation."]
    text = "\n".join(lines)
    print(text)
    (Path(args.out) / "ceiling.md").write_text(text + "\n")


def client_statistics(trace: list[list[float]]) -> dict[str, float]:
    """Per-client numbers a server can compute from its replayed GradIP trace (first participation)."""
    a = np.asarray(trace[0], dtype=np.float64)
    n = len(a)
    k = max(1, int(np.ceil(0.3 * n)))
    early, late = np.abs(a[:k]).mean(), np.abs(a[-k:]).mean()
    t = a.mean() / (a.std(ddof=1) / np.sqrt(n)) if n > 1 and a.std(ddof=1) > 0 else 0.0
    return {"decay: early / late mean abs(GradIP)": early / late if late > 0 else np.inf,
            "quietness: 1 / median abs(GradIP)": 1.0 / max(np.median(np.abs(a)), 1e-12),
            "abs(t) of the signed mean GradIP": abs(t)}


def separability(args) -> None:
    """ROC-AUC of single-label (positive) vs mixed clients for each statistic, with a bootstrap over federations.

    0.5 = the statistic carries no information about who is single-label, whatever threshold a
    detector puts on it; the paper's decay predicts AUC near 1 for the first statistic.
    """
    from meerkat_hf.classification_metrics import roc_auc

    feds = [f for i, f in sorted(read_traces(Path(args.out)).items()) if i in set(parse_range(args.federations))]
    if not feds:
        raise SystemExit("no traces")
    rows = []  # (federation index, is_single, stats)
    for fi, fed in enumerate(feds):
        for c, trace in fed["gradip"].items():
            if trace and trace[0]:
                rows.append((fi, int(c) in fed["single_label"], client_statistics(trace)))
    names = list(rows[0][2])
    y = np.array([r[1] for r in rows], dtype=int)
    fed_of = np.array([r[0] for r in rows])
    rng = np.random.default_rng(0)
    lines = [f"Separability of single-label clients from the GradIP trace ({len(feds)} federations, {int(y.sum())} "
             f"single-label and {int((1 - y).sum())} mixed clients; ROC-AUC, 95% bootstrap interval over federations; "
             f"0.5 = no information)", "", "| statistic (higher = 'single-label') | ROC-AUC | 95% interval |", "|---|---|---|"]
    record = {"federations": len(feds), "single_label": int(y.sum()), "mixed": int((1 - y).sum()), "auc": {}}
    for name in names:
        x = np.array([r[2][name] for r in rows])
        boots = []
        for _ in range(2000):
            pick = rng.integers(0, len(feds), len(feds))
            idx = np.concatenate([np.flatnonzero(fed_of == f) for f in pick])
            boots.append(roc_auc(x[idx], y[idx]))
        lo, hi = np.nanquantile(boots, [0.025, 0.975])
        lines.append(f"| {name} | {roc_auc(x, y):.3f} | [{lo:.3f}, {hi:.3f}] |")
        record["auc"][name] = [roc_auc(x, y), float(lo), float(hi)]
    text = "\n".join(lines)
    print(text)
    (Path(args.out) / "separability.md").write_text(text + "\n")
    (Path(args.out) / "separability.json").write_text(json.dumps(record, indent=1) + "\n")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feds = list(read_traces(Path(args.out)).values())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, single in zip(axes, (True, False)):
        for fed in feds:
            for c, trace in fed["gradip"].items():
                if (int(c) in fed["single_label"]) != single:
                    continue
                flat = [x for t in trace for x in t]
                early = np.mean(np.abs(flat[: max(1, len(flat) // 4)])) or 1.0
                ax.plot(np.abs(flat) / early, color="C3" if single else "C0", alpha=0.25, lw=0.8)
        ax.set_yscale("log")
        ax.set_title(("single-label" if single else "mixed-label (Dirichlet 0.5)") + " clients")
        ax.set_xlabel("local step (participations back to back)")
    axes[0].set_ylabel("|GradIP| / mean |GradIP| of the first quarter")
    fig.suptitle(f"GradIP on the server's replayed virtual paths, {len(feds)} federations")
    fig.tight_layout()
    fig.savefig(Path(args.out) / "gradip_traces.png", dpi=120)
    _log(f"wrote {Path(args.out) / 'gradip_traces.png'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/vp_detector")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("traces")
    t.add_argument("--federations", default="0-29")
    t.add_argument("--rounds", type=int, default=1)
    t.add_argument("--local-steps", type=int, default=10)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--set", action="append", default=[])
    u = sub.add_parser("tune")
    u.add_argument("--tune", default="0-9")
    u.add_argument("--report", default="10-29")
    sub.add_parser("plot")
    sp = sub.add_parser("separability")
    sp.add_argument("--federations", default="0-29")
    c = sub.add_parser("ceiling")
    c.add_argument("--federations", default="0-29")
    c.add_argument("--windows", default="80,240,800", help="calibration examples (steps x batch), comma-separated")
    c.add_argument("--rounds", type=int, default=1)
    c.add_argument("--local-steps", type=int, default=10)
    c.add_argument("--lr", type=float, default=3e-4)
    c.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"traces": traces, "tune": tune, "plot": plot, "ceiling": ceiling, "separability": separability}[args.cmd](args)


if __name__ == "__main__":
    main()
