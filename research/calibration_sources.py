"""Which offline calibration text should the embedded default use? Masks compared by overlap and cost.

Meerkat's mask should come from *pre-training-like* text (the paper's transferable sparsity).
Nothing can be downloaded here, so the candidates are what every machine has:

* `python_docs`: CPython's standard-library docstrings (generic technical English prose);
* `self`: text sampled from the model itself, the closest thing to its pre-training distribution;
* `task`: the downstream task's own prompts (the tweets), i.e. *not* pre-training-like.

For each source and size, this computes the sensitivity mask on the same model and reports its
wall time, and the overlap |A ∩ B| / k of its selected coordinates with the reference mask
(`--reference-mask`, or `self` at the largest size) and with every other mask, plus the squared-gradient mass the top
0.1% captures. Same density, same exclusions, one process.

    python benchmarks/mask_benchmark.py --calibration python_docs --num-sequences 64 --seq-len 256 --out runs/mask-64x256
    python research/calibration_sources.py --sizes 32x128 --reference-mask runs/mask-64x256
"""

from __future__ import annotations

import argparse
import json
import time


def selected_set(mask) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, idx in mask.indices.items() for i in idx.tolist()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--sources", nargs="+", default=["python_docs", "self", "task"])
    ap.add_argument("--sizes", nargs="+", default=["32x128", "64x256"], help="NUM_SEQUENCESxSEQ_LEN")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--task", default="tweets_binary")
    ap.add_argument("--reference-mask", default=None,
                    help="a saved mask to compare with (e.g. benchmarks/mask_benchmark.py --out DIR at 64x256); "
                         "default: the `self` mask at the largest size")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from meerkat_hf import SparseMaskConfig, compute_mask
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.tasks import get_task, load_task_dataset

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model, args.gguf_file)
    template = get_task(args.task)
    texts = {
        "python_docs": "python_docs",
        "self": "self",
        "task": [template.format_prompt(ex) for ex in load_task_dataset(args.task, "train", max_examples=2000)],
    }
    masks, rows = {}, []
    for size in args.sizes:
        n, length = (int(x) for x in size.lower().split("x"))
        for source in args.sources:
            config = SparseMaskConfig(density=args.density, calibration_num_sequences=n, calibration_seq_len=length)
            start = time.perf_counter()
            mask = compute_mask(model, config, texts[source], tokenizer)
            seconds = time.perf_counter() - start
            masks[(source, size)] = selected_set(mask)
            rows.append({"source": source, "size": size, "seconds": round(seconds, 1), "k": mask.num_selected,
                         "top_0.1%_mass_share": mask.statistics.get("top_0.1%_mass_share"),
                         "concentration_ratio": mask.statistics.get("concentration_ratio")})
            print(rows[-1], flush=True)

    if args.reference_mask:
        from meerkat_hf import SparseMask

        reference_mask = SparseMask.from_pretrained(args.reference_mask)
        reference = (args.reference_mask, f"{reference_mask.config.calibration_source}, "
                     f"{reference_mask.config.calibration_num_sequences}x{reference_mask.config.calibration_seq_len}")
        ref = selected_set(reference_mask)
    else:
        reference = ("self", args.sizes[-1]) if ("self", args.sizes[-1]) in masks else next(iter(masks))
        ref = masks[reference]
    for row in rows:
        row["overlap_with_reference"] = round(len(masks[(row["source"], row["size"])] & ref) / len(ref), 4)
    keys = list(masks)
    pairwise = {f"{a[0]}@{a[1]} vs {b[0]}@{b[1]}": round(len(masks[a] & masks[b]) / len(masks[a]), 4)
                for i, a in enumerate(keys) for b in keys[i + 1:]}

    print(f"\nreference: {reference[0]} ({reference[1]})\n")
    print("| source | sequences x tokens | time | overlap with reference | top-0.1% grad-mass share |")
    print("|---|---|---|---|---|")
    for row in rows:
        share = row["top_0.1%_mass_share"]
        print(f"| {row['source']} | {row['size']} | {row['seconds']:.0f} s | {100 * row['overlap_with_reference']:.1f}% | "
              f"{'n/a' if share is None else f'{100 * share:.1f}%'} |")
    print("\npairwise overlap |A ∩ B| / k:")
    for name, value in pairwise.items():
        print(f"  {name}: {100 * value:.1f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"reference": list(reference), "rows": rows, "pairwise": pairwise}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
