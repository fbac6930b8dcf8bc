"""`benchmarks/scale.py --quick`: every code path of the scaling benchmark in a few seconds."""

from __future__ import annotations

import json

import torch
from conftest import load_script


def test_scale_benchmark_quick(tmp_path):
    scale = load_script("benchmarks/scale.py")
    threads = torch.get_num_threads()
    try:
        assert scale.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["kind"] == "round"]
    cells = {(r["k"], r["clients"]): r for r in map(json.loads, (tmp_path / "cells.jsonl").read_text().splitlines())}
    catchup = [r for r in rows if r["kind"] == "catchup"]
    assert len(rounds) == 3 + 6 + 2 + 2 and all(r["cpu_s"] > 0 for r in rounds)
    assert cells[(4096, 1000)]["extrapolated"] and not cells[(4096, 100)]["extrapolated"]
    assert cells[(4096, 100)]["client_replay_s"] > 0  # a client applied a records downlink (digest-checked)
    # catch-up never costs more than the dense downlink; records where the chain is shorter
    assert all(r["sent_bytes"] <= r["dense_bytes"] for r in catchup)
    assert {(r["clients"], r["missed"]): r["sent"] for r in catchup if r["k"] == 4096}[(10, 1)] == "records"
    assert {(r["clients"], r["missed"]): r["sent"] for r in catchup if r["k"] == 4096}[(1000, 100)] == "dense"
    # the record history stops growing once records would outweigh the dense vector
    hist = [r["history_rounds"] for r in rounds if (r["k"], r["clients"]) == (4096, 100)]
    assert hist[-1] == hist[-2] < 6
    assert {r["clients"] for r in rows if r["kind"] == "planning"} == {10, 100, 1000}
    assert (tmp_path / "table.md").read_text().count("*(extrap.)*") == 2 and (tmp_path / "scale.png").stat().st_size > 0
    # --render rebuilds the same table from the raw rows without measuring
    table = (tmp_path / "table.md").read_text()
    assert scale.main(["--quick", "--out", str(tmp_path), "--render"]) == 0
    assert (tmp_path / "table.md").read_text() == table
