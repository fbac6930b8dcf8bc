"""Operators per ZO step on the hot path, counted with torch.profiler: what a GPU would launch.

A CPU cannot show GPU idle time, but it can count what the host issues per step: every aten operator
on the write path is a kernel launch on CUDA (a cast, an index_copy_), every host-device copy is a
copy. This counts them for one `SparseView.write` and one two-point estimate (`zo.projected_gradient`:
three writes and two forwards), per forward precision, on SmolLM2 or a config-built Llama.

    python benchmarks/step_ops.py                       # SmolLM2-135M (embedded), density 1e-3
    python benchmarks/step_ops.py --model tiny-llama-12 --density 1e-3   # no weights needed
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

_CASTS = ("aten::_to_copy",)
_WRITES = ("aten::index_copy_", "aten::copy_")


def _model(name: str):
    if name == "tiny-llama-12":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2))
    from meerkat_hf.hub.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(name)[0]


def _count(fn) -> Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16-mixed"])
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model, zo

    model = _model(args.model)
    mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(method="random", density=args.density),
                                               progress=False))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    rows = []
    for precision in args.precisions:
        mm.set_forward_precision(precision)
        values = mm.values + 1e-3
        mm.write(values)
        write = _count(lambda: mm.write(values))
        z = zo.gaussian_direction(0, mm.num_selected)
        forward = _count(lambda: mm(input_ids=ids))
        step = _count(lambda: zo.projected_gradient(mm, lambda: mm(input_ids=ids, labels=ids).loss, z, 1e-3))
        row = {"model": args.model, "precision": precision, "masked_tensors": len(mm.sparse.slices),
               "k": mm.num_selected, "write_ops": sum(write.values()), "write_casts": sum(write[n] for n in _CASTS),
               "write_copies": sum(write[n] for n in _WRITES),
               "step_ops_beyond_forwards": sum(step.values()) - 2 * sum(forward.values())}
        rows.append(row)
        print(json.dumps(row))
    mm.set_forward_precision("fp32")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
