"""Metrics (one JSON line per round) and plots (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

METRICS_NAME = "metrics.jsonl"

logger = logging.getLogger(__name__)


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
    """Append-only JSONL; on resume, rows of rounds that will be redone are dropped.

    Rows are numbered by rounds done (`round` 1 is the state after the first round; round 0, the
    zero-shot state, is in run_info.json). A file from before that convention (its first row is
    round 0) is renumbered when a run is resumed from it.
    """

    def __init__(self, output_dir: str | os.PathLike, start_round: int = 0):
        self.path = Path(output_dir) / METRICS_NAME
        self.rows: list[dict] = []
        if self.path.exists() and start_round > 0:
            old = self._read_rows(start_round)
            shift = 1 if any(row.get("round") == 0 for row in old) else 0  # the old 0-based numbering
            for row in old:
                row["round"] = row.get("round", 0) + shift
                if row["round"] <= start_round:
                    self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def _read_rows(self, start_round: int) -> list[dict]:
        """The file's rows. A torn last line (the process died while appending it) is dropped: a row is
        appended before its round's checkpoint is written, so that round is one `--resume` redoes. Any
        other unreadable line is an error naming the file and the line."""
        lines = self.path.read_text().splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if number == len(lines):
                    logger.warning("%s: line %d is incomplete (the run was killed while writing it); dropped, its "
                                   "round is redone from checkpoint round %d", self.path, number, start_round)
                    continue
                raise ValueError(f"{self.path}, line {number}: not a JSON row ({err.msg}); fix or remove the line, "
                                 "then --resume") from None
            if not isinstance(row, dict):
                raise ValueError(f"{self.path}, line {number}: not a JSON object")
            rows.append(row)
        return rows

    def append(self, row: dict) -> None:
        row = _clean(row)
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def write_plots(rows: list[dict], out_dir: str | os.PathLike, title: str = "", initial: dict | None = None,
                groups: dict[str, list[int]] | None = None) -> list[Path]:
    """accuracy (or eval loss) vs round, cumulative bytes vs round, GradIP per client group.

    Rounds count rounds done: `initial` (the zero-shot metrics) is drawn at round 0. `groups`
    (name -> client ids, e.g. single-label vs mixed-label clients) splits the GradIP plot; each
    group is drawn as its median over clients with a 10-90% band, readable at 10 or 100 clients.
    """
    import matplotlib  # lazy: ~0.6 s to import, needed only for plots

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    key = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "eval_loss"
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    if initial and initial.get(key) is not None:
        pts.insert(0, (0, initial[key]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot(*zip(*pts), marker="o", label=key.replace("_", " "))
    if key == "accuracy":
        lows = [y for _, y in pts]
        bal = [(r["round"], r) for r in rows if r.get("balanced_accuracy") is not None]
        if initial and initial.get("balanced_accuracy") is not None:
            bal.insert(0, (0, initial))
        if bal:
            xs = [x for x, _ in bal]
            ax.plot(xs, [r["balanced_accuracy"] for _, r in bal], marker="s", label="balanced accuracy")
            lows += [r["balanced_accuracy"] for _, r in bal]
            if all(r.get("balanced_accuracy_ci_low") is not None for _, r in bal):
                ax.fill_between(xs, [r["balanced_accuracy_ci_low"] for _, r in bal],
                                [r["balanced_accuracy_ci_high"] for _, r in bal], alpha=0.2,
                                label="balanced accuracy 95% CI")
                lows += [r["balanced_accuracy_ci_low"] for _, r in bal]
        majority = next((r.get("majority_rate") for r in ([initial] if initial else []) + rows
                         if r and r.get("majority_rate") is not None), None)
        if majority is not None:
            ax.axhline(majority, color="grey", ls="--", lw=1, label="majority-class rate")
        # a fixed range (a 2-point wobble must not look like a peak), widened only to show a collapse
        ax.set_ylim(min([0.4] + [y - 0.05 for y in lows if y is not None]), 1.0)
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("rounds done (0 = before training)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title((f"{title}: " if title else "") + key.replace("_", " ")
                 + (" and balanced accuracy (eval split)" if key == "accuracy" else ""))
    ax.grid(alpha=0.3)
    written.append(out / f"{key}.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["round"] for r in rows]
    series = (("cumulative_bytes", "this run (uplink + downlink)"), ("cumulative_uplink_bytes", "uplink"),
              ("cumulative_fedavg_full_bytes", "full-model FedAvg (2 x 4 x params x clients)"))
    for name, label in series:
        ys = [max(r.get(name) or 0, 1) for r in rows]
        if rows:
            ax.plot(x, ys, marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("rounds done")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cumulative bytes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    written.append(out / "bytes.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    written.append(_gradip_plot(plt, MaxNLocator, rows, out / "gradip.png", groups))
    return written


def _gradip_plot(plt, MaxNLocator, rows: list[dict], path: Path, groups: dict[str, list[int]] | None) -> Path:
    """Mean |GradIP| of each client in each round it took part in, by group: faint per-client lines,
    the group's median over clients (thick) and its 10-90% band. A client whose |GradIP| falls
    toward 0 is what Meerkat-VP flags; the per-step values stay in metrics.jsonl (`gradip_steps`)."""
    import numpy as np

    per_client: dict[str, dict[int, float]] = {}  # client -> round -> mean |GradIP|
    for r in rows:
        for cid, steps in (r.get("gradip_steps") or {}).items():
            vals = [abs(g) for g in steps if g is not None and g != 0]
            if vals:
                per_client.setdefault(str(cid), {})[r["round"]] = float(np.mean(vals))
    limited = {str(c) for c in (rows[-1].get("limited_clients") or [])} if rows else set()
    groups = {name: [str(c) for c in ids] for name, ids in (groups or {}).items() if ids}
    if not groups:
        groups = {"clients": sorted(per_client, key=int)}
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rounds = sorted({rd for traj in per_client.values() for rd in traj})
    for i, (name, ids) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        members = [c for c in ids if c in per_client]
        if not members:
            continue
        alpha = max(0.08, min(0.35, 3.0 / len(members)))
        for c in members:
            xs = sorted(per_client[c])
            ax.plot(xs, [per_client[c][x] for x in xs], color=color, lw=0.7, alpha=alpha,
                    ls="--" if c in limited else "-", marker="." if len(xs) == 1 else None)
        med, lo, hi, xs = [], [], [], []
        for rd in rounds:
            vals = [per_client[c][rd] for c in members if rd in per_client[c]]
            if vals:
                xs.append(rd)
                med.append(float(np.median(vals)))
                lo.append(float(np.percentile(vals, 10)))
                hi.append(float(np.percentile(vals, 90)))
        n_limited = sum(c in limited for c in members)
        label = f"{name} ({len(members)}" + (f", {n_limited} limited by VP" if n_limited else "") + "): median"
        ax.plot(xs, med, color=color, lw=2.5, marker="o", label=label)
        if len(members) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, label=f"{name}: 10-90% of clients")
    ax.set_yscale("log")
    ax.set_xlabel("round (steps of round r, from the state after r - 1 rounds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean |GradIP| = |g * <g_p, z>| per client")
    if per_client:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("GradIP on the virtual paths" + ("" if per_client else " (no g_p: not computed)")
                 + (" (dashed: limited clients)" if limited else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    auc = (gain or {}).get("auc")
    if auc:
        verdict = "" if auc["excludes_zero"] else "; the interval includes 0: the ranking did not measurably change"
        line += (f"\nAUC (prior-free ranking) {auc['before']:.3f} [{auc['before_ci'][0]:.3f}, {auc['before_ci'][1]:.3f}] "
                 f"-> {auc['after']:.3f} [{auc['after_ci'][0]:.3f}, {auc['after_ci'][1]:.3f}]; gain {auc['gain']:+.3f} "
                 f"[{auc['gain_ci'][0]:+.3f}, {auc['gain_ci'][1]:+.3f}] (paired bootstrap, 95%){verdict}")
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
        classes = (getattr(result, "gain", None) or {}).get("num_classes")  # a constant answer's balanced accuracy: 1 / C
        lines.append(f"(always answering the majority class scores accuracy {result.initial_eval['majority_rate']:.4f}"
                     + (f", balanced accuracy {1 / classes:.3g})" if classes else ")"))
    sent = result.total_uplink_bytes + result.total_downlink_bytes
    full = result.total_fedavg_full_bytes
    lines.append(f"bytes sent: {format_bytes(sent)} (uplink {format_bytes(result.total_uplink_bytes)}, downlink "
                 f"{format_bytes(result.total_downlink_bytes)}); full-model FedAvg: {format_bytes(full)} "
                 f"({full / max(sent, 1):,.0f}x more)")
    if cfg.scheduler_mode != "none":
        who = "Meerkat-VP flagged" if cfg.scheduler_mode == "vp" else "randomly early-stopped"
        lines.append(f"{who} (limited to {cfg.vp.limited_steps} local step/round): "
                     f"{', '.join(f'client {c}' for c in result.limited_clients) or 'no client'}")
    privacy = getattr(result, "privacy", None) or {}
    if "dp_epsilon" in privacy:
        lines.append(f"example-level DP: epsilon {privacy['dp_epsilon']:.3g} at delta {privacy['dp_delta']:g} "
                     f"(worst client, clip {cfg.dp.clip:g}; Opacus RDP, Poisson sampling)")
    if "dp_user_epsilon" in privacy:
        lines.append(f"user-level DP (central noise, known to server and clients): epsilon "
                     f"{privacy['dp_user_epsilon']:.3g} at delta {privacy['dp_delta']:g}")
    out = Path(result.output_dir)
    lines.append(f"outputs: {out}/metrics.jsonl, {out}/plots/*.png, {out}/final/ (mask + sparse delta + README.md; "
                 f"publish with --push-to-hub or MeerkatModel.push_to_hub)")
    return "\n".join(lines)
