"""Time of one example-level DP ZO step vs one plain ZO step, same model, same batch, one process.

Both steps draw z, run the same two forward passes and apply the update; the DP step adds what DP
adds: a Poisson draw over the client's n examples, per-example losses (reduction="none"), clipping,
the private noise. The batch is the same fixed one for both, so the ratio measures DP's own cost,
not the varying size of Poisson batches. Steps are interleaved (plain, DP, plain, ...) and the
medians compared, so load on a shared machine hits both alike.

    OMP_NUM_THREADS=1 python benchmarks/dp_overhead.py [--hidden 256 --layers 4 --batch 16 --seq 64 --loss candidates]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from scale import _status_kib, reset_peak  # benchmarks/: the same Linux peak-RSS probe
from transformers import AutoModelForCausalLM, LlamaConfig

from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model
from meerkat_hf.privacy import (ExampleDP, causal_lm_per_example_loss, poisson_indices, private_generator,
                                private_scalar)
from meerkat_hf.tasks import candidate_loss
from meerkat_hf.zo import ZOStep, apply_step, gaussian_direction, projected_gradient, projected_gradients_per_example


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--examples", type=int, default=1000, help="the client's n (Poisson draw over n)")
    p.add_argument("--density", type=float, default=1e-3)
    p.add_argument("--loss", choices=("candidates", "lm"), default="candidates")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=max(128, args.seq), tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    model = get_meerkat_model(base, compute_mask(base, SparseMaskConfig(method="random", density=args.density),
                                                 progress=False))
    ids = torch.randint(4, args.vocab, (args.batch, args.seq))
    cand = torch.tensor([5, 6])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if args.loss == "candidates":
        batch["label"] = torch.randint(0, 2, (args.batch,))
        mean_loss = lambda: candidate_loss(model, batch, cand)  # noqa: E731
        per_example = lambda: candidate_loss(model, batch, cand, reduction="none")  # noqa: E731
    else:
        batch["labels"] = ids.clone()
        mean_loss = lambda: model(**batch).loss  # noqa: E731
        per_example = lambda: causal_lm_per_example_loss(model, batch)  # noqa: E731
    dp = ExampleDP(clip=1.0, noise_multiplier=1.0, batch_size=args.batch, num_examples=args.examples)
    gen = private_generator()
    k, eps, lr = model.num_selected, 1e-3, 1e-6

    def plain(step: int) -> None:
        z = gaussian_direction(step, k)
        g = projected_gradient(model, mean_loss, z, eps)
        apply_step(model.values, ZOStep((step,), (g,), lr), directions=[z])
        model.sync_weights()

    def private(step: int) -> None:
        poisson_indices(dp.num_examples, dp.sample_rate, gen)  # the batch draw (the batch itself is fixed here)
        z = gaussian_direction(step, k)
        g, _ = private_scalar(projected_gradients_per_example(model, per_example, z, eps), dp, gen)
        apply_step(model.values, ZOStep((step,), (g,), lr), directions=[z])
        model.sync_weights()

    with torch.no_grad():
        for s in range(3):
            plain(s), private(s)
        times = {"plain": [], "dp": []}
        for s in range(args.reps):
            for name, fn in (("plain", plain), ("dp", private)) if s % 2 == 0 else (("dp", private), ("plain", plain)):
                t0 = time.perf_counter()
                fn(1000 + s)
                times[name].append(time.perf_counter() - t0)
        # memory: the peak RSS above the start of 5 steps of each kind (Linux VmHWM, reset between them)
        peak_kib = {}
        for name, fn in (("plain", plain), ("dp", private)):
            if not reset_peak():
                break
            start = _status_kib("VmRSS")
            for s in range(5):
                fn(5000 + s)
            peak_kib[name] = _status_kib("VmHWM") - start
    med = {n: statistics.median(v) for n, v in times.items()}
    out = {"k": k, "num_params": sum(p.numel() for p in base.parameters()), **vars(args),
           "plain_step_ms": 1e3 * med["plain"], "dp_step_ms": 1e3 * med["dp"], "ratio": med["dp"] / med["plain"],
           "peak_rss_above_start_kib": peak_kib or None}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
