"""The mask publisher's job: one backprop pass over generic text, then share the mask on the Hub.

    python examples/compute_and_push_mask.py --out smollm2-mask                  # embedded SmolLM2, offline
    python examples/compute_and_push_mask.py --out m --repo-id my-org/smollm2-meerkat-mask   # + push (needs a token)
    python examples/compute_and_push_mask.py --model Qwen/Qwen2.5-0.5B --calibration corpus.jsonl --out qwen-mask

The mask (`mask_config.json` + `mask.safetensors` + a rendered model card) holds the selected
flat indices per parameter and the masked pre-training gradient g_p that Meerkat-VP needs.
Clients then load it with `SparseMask.from_pretrained("my-org/smollm2-meerkat-mask")`.
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="Hub id, local directory, or 'smollm2' (embedded)")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--calibration", default="python_docs",
                        help="python_docs (offline stdlib docstrings), self (text sampled from the model), "
                             "or a .txt/.jsonl file or directory")
    parser.add_argument("--density", type=float, default=1e-5)  # the study's recipe (research/RESULTS.md)
    parser.add_argument("--num-sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", required=True, help="where to save the mask")
    parser.add_argument("--repo-id", default=None, help="push the mask to this Hub repo")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from meerkat_hf import SparseMask, SparseMaskConfig, compute_mask
    from meerkat_hf.cli import format_mask_info
    from meerkat_hf.hub.loading import load_model_and_tokenizer, model_display_name

    model, tokenizer = load_model_and_tokenizer(args.model, args.gguf_file)
    config = SparseMaskConfig(
        density=args.density, method="sensitivity", calibration_num_sequences=args.num_sequences,
        calibration_seq_len=args.seq_len, base_model_name_or_path=model_display_name(args.model),
    )
    mask = compute_mask(model, config, args.calibration, tokenizer)
    mask.save_pretrained(args.out, repo_id=args.repo_id)
    print(format_mask_info(mask))
    print(f"saved to {args.out}")
    if args.repo_id:
        url = mask.push_to_hub(args.repo_id, private=args.private)
        print(f"pushed to {url}")
        # What every client does next: the same mask, bit for bit, from the Hub.
        assert SparseMask.from_pretrained(args.repo_id).checksum == mask.checksum
    return mask


if __name__ == "__main__":
    main()
