"""Where a full-parameter ZO step spends its time besides the two forward passes (issue 15, item 2).

At k = 106,203,456 (every non-embedding weight of SmolLM2-135M, what `full-fedzo` perturbs) each
vector operation costs as much as a forward pass on this CPU, so the bookkeeping around the
forward passes decides whether the Full-FedZO baseline is slow "for reasons of ours". This times,
in one process on one thread, the operations one ZO step and one round run at that k, in the
form they had before (v0.x) and the form they have now (same bits or, for GradIP, the same
statistic to ~1e-16), and prints a markdown table:

    python benchmarks/full_zo_overhead.py [--k 106203456] [--repeat 3]

The Gaussian draw is the protocol's: once by the client, once by the server's replay and, for a
client that catches up, once more. Since wire version 2 a direction longer than
`zo.DIRECTION_CHUNK` is drawn in seeded chunks that threads fill in parallel; `--threads N` times
it on N threads against the one sequential stream of version 1.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch

from meerkat_hf.federated.protocol.codec import state_digest
from meerkat_hf.federated.protocol.virtual_path import gradip
from meerkat_hf.zo import all_finite, gaussian_direction


def _time(fn, repeat: int) -> float:
    fn()  # warm the allocator
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=106_203_456)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads for the chunked draw row")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    k, eps = args.k, 1e-3
    w, z = torch.randn(k), torch.empty(k)
    gaussian_direction(7, k, out=z)
    g64 = np.random.default_rng(0).standard_normal(k)
    buf = torch.empty_like(w)

    def perturb_before():
        a = w + eps * z
        b = w - eps * z
        return a, b

    def perturb_after():
        torch.mul(z, eps, out=buf).add_(w)
        torch.sub(w, torch.mul(z, eps, out=buf), out=buf)

    def draw_v1():  # one Mersenne Twister stream (wire version 1)
        torch.randn(k, generator=torch.Generator().manual_seed(7), out=z)

    def draw_chunked():
        torch.set_num_threads(args.threads)
        try:
            gaussian_direction(7, k, out=z)
        finally:
            torch.set_num_threads(1)

    rows = [
        (f"draw z: one stream (v1) / seeded chunks on {args.threads} threads (v2)",
         "per step x (1 client + 1 server [+ 1 catch-up])", _time(draw_v1, args.repeat), _time(draw_chunked, args.repeat)),
        ("two perturbed states w +- eps z", "per step (client)", _time(perturb_before, args.repeat),
         _time(perturb_after, args.repeat)),
        ("GradIP g <g_p, z> in float64", "per step (server replay)",
         _time(lambda: float(np.add.reduce(g64 * z.numpy().astype(np.float64))), args.repeat),
         _time(lambda: gradip(g64, z, 1.0), args.repeat)),
        ("NaN/inf check of a state", "per message / replayed client",
         _time(lambda: bool(torch.isfinite(w).all()), args.repeat), _time(lambda: all_finite(w), args.repeat)),
        ("state digest (BLAKE2b)", "per client x 3-4 per round",
         _time(lambda: hashlib.blake2b(w.numpy().tobytes(), digest_size=8).digest(), args.repeat),
         _time(lambda: state_digest(w), args.repeat)),
    ]
    print(f"k = {k:,}, one torch thread (the draw row: as stated), mean of {args.repeat}\n")
    print("| operation | how often | before (s) | now (s) | speed-up |")
    print("|---|---|---|---|---|")
    for name, often, before, after in rows:
        now = "unchanged" if after is None else f"{after:.3f}"
        gain = "" if after is None else f"{before / after:.1f}x"
        print(f"| {name} | {often} | {before:.3f} | {now} | {gain} |")


if __name__ == "__main__":
    main()
