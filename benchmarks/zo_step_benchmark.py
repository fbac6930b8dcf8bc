"""What does a Meerkat ZO step cost? Time relative to two forward passes, memory relative to inference.

For each model this prints, on the same batch:

* the median wall time of two forward passes (what SPSA needs at least);
* the median Meerkat ZO step (`MeerkatZOTrainer.training_step` + `optimizer.step()`, sparse mask at
  `--density`) divided by it -- the overhead of the sparse path, target <= 1.10;
* the same ratio for full-parameter ZO (MeZO-style, `baselines.full_mask`) and for one AdamW
  first-order step (forward + backward + update) for reference;
* peak memory of each phase relative to inference (two forward passes only).

Every (model, phase) runs in its own subprocess, and the peak is reset after loading (`/proc/self/
clear_refs`, CPU: peak RSS `VmHWM`; CUDA: `max_memory_allocated`), so one phase's peak never hides
another's. The mask (sensitivity on a little text for SmolLM2, random for the random-init config
model) is computed once in its own subprocess and loaded by the ZO phase. Timings interleave the
two-forward baseline with the measured step, so a busy machine slows both alike.

    python benchmarks/zo_step_benchmark.py --batch-size 4 --seq-len 128 --steps 10 --device cpu \\
        --models llama-100m smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODELS = ("llama-100m", "smollm2-135m")
PHASES = ("inference", "meerkat", "full_zo", "adamw")

CALIBRATION_TEXT = [
    "Federated learning trains a shared model across many clients without moving their data.",
    "Zeroth-order optimisation estimates a directional derivative from two loss evaluations.",
    "A sparse mask chooses the few parameters that a client is allowed to change.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Hospitals and schools often have only inference-class hardware and private records.",
    "Language models predict the next token from the tokens that came before it.",
    "The server replays every client's path from seeds and scalars, bit for bit.",
    "Rain is expected tomorrow in the city, with sunshine returning over the weekend.",
]


# ----------------------------------------------------------------------------- the worker
def _build_model(name: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "llama-100m":
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        )
        model, tokenizer = AutoModelForCausalLM.from_config(config, dtype=torch.float32), None
    elif name == "smollm2-135m":
        from meerkat_hf.hub.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return model.eval().to(device), tokenizer


def _batch(model, batch_size: int, seq_len: int, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark (Linux >= 4.0)
    except OSError:
        pass


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _compute_mask(args) -> None:
    """Subprocess: the Meerkat mask, saved for the ZO phase (its backward pass stays out of the peaks)."""
    from meerkat_hf import SparseMaskConfig, compute_mask

    model, tokenizer = _build_model(args.model, args.device)
    if tokenizer is None:  # random-init config model: a random mask
        config = SparseMaskConfig(method="random", density=args.density)
        mask = compute_mask(model, config, progress=False)
    else:
        config = SparseMaskConfig(method="sensitivity", density=args.density, calibration_num_sequences=8,
                                  calibration_seq_len=min(128, args.seq_len))
        mask = compute_mask(model, config, calibration=CALIBRATION_TEXT * 8, tokenizer=tokenizer, progress=False)
    mask.save_pretrained(args.mask_dir, model_card=False)
    print("RESULT " + json.dumps({"k": mask.num_selected, "num_params": sum(p.numel() for p in model.parameters())}))


def _worker(args) -> None:
    import gc

    import torch
    from transformers.utils import logging as hf_logging

    import meerkat_hf.trainer  # noqa: F401  every phase imports the same libraries, so peaks compare models

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = _build_model(args.model, args.device)
    batch = _batch(model, args.batch_size, args.seq_len, args.device)

    def two_forwards():
        with torch.no_grad():
            model(**batch).loss.item()
            model(**batch).loss.item()

    extra: dict = {}
    step = None
    if args.phase in ("meerkat", "full_zo"):
        from meerkat_hf import SparseMask, get_meerkat_model, zo
        from meerkat_hf.masks.baselines import full_mask
        from meerkat_hf.trainer import MeerkatZOArguments, MeerkatZOTrainer

        mask = SparseMask.from_pretrained(args.mask_dir) if args.phase == "meerkat" else full_mask(model)
        wrapped = get_meerkat_model(model, mask)
        tmp = tempfile.mkdtemp(prefix="zo_bench_")
        zo_args = MeerkatZOArguments(
            output_dir=tmp, report_to="none", disable_tqdm=True, use_cpu=not args.device.startswith("cuda"),
            per_device_train_batch_size=args.batch_size, learning_rate=1e-6, save_strategy="no",
        )
        trainer = MeerkatZOTrainer(model=wrapped, args=zo_args)
        trainer.create_optimizer()

        def step():
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.state.global_step += 1

        k = wrapped.num_selected
        extra["k"] = k
        extra["randn_ms"] = 1e3 * statistics.median(_timed(lambda: zo.gaussian_direction(1, k), "cpu") for _ in range(5))
        extra["write_ms"] = 1e3 * statistics.median(_timed(lambda: wrapped.write(wrapped.values), args.device)
                                                    for _ in range(5))
    elif args.phase == "adamw":
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
    elif args.phase != "inference":
        raise ValueError(f"unknown phase {args.phase!r}")

    for _ in range(args.warmup):
        two_forwards()
        if step is not None:
            step()
    gc.collect()
    _reset_peak(args.device)
    fwd_times, step_times = [], []
    for _ in range(args.steps):  # interleaved: contention slows both alike
        fwd_times.append(_timed(two_forwards, args.device))
        if step is not None:
            step_times.append(_timed(step, args.device))
    result = {
        "phase": args.phase,
        "two_forwards_ms": 1e3 * statistics.median(fwd_times),
        "step_ms": 1e3 * statistics.median(step_times) if step_times else None,
        "peak_bytes": _peak_bytes(args.device),
        "threads": torch.get_num_threads(),
        **extra,
    }
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------ the orchestrator
def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _ratio(phases: dict, phase: str) -> str:
    r = phases.get(phase)
    return f"{r['step_ms'] / r['two_forwards_ms']:.3f}" if r and r.get("step_ms") else "-"


def _mem(phases: dict, phase: str) -> str:
    r, base = phases.get(phase), phases.get("inference")
    return f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if r and base and base["peak_bytes"] else "-"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--density", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--json", help="also write the raw results here")
    # internal: one phase in a subprocess
    parser.add_argument("--worker", choices=("mask", "phase"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--mask-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "mask":
        return _compute_mask(args)
    if args.worker == "phase":
        return _worker(args)

    common = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--device", args.device, "--density", str(args.density),
              "--threads", str(args.threads)]
    me = [sys.executable, os.path.abspath(__file__)]
    results = {}
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="zo_bench_mask_") as mask_dir:
            t0 = time.time()
            info = _run(me + ["--worker", "mask", "--model", name, "--mask-dir", mask_dir] + common)
            print(f"[{name}] mask: k={info['k']:,} of {info['num_params']:,} parameters ({time.time() - t0:.0f}s)",
                  file=sys.stderr)
            phases = {}
            for phase in args.phases:
                t0 = time.time()
                phases[phase] = _run(me + ["--worker", "phase", "--model", name, "--phase", phase,
                                           "--mask-dir", mask_dir] + common)
                print(f"[{name}] {phase}: {phases[phase]} ({time.time() - t0:.0f}s)", file=sys.stderr)
            results[name] = {"info": info, "phases": phases}

    print(f"\nbatch {args.batch_size} x seq {args.seq_len}, device {args.device}, {args.steps} timed steps, "
          f"Meerkat density {args.density:g}; time ratios are medians, each step interleaved with its own "
          "two-forward baseline")
    header = ("| model | params | k | 2 fwd (ms) | Meerkat ZO step (ms) | Meerkat / 2 fwd | full ZO / 2 fwd "
              "| AdamW / 2 fwd | peak mem vs inference: Meerkat / full ZO / AdamW |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, res in results.items():
        ph = res["phases"]
        fwd = ph.get("meerkat", ph.get("inference", {})).get("two_forwards_ms")
        step = ph.get("meerkat", {}).get("step_ms")
        if not (fwd and step):
            print(f"| {name} | (run the inference and meerkat phases for this row) |")
            continue
        print(f"| {name} | {res['info']['num_params'] / 1e6:.0f}M | {res['info']['k']:,} | {fwd:.0f} | {step:.0f} | "
              f"{_ratio(ph, 'meerkat')} | {_ratio(ph, 'full_zo')} | {_ratio(ph, 'adamw')} | "
              f"{_mem(ph, 'meerkat')} / {_mem(ph, 'full_zo')} / {_mem(ph, 'adamw')} |")
    print("\npeak memory (GiB): " + "; ".join(
        f"{name}: " + ", ".join(f"{p} {_gib(r['peak_bytes'])}" for p, r in res["phases"].items())
        for name, res in results.items()))
    for name, res in results.items():
        m = res["phases"].get("meerkat")
        if m:
            print(f"{name} sparse-path pieces: randn(k) {m['randn_ms']:.2f} ms, one weight write {m['write_ms']:.2f} ms "
                  f"(a step draws z once and writes 4 times)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
