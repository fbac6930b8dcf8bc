"""Does a bf16 finite difference still estimate the gradient? (issue "Ten times the learning", item 1)

For one fixed batch of tweets and D seeded Gaussian directions z on a sensitivity mask, compare the
two-point difference (L(w + eps z) - L(w - eps z)) / (2 eps) computed under several forward
precisions with the exact directional derivative g.z from fp32 backprop:

    python research/bf16_precision.py --mask runs/study/masks/docs64x256-1e-05 --out research/results/bf16_precision

Precisions (the fp32 master and the perturbation are identical in all of them; only the forward differs):
  fp32        the model in fp32 (the reference path);
  bf16        the whole model cast to bf16, perturbed values written (rounded) into the bf16 weights;
  autocast    the fp32 model under torch.autocast(bfloat16): matmuls in bf16, the rest fp32;
  bf16-mixed  Linear/Embedding weights in bf16, 1-D weights (norms) in fp32, under autocast: what
              `meerkat_hf` runs for `bf16=True` (meerkat_hf.modeling.precision).
Prints a markdown table and writes it with the raw numbers (JSON) under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from meerkat_hf import MeerkatModel, SparseMask, zo
from meerkat_hf.hub.loading import load_model_and_tokenizer
from meerkat_hf.tasks import (
    ClassificationCollator,
    balanced_class_weights,
    candidate_loss,
    candidate_token_ids,
    encode_classification,
    load_task_dataset,
)

PRECISIONS = ("fp32", "bf16", "autocast", "bf16-mixed")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mask", required=True, help="a saved mask folder")
    ap.add_argument("--task", default="tweets_binary")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--directions", type=int, default=32)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--out", default="research/results/bf16_precision")
    args = ap.parse_args(argv)

    model, tok = load_model_and_tokenizer("smollm2")
    mask = SparseMask.from_pretrained(args.mask)
    cand = candidate_token_ids(tok, args.task)
    train = load_task_dataset(args.task, "train")
    weights = balanced_class_weights(train["label"], len(cand))
    enc = encode_classification(tok, args.task, train.select(range(args.batch_size)), args.max_length)
    batch = ClassificationCollator(tok)([enc[i] for i in range(args.batch_size)])

    # exact g at the masked coordinates, fp32 backprop
    names = set(mask.indices)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    model.zero_grad(set_to_none=True)
    candidate_loss(model, batch, cand, weights).backward()
    params = dict(model.named_parameters())
    g = torch.cat([params[n].grad.reshape(-1)[i] if i is not None else params[n].grad.reshape(-1)
                   for n, i in mask.indices.items()]).double()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)

    k = mask.num_selected
    dirs = [zo.gaussian_direction(zo.derive_seed(1234, j), k) for j in range(args.directions)]
    exact = np.array([float(g @ z.double()) for z in dirs])
    rows, raw = [], {"exact": exact.tolist(), "k": k, "batch": args.batch_size, "task": args.task}
    for precision in args.precisions:
        m, _ = load_model_and_tokenizer("smollm2")
        mm = MeerkatModel(m, mask)
        mm.set_forward_precision(precision)  # every forward of the base model from here on

        def loss() -> float:
            return float(candidate_loss(mm.base_model, batch, cand, weights))
        t0 = time.perf_counter()
        loss()
        per_forward = time.perf_counter() - t0
        for eps in args.eps:
            est = np.array([zo.projected_gradient(mm, loss, z, eps) for z in dirs])
            err = est - exact
            corr = float(np.corrcoef(est, exact)[0, 1])
            rows.append((precision, eps, corr, float(np.sqrt(np.mean(exact ** 2))), float(np.sqrt(np.mean(err ** 2))),
                         per_forward))
            raw[f"{precision}@{eps:g}"] = est.tolist()
            print(f"{precision:10s} eps {eps:g}: corr {corr:.3f} rms err {rows[-1][4]:.3g}", flush=True)
        _write(args, k, rows, raw)  # after every precision: an interrupted probe keeps what it measured
        del mm, m
    print((Path(args.out) / "table.md").read_text())


def _write(args, k: int, rows: list, raw: dict) -> None:
    lines = [f"{args.task}, batch {args.batch_size} x {args.max_length}, {args.directions} directions, k = {k} "
             f"(mask {Path(args.mask).name}), balanced candidate loss; exact = fp32 backprop g.z; torch threads "
             f"{torch.get_num_threads()}", "",
             "| forward | eps | corr(estimate, exact) | rms exact g.z | rms(estimate - exact) | s/forward |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {e:g} | {c:.3f} | {r:.3g} | {d:.3g} | {t:.3f} |" for p, e, c, r, d, t in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "raw.json").write_text(json.dumps(raw))


if __name__ == "__main__":
    main()
