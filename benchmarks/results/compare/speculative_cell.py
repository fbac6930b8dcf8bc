import sys, json, time
sys.path.insert(0, "benchmarks")
from pathlib import Path
import compare as c
out = Path("runs/compare")
m = c.ALL_METHODS["site-dp-eps1"]
grid = sorted(m.lrs); step = grid[1] / grid[0]; lr = grid[0] / step
name = c.task_name("cell", "site-dp-eps1", lr, 0)
print("lr", lr, "task", name, flush=True)
assert c.cell_name("site-dp-eps1", lr, 0) not in c.read_cells(out)
assert c._claim(out, name), "claimed"
t = time.perf_counter()
row = c.run_cell("site-dp-eps1", lr, 0, out, [])
with (out / "cells.jsonl").open("a") as f:
    f.write(json.dumps(row) + "\n")
(out / "claims" / f"{name}.lock").unlink(missing_ok=True)
c._log(f"{name}: done in {time.perf_counter() - t:.0f} s (speculative)")
