"""The city_continent task (issue 26, item 5): does a task whose zero-shot leaves room give the main job a gain?

Each run is `meerkat-hf federate --config research/results/city/federated/NAME.yaml --summary-json NAME.json`
(the default job's federation on `city_continent`, scored on the *validation* split: every choice is made
there). This script keeps what the tables and the plot need from the run folders, and draws them:

    python research/city_task.py collect /work/runs/cities/{a,c,d,e,f,g}   # -> research/results/city/federated/
    python research/city_task.py plot                                     # balanced accuracy and AUC vs minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "city" / "federated"


def collect(run_dirs: list[Path]) -> None:
    """NAME.curve.jsonl (round, cumulative minutes, balanced accuracy, AUC) + the run's config and summary."""
    OUT.mkdir(parents=True, exist_ok=True)
    for run in run_dirs:
        name = run.name
        summary = json.loads(run.with_suffix(".json").read_text())
        minutes, rows = 0.0, [{"round": 0, "minutes": 0.0, "balanced_accuracy": summary["balanced_accuracy_before"]["value"],
                               "auc": summary["auc_before"]["value"]}]
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            minutes += float(r.get("seconds") or 0.0) / 60
            if r.get("balanced_accuracy") is not None:
                rows.append({"round": r["round"], "minutes": round(minutes, 2),
                             "balanced_accuracy": r["balanced_accuracy"], "auc": r.get("auc")})
        (OUT / f"{name}.curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        shutil.copyfile(run.with_suffix(".yaml"), OUT / f"{name}.yaml")
        shutil.copyfile(run.with_suffix(".json"), OUT / f"{name}.json")
        print(f"{name}: {len(rows) - 1} evaluations, {minutes:.1f} min of rounds")


def plot(png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for curve in sorted(OUT.glob("*.curve.jsonl")):
        name = curve.name.split(".")[0]
        cfg = yaml.safe_load((OUT / f"{name}.yaml").read_text())
        lr = cfg.get("learning_rate", cfg.get("lr"))
        rows = [json.loads(line) for line in curve.read_text().splitlines()]
        label = f"{name}: {cfg['task'].get('loss', 'candidates')} loss, lr {lr:g}"
        for ax, key in zip(axes, ("balanced_accuracy", "auc")):
            ax.plot([r["minutes"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    for ax, key in zip(axes, ("balanced accuracy", "AUC (pairwise, prior-free)")):
        ax.set_xlabel("minutes of rounds (2 shared cores)")
        ax.set_ylabel(f"validation {key}")
    axes[0].legend(fontsize=7)
    fig.suptitle("city_continent, 10 clients, Dirichlet 0.5, T = 4, Meerkat-VP, k = 1,062 (500 validation cities)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("runs", nargs="+", type=Path)
    p = sub.add_parser("plot")
    p.add_argument("--png", type=Path, default=OUT.parent / "federated.png")
    args = ap.parse_args(argv)
    collect(args.runs) if args.cmd == "collect" else plot(args.png)


if __name__ == "__main__":
    main()
