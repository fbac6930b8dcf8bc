"""Partial participation at scale (issue 15, item 5): the few-hundred-round run.

    python research/partial_participation.py [--rounds 300] [--seed 7] [--out FILE]

(FILE: research/results/partial_participation.txt by default.)

A real federation of simulated clients (`run_federation`, the tiny Llama model and toy task of the
test suite, CPU, one thread): 1,000 clients on 6,000 rows (Dirichlet alpha 2), 1% (10) per round,
one local step, a checkpoint every round. Seeded faults (tests/chaos_support.py) hit ~15% of the
participations: dropouts 5%, stragglers 4% late by 1-2 rounds and 2% never arriving, duplicated
uplinks 3%, replayed recorded uplinks 3%.

It then checks, and prints with the counts:

* the audit: every metrics row against the injected faults, and every round's global state
  recomputed from the genuine uplinks (`aggregate_zo_round`) against the row's `state_digest`;
* resume: the same run crashed after the middle round (a straggler's uplink in flight across the
  checkpoint) and resumed with resume=true reaches the uninterrupted run's final digest and its
  metrics rows (timing aside).

Server seconds per round are the engine's `aggregate` (receiving, replaying and averaging the
round's uplinks) and `checkpoint` calls, timed by wrapping them here. Exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # three runs x 6,000 rows encoded

import torch  # noqa: E402

from meerkat_hf.testing.faults import FaultRates, SeededFaults, audit, in_flight  # noqa: E402
from meerkat_hf.testing.toy_federation import base_config, make_model_dir, toy_rows, write_csv  # noqa: E402
from meerkat_hf.federated import FederationConfig  # noqa: E402
from meerkat_hf.federated.checkpoint import list_checkpoints  # noqa: E402
from meerkat_hf.federated.driver import SimulatedCrash, run_federation  # noqa: E402
from meerkat_hf.federated.engine import RoundEngine  # noqa: E402

CLIENTS, FRACTION = 1000, 0.01
DEFAULT_OUT = ROOT / "research" / "results" / "partial_participation.txt"


class ServerClock:
    """Wall and CPU seconds spent in `RoundEngine.aggregate` and `RoundEngine.checkpoint`, and the
    largest checkpoint file written."""

    def __init__(self):
        self.seconds = {"aggregate": 0.0, "checkpoint": 0.0}
        self.cpu = {"aggregate": 0.0, "checkpoint": 0.0}
        self.checkpoint_bytes = 0
        self._originals = {name: getattr(RoundEngine, name) for name in self.seconds}

    def __enter__(self) -> ServerClock:
        for name, original in self._originals.items():
            setattr(RoundEngine, name, self._timed(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(RoundEngine, name, original)

    def _timed(self, name, original):
        clock = self

        def timed(engine, *args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(engine, *args, **kwargs)
            finally:
                clock.seconds[name] += time.perf_counter() - t0
                clock.cpu[name] += time.process_time() - c0
                if name == "checkpoint":
                    newest = list_checkpoints(engine.out)[-1]
                    clock.checkpoint_bytes = max(clock.checkpoint_bytes, newest.stat().st_size)

        return timed


def config(root: Path, model_dir: str, files: dict, rounds: int, **kw) -> FederationConfig:
    return FederationConfig.from_dict(base_config(
        root, model_dir, files, num_clients=CLIENTS, client_fraction=FRACTION, rounds=rounds, local_steps=1,
        batch_size=2, eval_before=False, eval_every=10**6, eval_examples=16,
        partition={"scheme": "dirichlet", "alpha": 2.0}, **kw))


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def report(args, counts: dict, problems: list[str], clock: ServerClock, walls: dict, resume: dict) -> str:
    rounds = counts["rounds"]

    def ms(seconds: float) -> str:  # per round
        return f"{seconds / rounds * 1e3:.1f}"

    rejected = {k.removeprefix("rejected "): v for k, v in sorted(counts.items()) if k.startswith("rejected ")}
    lines = [
        f"command: python research/partial_participation.py {shlex.join(sys.argv[1:])}".rstrip(),
        f"setting: {CLIENTS:,} clients, {FRACTION:.0%} per round, {rounds} rounds, 1 local step, tiny Llama, "
        f"6,000 rows (Dirichlet alpha 2), a checkpoint every round, seed {args.seed}",
        f"wall time: uninterrupted run {walls['reference']:.0f} s, crashed + resumed {walls['resume']:.0f} s, "
        f"audit {walls['audit']:.1f} s; CPU time {walls['cpu']:.0f} s in all; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[1]:.1f} over the last 5 minutes "
        "(wall times grow with it; CPU times do not)",
        f"participations: {counts['participations']:,}; accepted {counts['accepted']:,}; missing {counts['missing']} "
        f"(dropped {counts['dropped']}, stragglers late {counts['late']} + never {counts['never']})",
        f"stragglers' uplinks: {counts['late arrived']} arrived 1-2 rounds late (refused as stale), "
        f"{counts['late in flight at the end']} still in flight at the end, {counts['never']} never arrive",
        f"tampered: {counts['duplicated']} duplicated, {counts['replayed']} replayed recorded uplinks",
        "rejected: " + ", ".join(f"{reason} {n}" for reason, n in rejected.items()),
        f"dense fallbacks (a straggler back with a state the server did not see it reach): {counts['fallbacks']}",
        f"uplink bytes: {counts['uplink_bytes']:,} (= accepted + refused, every round)",
        f"server seconds per round (wall / CPU): aggregate {ms(clock.seconds['aggregate'])} / "
        f"{ms(clock.cpu['aggregate'])} ms, checkpoint {ms(clock.seconds['checkpoint'])} / "
        f"{ms(clock.cpu['checkpoint'])} ms; largest checkpoint {clock.checkpoint_bytes / 1024:.0f} KiB",
        "audit: " + (f"{len(problems)} PROBLEMS" if problems
                     else "every accepted uplink in exactly one aggregate, exactly once; every fault recorded"),
        f"resume: crashed after round {resume['crash_after'] + 1} ({resume['in_flight']} straggler uplink(s) in flight "
        f"across the checkpoint), resumed: final digest {'equal' if resume['digest'] else 'DIFFERENT'} "
        f"({resume['final_digest']}), metrics rows {'identical' if resume['rows'] else 'DIFFERENT'}",
    ]
    lines += [f"  ! {p}" for p in problems[:20]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7, help="the faults' seed")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the faults log a warning each
    torch.set_num_threads(1)
    walls: dict[str, float] = {}
    cpu0 = time.process_time()
    with tempfile.TemporaryDirectory(prefix="partial-participation-") as tmp:
        root = Path(tmp)
        files = {"train": write_csv(root / "train.csv", toy_rows(6 * CLIENTS, 0)),
                 "test": write_csv(root / "test.csv", toy_rows(16, 1))}
        model_dir = make_model_dir(root)
        faults = SeededFaults(args.seed, FaultRates())
        t0 = time.perf_counter()
        with ServerClock() as clock:
            reference = run_federation(config(root / "a", model_dir, files, args.rounds), hooks=faults.hooks())
        walls["reference"] = time.perf_counter() - t0
        rows = reference.metrics

        t0 = time.perf_counter()
        counts, problems = audit(faults, rows, reference.config, reference.initial_values)
        walls["audit"] = time.perf_counter() - t0

        middle = args.rounds // 2
        crash_after = next((k for k in range(middle, args.rounds - 1) if in_flight(faults, rows, k + 1)), middle)
        shared = SeededFaults(args.seed, FaultRates())
        t0 = time.perf_counter()
        try:
            run_federation(config(root / "b", model_dir, files, args.rounds), hooks=shared.hooks(crash_after))
            problems.append("the crash hook did not stop the run")
        except SimulatedCrash:
            pass
        resumed = run_federation(config(root / "b", model_dir, files, args.rounds, resume=True), hooks=shared.hooks())
        walls["resume"] = time.perf_counter() - t0
        on_disk = {run: [json.loads(line) for line in (root / run / "run" / "metrics.jsonl").read_text().splitlines()]
                   for run in ("a", "b")}
        resume = {"crash_after": crash_after, "in_flight": len(in_flight(faults, rows, crash_after + 1)),
                  "digest": resumed.state_digest == reference.state_digest
                  and torch.equal(resumed.final_values, reference.final_values),
                  "rows": strip(on_disk["a"]) == strip(on_disk["b"]) and len(on_disk["b"]) == args.rounds,
                  "final_digest": reference.state_digest}
        if not (resume["digest"] and resume["rows"]):
            problems.append("the resumed run differs from the uninterrupted one")
        if shared.changed:
            problems.append(f"redone rounds sent other bytes: {shared.changed}")
    walls["cpu"] = time.process_time() - cpu0
    text = report(args, counts, problems, clock, walls, resume)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
