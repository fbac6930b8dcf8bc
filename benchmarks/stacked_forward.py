"""Would N perturbations in one batched forward be faster than N forwards? An upper bound, measured.

N perturbed models differ only in the masked coordinates, so a step's N forwards could run as one
forward over N stacked copies of the batch (each copy seeing its own sparse weight difference). Whatever
that costs, it cannot beat one plain forward over the N x batch rows. This times exactly that bound:
N forwards of `--batch-size` rows against one forward of N x `--batch-size` rows, alternately in one
process, for each N and dtype. A ratio near 1 means stacking buys nothing on this machine.

    python benchmarks/stacked_forward.py --n 1 4 8 16 --dtypes float32 bfloat16 --batch-size 8 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from meerkat_hf.hub.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model)
    model.eval()
    vocab = model.config.vocab_size
    rows = []
    for dtype in args.dtypes:
        model.to(getattr(torch, dtype))
        for n in args.n:
            ids = torch.randint(4, min(20000, vocab), (n * args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(n))
            mask = torch.ones_like(ids)

            def forward(rows_):
                with torch.no_grad():
                    model(input_ids=ids[rows_], attention_mask=mask[rows_], logits_to_keep=1, use_cache=False)

            groups = [slice(i * args.batch_size, (i + 1) * args.batch_size) for i in range(n)]
            forward(groups[0])  # warm-up
            sequential, stacked = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for g in groups:
                    forward(g)
                sequential.append(time.perf_counter() - start)
                start = time.perf_counter()
                forward(slice(0, n * args.batch_size))
                stacked.append(time.perf_counter() - start)
            seq, stk = statistics.median(sequential), statistics.median(stacked)
            rows.append({"dtype": dtype, "n": n, "sequential_s": seq, "stacked_s": stk, "speedup": seq / stk,
                         "forwards_per_s_sequential": n / seq, "forwards_per_s_stacked": n / stk})
            print(f"{dtype:9s} N={n:3d}: {n} forwards of {args.batch_size} rows {seq:.3f} s, one of {n * args.batch_size} "
                  f"rows {stk:.3f} s -> stacking {seq / stk:.2f}x", flush=True)
    print(f"(batch {args.batch_size} x {args.seq_len}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
