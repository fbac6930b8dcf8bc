"""What the frozen trunk buys: seconds per ZO step with and without it, by where the mask starts.

A ZO step runs 2N forwards (spsa, N directions) or N + 1 (fzoo) on one batch; the decoder layers
below the first masked coordinate compute the same activations in all of them, and with the frozen
trunk (`meerkat_hf.modeling.frozen_trunk`, on by default) they run once. This times
`zo.step_scalars` on SmolLM2 (batch 8 x 64, the library's candidate loss over 2 label tokens, random masks of k coordinates
placed by `SparseMaskConfig(layers_to_transform=...)`) with the trunk reused and not, alternately in
one process, and checks the scalars are the same bits both ways.

    python benchmarks/frozen_trunk.py --layers all last8 last4 last2 norm --n 1 4 8 --estimator spsa
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def layer_spec(name: str, num_layers: int) -> dict:
    if name == "all":
        return {}
    if name == "norm":  # the final norm alone
        return {"include_patterns": [r"^model\.norm\."], "density": 1.0}
    if name.startswith("last"):
        return {"layers_to_transform": list(range(num_layers - int(name[4:]), num_layers))}
    raise SystemExit(f"unknown --layers {name!r}: all | lastN | norm")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", nargs="+", default=["all", "last8", "last4", "last2"],
                    help="all | lastL | norm, each optionally @N to time it at N directions only")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--estimator", default="spsa", choices=["spsa", "fzoo"])
    ap.add_argument("--k", type=int, default=1062, help="masked coordinates (the study's density-1e-5 count)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--trunk-only", action="store_true",
                    help="time only the path with the trunk (the default path; without it N = 64 takes minutes a step)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model, zo
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.masks.selection import selectable_parameters
    from meerkat_hf.tasks import candidate_logits

    model, _ = load_model_and_tokenizer(args.model)
    model.eval()
    num_layers = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, min(20000, model.config.vocab_size), (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    target = torch.randint(0, 2, (args.batch_size,), generator=g)
    candidates = torch.tensor([33, 44])  # two label tokens: the head computes those rows only (tasks.candidate_logits)
    rows = []
    for entry in args.layers:
        name, _, own_n = entry.partition("@")  # NAME@N: this mask at N directions only (e.g. all@1 norm@64)
        spec = layer_spec(name, num_layers)
        selectable = sum(p.numel() for _, p in selectable_parameters(model, SparseMaskConfig(**spec)))
        density = spec.pop("density", min(1.0, args.k / selectable))
        mask = compute_mask(model, SparseMaskConfig(method="random", density=density, **spec), progress=False)
        mm = get_meerkat_model(model, mask)

        def loss():
            return F.cross_entropy(candidate_logits(mm, batch, candidates).float(), target)

        for n in ([int(own_n)] if own_n else args.n):
            dirs = [zo.gaussian_direction(zo.derive_seed(1, j), mm.num_selected) for j in range(n)]
            times: dict[bool, list[float]] = {True: [], False: []}
            out: dict[bool, list[float]] = {}
            modes = (True,) if args.trunk_only else (True, False)
            for reuse in modes:  # warm-up
                mm.reuse_frozen_trunk = reuse
                out[reuse] = zo.step_scalars(mm, loss, dirs, 1e-3, args.estimator)
            for _ in range(args.repeats):
                for reuse in modes:
                    mm.reuse_frozen_trunk = reuse
                    start = time.perf_counter()
                    zo.step_scalars(mm, loss, dirs, 1e-3, args.estimator)
                    times[reuse].append(time.perf_counter() - start)
            row = {"layers": name, "k": mm.num_selected, "trunk_depth": mm.trunk_depth or 0,
                   "estimator": args.estimator, "n": n, "s_per_step_trunk": statistics.median(times[True])}
            if args.trunk_only:
                print(f"{name:>6} k={row['k']} depth={row['trunk_depth']:>2} {args.estimator} N={n}: "
                      f"{row['s_per_step_trunk']:.2f} s per step with the trunk", flush=True)
            else:
                row["s_per_step_every_layer"] = statistics.median(times[False])
                row["same_bits"] = out[True] == out[False]
                row["speedup"] = row["s_per_step_every_layer"] / row["s_per_step_trunk"]
                print(f"{name:>6} k={row['k']} depth={row['trunk_depth']:>2} {args.estimator} N={n}: "
                      f"{row['s_per_step_every_layer']:.2f} s -> {row['s_per_step_trunk']:.2f} s per step "
                      f"({row['speedup']:.2f}x, same bits: {row['same_bits']})", flush=True)
            rows.append(row)
        mm.unload()
    meta = {"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "batch_size": args.batch_size,
            "seq_len": args.seq_len, "repeats": args.repeats}
    if args.json:
        from meerkat_hf.hub import write_files_atomically
        folder, _, file = args.json.rpartition("/")
        write_files_atomically(folder or ".", {file: json.dumps({"meta": meta, "rows": rows}, indent=1).encode()})
    print(json.dumps(meta))
    return rows


if __name__ == "__main__":
    main()
