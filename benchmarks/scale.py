"""Scale: what the server side of a Meerkat round costs with 10 .. 10,000 clients per round.

Why: Meerkat's promise is cheap synchronisation for many institutions, so the server's replay
time, its memory and the downlinks must stay small as the federation grows. Client computation
is replaced by synthetic *valid* uplinks (T float32 scalars each, encoded with the real codec);
everything the server does is the real `FederatedServer`, called as the round engine calls it:
downlink encoding (one per distinct plan), `receive` (decode + validation) per uplink,
`finish_round` (virtual-path replay with GradIP, norm bound, FedAvg), and the Meerkat-VP
detector's `observe_round`. No model is loaded: the server only needs a k-vector (the masked
base values; synthetic here) and g_p (synthetic).

Per round it records server CPU time (`time.process_time`, one torch thread) and wall time,
the peak RSS above the round's starting RSS (`/proc/self/clear_refs` + `VmHWM`), and the
downlink a participant gets (records of the previous round vs the dense k-vector). Per cell it
also times a client replaying a one-round records downlink (the client's catch-up CPU), and for
every (k, clients) it encodes the catch-up downlink of a client that missed 1, 10, 100 rounds
on a server whose history holds those rounds' records (bytes only: that history is not replayed,
so it is cheap for every cell; the real-round cells' one-round downlinks give the same sizes). Cells too
slow for the budget are extrapolated linearly in the number of clients from the two largest
measured cells of the same k, and marked so. The P=100, k=106k cell runs enough rounds to fill
the server's record history to its cap, showing memory does not grow with past rounds.

    python benchmarks/scale.py                   # full grid: ~5 min of CPU on one quiet core (from the cells measured)
    python benchmarks/scale.py --quick           # smoke run (seconds)
    python benchmarks/scale.py --cells 106203:1000:2,1200000:1000:0   # choose rounds per cell (0: extrapolate)
    python benchmarks/scale.py --render          # table and plot again from rows.jsonl (no measuring)

Output under --out (default benchmarks/results/scale/): rows.jsonl (raw measured rows), cells.jsonl
(per-cell medians, measured and extrapolated), table.md, scale.png.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meerkat_hf.federated.protocol.client import FederatedClient  # noqa: E402
from meerkat_hf.federated.protocol.codec import KIND_DENSE, KIND_RECORDS, Record, RoundRecords, Uplink, downlink_size  # noqa: E402
from meerkat_hf.federated.protocol.gradip import StepScheduler, VPConfig  # noqa: E402
from meerkat_hf.federated.protocol.server import FederatedServer  # noqa: E402
from meerkat_hf.federated.protocol.virtual_path import LRSchedule, ProtocolParams, fp32  # noqa: E402

K_SMOLLM2 = 106_203  # SmolLM2-135M at density 1e-3 (README "Masks on SmolLM2-135M-Instruct")
K_1B = 1_200_000  # a 1.2B model at density 1e-3
T = 10
LR = 1e-5
FEDERATION_SEED = 1234
# One client's local round, the reference for the 1% target: RESULTS.md "Cost of a zeroth-order step",
# SmolLM2-135M, Meerkat ZO step 2,896 ms at batch 4 x 128 tokens on this machine's CPU -> T=10 steps.
CLIENT_ROUND_S = 10 * 2.896
MISSED = (1, 10, 100)

# (k, clients per round, rounds); None rounds = extrapolated (too slow for the ~15 min budget)
FULL_GRID = [
    (K_SMOLLM2, 10, 3), (K_SMOLLM2, 100, 100), (K_SMOLLM2, 1000, 2), (K_SMOLLM2, 10000, 1),
    (K_1B, 10, 3), (K_1B, 100, 2), (K_1B, 1000, 1), (K_1B, 10000, None),
]
QUICK_GRID = [(4_096, 10, 3), (4_096, 100, 6), (4_096, 1000, None), (32_768, 10, 2), (32_768, 100, 2), (32_768, 1000, None)]


# -- memory ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Return freed heap pages to the OS (else a previous round's freed memory hides this round's
    peak), then reset VmHWM to the current RSS (Linux); False where not allowed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- synthetic federation ------------------------------------------------------------------------
def make_server(k: int, num_clients: int, seed: int = 0) -> tuple[FederatedServer, bytes]:
    """A server on a synthetic k-vector (masked base values ~ N(0, 0.02^2)) and g_p."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(k, generator=gen) * 0.02
    gp = torch.randn(k, generator=gen) * 1e-3
    checksum = hashlib.blake2b(f"mask-{k}".encode(), digest_size=16).digest()
    fingerprint = hashlib.sha256(f"model-{k}".encode()).digest()[:8]
    params = ProtocolParams(FEDERATION_SEED, LRSchedule(LR))
    server = FederatedServer(values, checksum, fingerprint, params, num_clients=num_clients, pretrain_grad=gp)
    return server, checksum


def num_examples(c: int) -> int:
    return 50 + (c * 7) % 100


def synthetic_uplinks(server: FederatedServer, checksum: bytes, clients: int, round_id: int) -> list[bytes]:
    """What `clients` honest clients would send this round: T float32 scalars each, real codec."""
    rng = np.random.default_rng([FEDERATION_SEED, round_id])
    grads = rng.standard_normal((clients, T)) * 2.0
    return [Uplink(round_id, c, num_examples(c), checksum, server.digest, 1, tuple(fp32(g) for g in grads[c])).encode()
            for c in range(clients)]


def server_round(server: FederatedServer, scheduler: StepScheduler, uplinks: list[bytes], clients: int) -> dict:
    """One round exactly as the engine drives the server; returns timings, memory and downlink sizes."""
    r = server.round
    budgets = {c: T for c in range(clients)}
    peak_ok = reset_peak()
    rss0 = _status_kib("VmRSS")
    c0, w0 = time.process_time(), time.perf_counter()
    server.begin_round(r, budgets)
    encoded: dict[tuple, bytes] = {}
    for c in range(clients):  # the engine encodes one downlink per distinct plan
        plan = server.downlink_plan(c)
        if plan not in encoded:
            encoded[plan] = server.downlink(*plan)
    c1 = time.process_time()
    for c, data in enumerate(uplinks):
        rej = server.receive(data, sender=c)
        if rej is not None:
            raise RuntimeError(f"synthetic uplink rejected: {rej}")
    c2 = time.process_time()
    summary = server.finish_round()
    c3 = time.process_time()
    scheduler.observe_round(r, {p.client_id: p.gradips for p in summary.paths})
    c4, w4 = time.process_time(), time.perf_counter()
    peak = _status_kib("VmHWM") if peak_ok else None
    assert len(summary.accepted) == clients and not summary.rejected and summary.refused is None
    plan = server.downlink_plan(0)  # what a participant of this round gets for the next one
    n = len(server.budgets)
    history = tuple(server.history[-1:])
    return {
        "round": r, "cpu_s": c4 - c0, "wall_s": w4 - w0, "downlink_encode_s": c1 - c0, "receive_s": c2 - c1,
        "replay_fedavg_s": c3 - c2, "vp_s": c4 - c3,
        "peak_rss_delta_mib": None if peak is None else (peak - rss0) / 1024, "rss_mib": _status_kib("VmRSS") / 1024,
        "history_rounds": len(server.history), "history_wire_bytes": sum(rr.nbytes() for rr in server.history),
        "downlink_records_bytes": downlink_size(KIND_RECORDS, n, history=history),
        "downlink_dense_bytes": downlink_size(KIND_DENSE, n, k=server.k),
        "downlink_sent": "dense" if plan[0] == KIND_DENSE else "records",
        "uplink_bytes": summary.uplink_bytes, "digest": summary.state_digest.hex(),
    }


def client_replay_seconds(server: FederatedServer, previous: torch.Tensor, clients: int) -> tuple[float, int]:
    """CPU seconds a client holding round r-1's state needs to apply the downlink of round r: the records,
    or the dense state where one round's records outweigh it (the server then keeps no records to send)."""
    r = server.round  # the downlink of round r (participants: the last round's, client 0 among them)
    data = server.downlink(KIND_RECORDS if server.history else KIND_DENSE, r - 1)
    client = FederatedClient(0, [0], lambda b: b, batch_size=1, data_seed=0)
    client.state.synced_round = r - 1
    t0 = time.process_time()
    client.receive(data, mask_checksum=server.checksum, fingerprint=server.fingerprint, params=server.params,
                   cache=previous)  # raises if the reconstruction's digest differs: the replay is exact
    return time.process_time() - t0, len(data)


def catchup_rows(k: int, clients: int) -> list[dict]:
    """Downlink bytes for a client that missed m rounds: real encoder, real pruning, history not replayed."""
    observer = clients  # never a participant
    server, _ = make_server(k, clients + 1)
    rng = np.random.default_rng(0)
    rounds = max(MISSED) + 1
    record_round = tuple(Record(c, num_examples(c), 1, tuple(fp32(g) for g in rng.standard_normal(T)))
                         for c in range(clients))
    for r in range(rounds):
        server.history.append(RoundRecords(r, record_round))
        server._prune_history()
        server.round = r + 1
    server.budgets = {c: T for c in range(clients)}  # the participants list of the round the downlink starts
    rows = []
    dense = downlink_size(KIND_DENSE, clients, k=k)
    for m in MISSED:
        server.synced[observer] = server.round - m
        kind, frm = server.downlink_plan(observer)
        sent = dense if kind == KIND_DENSE else len(server.downlink(kind, frm))
        records = downlink_size(KIND_RECORDS, clients, history=(RoundRecords(0, record_round),) * m)
        assert sent <= dense, "catch-up must never cost more than the dense downlink"
        rows.append({"kind": "catchup", "k": k, "clients": clients, "missed": m, "records_bytes": records,
                     "dense_bytes": dense, "sent": "dense" if kind == KIND_DENSE else "records", "sent_bytes": sent})
    return rows


def planning_row(clients: int) -> dict:
    """CPU to plan a round's downlinks (the engine calls `downlink_plan` once per participant) while the
    server holds one round of `clients` records: it sized every participant's chain record by record,
    O(clients^2) per round, until `RoundRecords.nbytes` was cached."""
    server, _ = make_server(K_SMOLLM2, clients)
    server.history.append(RoundRecords(0, tuple(Record(c, num_examples(c), 1, (0.5,) * T) for c in range(clients))))
    server.round, server.budgets = 1, {c: T for c in range(clients)}
    t0 = time.process_time()
    plans = {server.downlink_plan(c) for c in range(clients)}
    return {"kind": "planning", "k": K_SMOLLM2, "clients": clients, "cpu_s": time.process_time() - t0,
            "plans": sorted("dense" if kd == KIND_DENSE else "records" for kd, _ in plans)}


# -- the grid ------------------------------------------------------------------------------------
def run_cell(k: int, clients: int, rounds: int, out, log) -> dict:
    server, checksum = make_server(k, clients)
    scheduler = StepScheduler("vp", T, VPConfig())
    rows = []
    previous = server.values
    replay = None
    for _ in range(rounds):
        uplinks = synthetic_uplinks(server, checksum, clients, server.round)
        previous = server.values
        row = {"kind": "round", "k": k, "clients": clients, **server_round(server, scheduler, uplinks, clients)}
        del uplinks
        rows.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
        log(f"  k={k:>9,} P={clients:>6,} round {row['round']:>3}: cpu {row['cpu_s']:8.3f} s  wall {row['wall_s']:8.3f} s  "
            f"peak +{row['peak_rss_delta_mib'] or 0:7.1f} MiB  rss {row['rss_mib']:7.1f} MiB  history {row['history_rounds']}")
    if server.round >= 1:
        replay = client_replay_seconds(server, previous, clients)
    cpu = [r["cpu_s"] for r in rows]
    per_round = statistics.median(cpu)
    cell = {"kind": "cell", "k": k, "clients": clients, "rounds": rounds, "extrapolated": False,
            "cpu_s": per_round, "wall_s": statistics.median(r["wall_s"] for r in rows),
            "replay_fedavg_s": statistics.median(r["replay_fedavg_s"] for r in rows),
            "receive_s": statistics.median(r["receive_s"] for r in rows),
            "downlink_encode_s": statistics.median(r["downlink_encode_s"] for r in rows),
            "cpu_per_client_round_ms": 1e3 * per_round / clients,
            "peak_rss_delta_mib": max((r["peak_rss_delta_mib"] or 0) for r in rows),
            "downlink_records_bytes": rows[-1]["downlink_records_bytes"], "downlink_dense_bytes": rows[-1]["downlink_dense_bytes"],
            "downlink_sent": rows[-1]["downlink_sent"],
            "client_replay_s": None if replay is None else replay[0]}
    cell["share_of_client_round"] = cell["cpu_per_client_round_ms"] / 1e3 / CLIENT_ROUND_S
    return cell


def extrapolate(k: int, clients: int, cells: list[dict]) -> dict:
    """Linear in the number of clients through the two largest measured cells of this k."""
    known = sorted((c for c in cells if c["k"] == k and not c["extrapolated"]), key=lambda c: c["clients"])[-2:]
    if len(known) < 2:
        raise ValueError(f"need two measured cells at k={k} to extrapolate")
    a, b = known

    def line(key):
        if a[key] is None or b[key] is None:
            return None
        slope = (b[key] - a[key]) / (b["clients"] - a["clients"])
        value = b[key] + slope * (clients - b["clients"])
        # memory: at least what was measured (it may be flat in the clients: noise must not extrapolate below it)
        return max(value, a[key], b[key]) if key == "peak_rss_delta_mib" else max(value, 0.0)

    one_round = RoundRecords(0, tuple(Record(c, num_examples(c), 1, (0.0,) * T) for c in range(clients)))
    records = downlink_size(KIND_RECORDS, clients, history=(one_round,))
    dense = downlink_size(KIND_DENSE, clients, k=k)
    cell = {"kind": "cell", "k": k, "clients": clients, "rounds": 0, "extrapolated": True,
            "from": [a["clients"], b["clients"]], **{key: line(key) for key in
                                                     ("cpu_s", "wall_s", "replay_fedavg_s", "receive_s", "downlink_encode_s",
                                                      "peak_rss_delta_mib", "client_replay_s")},
            "downlink_records_bytes": records, "downlink_dense_bytes": dense,
            "downlink_sent": "records" if records < dense else "dense"}
    cell["cpu_per_client_round_ms"] = 1e3 * cell["cpu_s"] / clients
    cell["share_of_client_round"] = cell["cpu_per_client_round_ms"] / 1e3 / CLIENT_ROUND_S
    return cell


def _mib(x):
    return "-" if x is None else f"{x:,.1f}"


def _bytes(x):
    return f"{x / 1e6:,.2f} MB" if x >= 1e6 else f"{x / 1e3:,.1f} kB"


def table(cells: list[dict], catchup: list[dict], flat: list[dict]) -> str:
    lines = ["| k | clients/round | server CPU / round | wall / round | of which replay+FedAvg+GradIP | per client-round | "
             "vs a client's local round (29 s) | peak RSS above start | downlink to a participant: records / dense (sent) | "
             "client replaying 1 missed round |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in sorted(cells, key=lambda c: (c["k"], c["clients"])):
        ex = " *(extrap.)*" if c["extrapolated"] else ""
        lines.append(
            f"| {c['k']:,} | {c['clients']:,} | {c['cpu_s']:,.2f} s{ex} | {c['wall_s']:,.2f} s | {c['replay_fedavg_s']:,.2f} s | "
            f"{c['cpu_per_client_round_ms']:.2f} ms | {100 * c['share_of_client_round']:.3f}% | {_mib(c['peak_rss_delta_mib'])} MiB | "
            f"{_bytes(c['downlink_records_bytes'])} / {_bytes(c['downlink_dense_bytes'])} ({c['downlink_sent']}) | "
            f"{'-' if c['client_replay_s'] is None else format(c['client_replay_s'], ',.2f') + ' s'} |")
    lines += ["", "Catch-up downlink of a client that missed m rounds (what the server sends; records = what the chain "
              "of records would cost):", "",
              "| k | clients/round | dense | " + " | ".join(f"missed {m}: records -> sent" for m in MISSED) + " |",
              "|---:|---:|---:|" + "---|" * len(MISSED)]
    keys = sorted({(r["k"], r["clients"]) for r in catchup})
    for k, p in keys:
        rs = {r["missed"]: r for r in catchup if r["k"] == k and r["clients"] == p}
        lines.append(f"| {k:,} | {p:,} | {_bytes(rs[MISSED[0]]['dense_bytes'])} | " + " | ".join(
            f"{_bytes(rs[m]['records_bytes'])} -> **{rs[m]['sent']} {_bytes(rs[m]['sent_bytes'])}**" for m in MISSED) + " |")
    if flat:
        rss = [r["rss_mib"] for r in flat]
        hist = [r["history_rounds"] for r in flat]
        lines += ["", f"Memory over {len(flat)} rounds at k={flat[0]['k']:,}, {flat[0]['clients']} clients/round: RSS after "
                  f"round 1 / 10 / {len(flat) // 2} / {len(flat)}: " + " / ".join(
                      f"{rss[i]:,.1f}" for i in (0, min(9, len(rss) - 1), len(rss) // 2 - 1, len(rss) - 1)) +
                  f" MiB; record history held: {hist[0]} -> max {max(hist)} rounds (capped where records would exceed "
                  f"the dense vector: {max(r['history_wire_bytes'] for r in flat):,} wire bytes)."]
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], catchup: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, color in zip(sorted({c["k"] for c in cells}), ("tab:blue", "tab:red", "tab:green")):
        cs = sorted((c for c in cells if c["k"] == k), key=lambda c: c["clients"])
        a.plot([c["clients"] for c in cs], [c["cpu_s"] for c in cs], "-", color=color, alpha=0.5)
        for c in cs:
            a.plot(c["clients"], c["cpu_s"], "o", color=color, mfc="white" if c["extrapolated"] else color)
        a.plot([], [], "o-", color=color, label=f"k = {k:,}")
        a.plot([c["clients"] for c in cs], [0.01 * CLIENT_ROUND_S * c["clients"] for c in cs], ":", color="gray")
        rs = sorted((r for r in catchup if r["k"] == k), key=lambda r: (r["clients"], r["missed"]))
        for p, marker in zip(sorted({r["clients"] for r in rs}), "o^sD"):
            pr = [r for r in rs if r["clients"] == p]
            b.plot([r["missed"] for r in pr], [r["sent_bytes"] for r in pr], marker + "-", color=color, alpha=0.8,
                   label=f"k={k:,}, {p:,} clients")
    a.plot([], [], ":", color="gray", label="1% of a client's round x clients")
    a.set(xscale="log", yscale="log", xlabel="clients per round", ylabel="server CPU seconds per round",
          title="Server round (hollow: extrapolated)")
    a.legend(fontsize=8)
    b.set(xscale="log", yscale="log", xlabel="rounds missed", ylabel="catch-up downlink bytes",
          title="Catch-up downlink (min of records, dense)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small k and few clients: a smoke run of every code path")
    ap.add_argument("--out", default="benchmarks/results/scale")
    ap.add_argument("--cells", default=None,
                    help="comma-separated k:clients:rounds to run instead of the grid's choice (e.g. 106203:1000:1); the "
                         "grid's other cells are extrapolated (where two measured cells of their k allow it)")
    ap.add_argument("--render", action="store_true", help="rebuild table.md, scale.png, cells.jsonl from --out's rows.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.cells:
        chosen = {(k, p): r for k, p, r in (tuple(int(x) for x in c.split(":")) for c in args.cells.split(","))}
        grid = [(k, p, chosen.get((k, p))) for k, p, _ in grid] + [(k, p, r) for (k, p), r in chosen.items()
                                                                   if (k, p) not in {(g[0], g[1]) for g in grid}]
    log = lambda s: print(s, flush=True)  # noqa: E731
    command = "python benchmarks/scale.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    rows_path = out_dir / "rows.jsonl"
    if not args.render:
        t0 = time.perf_counter()
        with open(rows_path, "w") as out:
            for k, clients, rounds in grid:
                if not rounds:
                    continue
                cell = run_cell(k, clients, rounds, out, log)
                out.write(json.dumps(cell) + "\n")
                log(f"k={k:,} P={clients:,}: {cell['cpu_s']:.3f} s CPU/round, {cell['cpu_per_client_round_ms']:.3f} ms "
                    f"per client-round = {100 * cell['share_of_client_round']:.4f}% of a client's local round")
            for k, clients, _ in grid:
                for row in catchup_rows(k, clients):
                    out.write(json.dumps(row) + "\n")
            out.write(json.dumps({"kind": "meta", "wall_s": time.perf_counter() - t0, "command": command}) + "\n")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    if not any(r["kind"] == "planning" for r in rows):  # milliseconds since RoundRecords.nbytes is cached
        with open(rows_path, "a") as out:
            for clients in sorted({p for _, p, _ in grid}):
                row = planning_row(clients)
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                log(f"planning {clients:,} downlinks: {row['cpu_s']:.4f} s CPU")
    render(grid, rows, out_dir, log)
    return 0


def render(grid, rows: list[dict], out_dir: Path, log) -> None:
    """table.md, scale.png and cells.jsonl (measured + extrapolated cells) from the raw rows."""
    cells = [r for r in rows if r["kind"] == "cell" and not r["extrapolated"]]
    for k, clients, _ in grid:
        if not any(c["k"] == k and c["clients"] == clients for c in cells):
            try:
                cells.append(extrapolate(k, clients, cells))
            except ValueError as err:
                log(f"k={k:,} P={clients:,}: not run, not extrapolated ({err})")
    catchup = [r for r in rows if r["kind"] == "catchup"]
    rounds_rows = [r for r in rows if r["kind"] == "round"]
    flat = []
    if rounds_rows:
        longest = max({(r["k"], r["clients"]) for r in rounds_rows},
                      key=lambda kc: sum(1 for r in rounds_rows if (r["k"], r["clients"]) == kc))
        flat = [r for r in rounds_rows if (r["k"], r["clients"]) == longest]
    md = table(cells, catchup, flat)
    planning = [r for r in rows if r["kind"] == "planning"]
    if planning:
        md += "\nPlanning one round's downlinks (one `downlink_plan` per participant, one round of records held): " + \
            ", ".join(f"{r['clients']:,} participants {1e3 * r['cpu_s']:.1f} ms" for r in planning) + ".\n"
    meta = [r for r in rows if r["kind"] == "meta"]
    md += (f"\nT = {T} local steps, q = 1; one torch thread" +
           (f"; measured in {meta[-1]['wall_s']:,.0f} s wall; `{meta[-1]['command']}`" if meta else "") + ".\n")
    (out_dir / "table.md").write_text(md)
    (out_dir / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))
    if cells:
        plot(cells, catchup, out_dir / "scale.png")
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
