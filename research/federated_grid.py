"""The shape of the paper's main table at small scale: one federation per (algorithm, T), one table.

Every cell is a real `run_federation` on the same base config (by default the package's
embedded default job: SmolLM2-135M-Instruct, offline tweets, Dirichlet alpha=0.5 with
single-label clients), differing only by `algorithm` and `local_steps`, so the comparison is the
one-switch comparison of the paper. Each run writes its own output folder; the script appends
one JSON line per run to `--results` (so an interrupted grid resumes where it stopped) and prints
a markdown table with accuracy before/after, bytes, the flagged clients, wall time and the exact
command that reproduces the row.

    python research/federated_grid.py --algorithms meerkat full-fedzo lora-fedzo magnitude random \\
        --local-steps 1 10 --set rounds=6 --out runs/grid
    python research/federated_grid.py --algorithms meerkat meerkat-vp random-early-stop --local-steps 10 \\
        --set rounds=6 --out runs/grid-vp
    python research/federated_grid.py --table-only --out runs/grid      # re-print the table
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cell(config_path: str | None, algorithm: str, local_steps: int, overrides: list[str], out: Path) -> dict:
    from meerkat_hf.federated import FederationConfig, run_federation
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG

    cell_overrides = [*overrides, f"algorithm={algorithm}", f"local_steps={local_steps}",
                      f"output_dir={out / f'{algorithm}-T{local_steps}'}", "progress=false"]
    config = FederationConfig.from_yaml(config_path or DEFAULT_CONFIG, cell_overrides)
    start = time.perf_counter()
    result = run_federation(config)
    seconds = time.perf_counter() - start
    accuracy_by_round = {r["round"]: r["accuracy"] for r in result.metrics if r.get("accuracy") is not None}
    command = "meerkat-hf federate" + (f" --config {config_path}" if config_path else "") + "".join(
        f" --set {shlex.quote(o)}" for o in cell_overrides if not o.startswith(("output_dir=", "progress=")))
    return {
        "algorithm": algorithm, "local_steps": local_steps, "rounds": config.rounds, "seed": config.seed,
        "k": result.k, "num_params": result.num_params,
        "accuracy_before": result.initial_eval.get("accuracy"), "accuracy_after": result.final_eval.get("accuracy"),
        "accuracy_by_round": accuracy_by_round, "limited_clients": result.limited_clients,
        "uplink_bytes": result.total_uplink_bytes, "downlink_bytes": result.total_downlink_bytes,
        "fedavg_full_bytes": result.total_fedavg_full_bytes,
        "bytes_per_round": (result.total_uplink_bytes + result.total_downlink_bytes) / max(config.rounds, 1),
        "wall_seconds": round(seconds, 1), "state_digest": result.state_digest, "command": command,
    }


def table(rows: list[dict]) -> str:
    from meerkat_hf.federated.reporting import format_bytes

    def acc(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = ["| algorithm | T | rounds | k | acc. before | acc. after | bytes / round | full FedAvg / round | reduction | "
             "limited clients | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sent = r["uplink_bytes"] + r["downlink_bytes"]
        lines.append(
            f"| {r['algorithm']} | {r['local_steps']} | {r['rounds']} | {r['k']:,} | {acc(r['accuracy_before'])} | "
            f"{acc(r['accuracy_after'])} | {format_bytes(r['bytes_per_round'])} | "
            f"{format_bytes(r['fedavg_full_bytes'] / max(r['rounds'], 1))} | {r['fedavg_full_bytes'] / max(sent, 1):,.0f}x | "
            f"{', '.join(map(str, r['limited_clients'])) or '-'} | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="base federation YAML (default: the packaged default job)")
    p.add_argument("--algorithms", nargs="+", default=["meerkat", "full-fedzo", "lora-fedzo", "magnitude", "random"])
    p.add_argument("--local-steps", nargs="+", type=int, default=[1, 10])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/grid")
    p.add_argument("--results", default=None, help="JSONL of finished cells (default: OUT/results.jsonl)")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results) if args.results else out / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    if not args.table_only:
        for T in args.local_steps:
            for algorithm in args.algorithms:
                if any(d["algorithm"] == algorithm and d["local_steps"] == T for d in done):
                    continue
                print(f"== {algorithm}, T={T}", file=sys.stderr, flush=True)
                row = run_cell(args.config, algorithm, T, args.overrides, out)
                done.append(row)
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
