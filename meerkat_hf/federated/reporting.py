"""Metrics (one JSON line per round) and plots (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_NAME = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


class MetricsLog:
    """Append-only JSONL; on resume, rows of rounds that will be redone are dropped."""

    def __init__(self, output_dir: str | os.PathLike, start_round: int = 0):
        self.path = Path(output_dir) / METRICS_NAME
        self.rows: list[dict] = []
        if self.path.exists() and start_round > 0:
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("round", 0) < start_round:
                        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict) -> None:
        row = _clean(row)
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def write_plots(rows: list[dict], out_dir: str | os.PathLike, title: str = "", initial: dict | None = None) -> list[Path]:
    """accuracy (or eval loss) vs round, cumulative bytes vs round, GradIP per client.

    `initial` (the zero-shot metrics) is drawn at round 0, before any training.
    """
    import matplotlib  # lazy: ~0.6 s to import, needed only for plots

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    key = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "eval_loss"
    pts = [(r["round"] + 1, r[key]) for r in rows if r.get(key) is not None]
    if initial and initial.get(key) is not None:
        pts.insert(0, (0, initial[key]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot(*zip(*pts), marker="o", label=key.replace("_", " "))
    if key == "accuracy":
        bal = [(r["round"] + 1, r) for r in rows if r.get("balanced_accuracy") is not None]
        if initial and initial.get("balanced_accuracy") is not None:
            bal.insert(0, (0, initial))
        if bal:
            xs = [x for x, _ in bal]
            ax.plot(xs, [r["balanced_accuracy"] for _, r in bal], marker="s", label="balanced accuracy")
            if all(r.get("balanced_accuracy_ci_low") is not None for _, r in bal):
                ax.fill_between(xs, [r["balanced_accuracy_ci_low"] for _, r in bal],
                                [r["balanced_accuracy_ci_high"] for _, r in bal], alpha=0.2, label="95% CI")
        majority = next((r.get("majority_rate") for r in ([initial] if initial else []) + rows
                         if r and r.get("majority_rate") is not None), None)
        if majority is not None:
            ax.axhline(majority, color="grey", ls="--", lw=1, label="majority-class rate")
        ax.set_ylim(0.4, 1.0)  # a fixed range: a 2-point wobble must not look like a peak
        ax.legend(fontsize=8)
    ax.set_xlabel("round (0 = before training)" if initial else "round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{title} {key.replace('_', ' ')}".strip())
    ax.grid(alpha=0.3)
    written.append(out / f"{key}.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["round"] + 1 for r in rows]
    series = (("cumulative_bytes", "this run (uplink + downlink)"), ("cumulative_uplink_bytes", "uplink"),
              ("cumulative_fedavg_full_bytes", "full-model FedAvg (2 x 4 x params x clients)"))
    for name, label in series:
        ys = [max(r.get(name) or 0, 1) for r in rows]
        if rows:
            ax.plot(x, ys, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cumulative bytes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    written.append(out / "bytes.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    # One segment per participation: a line across rounds a client sat out would be made-up data.
    traj: dict[str, list[list[tuple[float, float]]]] = {}
    for r in rows:
        for cid, steps in (r.get("gradip_steps") or {}).items():
            n = max(len(steps), 1)
            segment = [(r["round"] + t / n, g) for t, g in enumerate(steps) if g is not None]
            if segment:
                traj.setdefault(cid, []).append(segment)
    limited = set(str(c) for c in (rows[-1].get("limited_clients") or [])) if rows else set()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cid in enumerate(sorted(traj, key=int)):
        style = dict(lw=1, ls="--" if cid in limited else "-", color=colors[i % len(colors)])
        for j, segment in enumerate(traj[cid]):
            xs, ys = zip(*segment)
            label = (f"client {cid}" + (" (limited)" if cid in limited else "")) if j == 0 else None
            ax.plot(xs, ys, marker="." if len(segment) == 1 else None, label=label, **style)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("round (+ local step / T)")
    ax.set_ylabel("GradIP = g * <g_p, z>")
    if traj:
        ax.legend(fontsize=6, ncol=2)
    ax.set_title("GradIP on the virtual paths" + ("" if traj else " (no g_p: not computed)"))
    written.append(out / "gradip.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def format_bytes(n: float) -> str:
    """1,234 B / 12.3 KB / 4.5 GB (powers of 1000, as network traffic is counted)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def format_gain_line(before: dict, after: dict, gain: dict | None) -> str | None:
    """`balanced accuracy 0.738 [0.720, 0.760] -> 0.790 [...]; gain +0.052 [+0.030, +0.070] (paired bootstrap, 95%)`."""
    key = "balanced_accuracy"
    if before.get(key) is None or after.get(key) is None:
        return None

    def show(ev: dict) -> str:
        lo, hi = ev.get(f"{key}_ci_low"), ev.get(f"{key}_ci_high")
        return f"{ev[key]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")

    line = f"balanced accuracy {show(before)} -> {show(after)}"
    if gain:
        lo, hi = gain["gain_ci"]
        verdict = "" if gain.get("excludes_zero") else "; the interval includes 0: no measurable change"
        n = f"{gain['n']} " if gain.get("n") else ""
        line += f"; gain {gain['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired bootstrap over the same {n}examples, 95%){verdict}"
    return line


def format_report(result) -> str:
    """What a person wants to read at the end of a run (a `FederationResult`)."""
    cfg = result.config
    lines = [f"== {cfg.algorithm}: {cfg.rounds} rounds, {cfg.num_clients} clients, T={cfg.local_steps}, "
             f"k={result.k:,} of {result.num_params:,} parameters ({100 * result.k / result.num_params:.3g}%)"]
    headline = format_gain_line(result.initial_eval, result.final_eval, getattr(result, "gain", None))
    if headline:
        lines.append(headline)
    for key in ("balanced_accuracy", "accuracy", "eval_loss"):
        before, after = result.initial_eval.get(key), result.final_eval.get(key)
        if before is not None or after is not None:
            def show(v, ev):
                if v is None:
                    return "n/a"
                lo, hi = ev.get(f"{key}_ci_low"), ev.get(f"{key}_ci_high")
                return f"{v:.4f}" + (f" [95% CI {lo:.3f}-{hi:.3f}]" if lo is not None else "")
            lines.append(f"{key:<17} zero-shot (before): {show(before, result.initial_eval)}   "
                         f"after round {cfg.rounds}: {show(after, result.final_eval)}")
    if result.initial_eval.get("majority_rate") is not None:
        lines.append(f"(always answering the majority class scores accuracy {result.initial_eval['majority_rate']:.4f}, "
                     "balanced accuracy 0.5)")
    sent = result.total_uplink_bytes + result.total_downlink_bytes
    full = result.total_fedavg_full_bytes
    lines.append(f"bytes sent: {format_bytes(sent)} (uplink {format_bytes(result.total_uplink_bytes)}, downlink "
                 f"{format_bytes(result.total_downlink_bytes)}); full-model FedAvg: {format_bytes(full)} "
                 f"({full / max(sent, 1):,.0f}x more)")
    if cfg.scheduler_mode != "none":
        who = "Meerkat-VP flagged" if cfg.scheduler_mode == "vp" else "randomly early-stopped"
        lines.append(f"{who} (limited to {cfg.vp.limited_steps} local step/round): "
                     f"{', '.join(f'client {c}' for c in result.limited_clients) or 'no client'}")
    out = Path(result.output_dir)
    lines.append(f"outputs: {out}/metrics.jsonl, {out}/plots/*.png, {out}/final/ (mask + sparse delta + README.md; "
                 f"publish with --push-to-hub or MeerkatModel.push_to_hub)")
    return "\n".join(lines)
