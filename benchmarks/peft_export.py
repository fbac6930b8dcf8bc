"""SHiRA export of SmolLM2 deltas: adapter size against the Meerkat delta, and plain PEFT's outputs.

    python benchmarks/peft_export.py [--mask-dir MASK] [--out DIR]

For the default density-1e-5 mask (a saved mask folder, `--mask-dir`) and a random density-1e-3 one, a
random delta is exported with `export_peft(force=True)`; a subprocess that never imports meerkat_hf loads
the embedded GGUF base with transformers and the adapter with `PeftModel.from_pretrained`, and compares
its logits with `merge_and_unload()`'s (one torch thread on both sides). One JSON line per mask.
"""
import argparse
import json, os, subprocess, sys, textwrap

import torch
from pathlib import Path
torch.set_num_threads(1)
from meerkat_hf import SparseMask, SparseMaskConfig, compute_mask, get_meerkat_model
from meerkat_hf.hub.loading import load_model_and_tokenizer, embedded_model_dir
ap = argparse.ArgumentParser()
ap.add_argument("--mask-dir", default="runs/study/masks/docs64x256-1e-05")
ap.add_argument("--out", default="runs/peft_export")
args = ap.parse_args()
out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
model, tok = load_model_and_tokenizer("smollm2")
ids = tok(["the movie was great, I loved it"], return_tensors="pt")["input_ids"]
masks = {"default-1e-5": SparseMask.from_pretrained(args.mask_dir),
         "random-1e-3": compute_mask(model, SparseMaskConfig(method="random", density=1e-3), progress=False)}
for name, mask in masks.items():
    mm = get_meerkat_model(model, mask)
    mm.set_values(mm.base_values + 1e-3 * torch.randn(mm.num_selected, generator=torch.Generator().manual_seed(0)))
    plan = mm.export_peft(out / name, force=True)
    size = sum(f.stat().st_size for f in (out / name).iterdir())
    mm.save_pretrained(out / f"{name}-delta", model_card=False)
    delta = sum(f.stat().st_size for f in (out / f"{name}-delta").iterdir())
    ref = mm.merge_and_unload()(input_ids=ids).logits
    torch.save(ref, out / f"{name}-ref.pt")
    d = embedded_model_dir()
    gguf = [f for f in os.listdir(d) if f.endswith(".gguf")][0]
    script = textwrap.dedent(f'''
        import sys, torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({d!r}, gguf_file={gguf!r}, dtype=torch.float32)
        pm = PeftModel.from_pretrained(base, {str(out / name)!r})
        got = pm(input_ids=torch.tensor({ids.tolist()})).logits
        ref = torch.load({str(out / f"{name}-ref.pt")!r})
        print("EQUAL", torch.equal(got, ref), float((got - ref).abs().max()), "meerkat" in str(sys.modules.keys()))
        ''')
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    eq = [l for l in res.stdout.splitlines() if l.startswith("EQUAL")]
    print(json.dumps({"mask": name, "k": mask.num_selected, "describe": plan.describe(), "adapter_dir_bytes": size,
                      "meerkat_delta_dir_bytes": delta, "plain_peft_load": eq[0] if eq else res.stderr[-300:]}))
    mm.unload()
    del mm
