"""Time, peak memory and statistics of `compute_mask` on a real model (default: embedded SmolLM2-135M).

    python benchmarks/mask_benchmark.py --calibration self --num-sequences 64 --seq-len 256

Peak memory is the process's VmHWM (peak RSS) read from /proc, before and after the mask pass.
`--include-all` drops the default exclusions (embeddings, lm_head) to measure where an
unrestricted top-k would go.
"""

from __future__ import annotations

import argparse
import json
import time


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--calibration", default="self", help="'self', 'python_docs', or a .txt/.jsonl path")
    ap.add_argument("--num-sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--include-all", action="store_true")
    ap.add_argument("--out", default=None, help="save the mask here")
    args = ap.parse_args()

    from meerkat_hf import SparseMaskConfig, compute_mask
    from meerkat_hf.cli import format_mask_info
    from meerkat_hf.hub.loading import load_model_and_tokenizer, model_display_name

    model, tok = load_model_and_tokenizer(args.model, args.gguf_file)
    loaded_mib = vm_hwm_mib()
    cal = "python_docs" if args.calibration == "python-docs" else args.calibration  # older spelling kept
    cfg = SparseMaskConfig(
        density=args.density, calibration_num_sequences=args.num_sequences, calibration_seq_len=args.seq_len,
        base_model_name_or_path=model_display_name(args.model),
        **({"exclude_patterns": []} if args.include_all else {}),
    )
    t0 = time.perf_counter()
    mask = compute_mask(model, cfg, cal, tok)
    seconds = time.perf_counter() - t0
    peak = vm_hwm_mib()
    print(format_mask_info(mask))
    summary = {
        "model": cfg.base_model_name_or_path, "calibration": cfg.calibration_source,
        "sequences_x_tokens": f"{args.num_sequences}x{args.seq_len}", "seconds": round(seconds, 1),
        "peak_rss_mib_after_load": round(loaded_mib), "peak_rss_mib_mask": round(peak),
        "k": mask.num_selected, "concentration_ratio": mask.statistics.get("concentration_ratio"),
        "top_0.1%_mass_share": mask.statistics.get("top_0.1%_mass_share"),
        "mass_share": mask.statistics.get("mass_share"),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        mask.save_pretrained(args.out)


if __name__ == "__main__":
    main()
