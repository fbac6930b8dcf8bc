"""ZO steps per second with bf16 forwards against fp32, measured alternately in one process.

Two paths a user runs, each with the same mask, batch and seeds:

* `MeerkatZOTrainer.training_step` + `optimizer.step()` with `bf16=True` against the same without;
* the federated client's local step (`FederatedClient.train_zo`, what `model.dtype: bfloat16` runs).

The bf16 and fp32 models are two copies of the base in memory, stepped in turn (fp32, bf16, fp32, ...),
so a busy machine slows both alike; the ratio of the medians is what the machine's bf16 path is worth.
On CPUs without AMX-BF16 / AVX512-BF16 it is < 1 (bf16 is emulated) and the library warns.

    python benchmarks/bf16_throughput.py --steps 6 --batch-size 8 --seq-len 64 [--model smollm2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def _mask(model, tok, density: float):
    from meerkat_hf import SparseMaskConfig, compute_mask

    text = ["Federated learning trains a shared model across many clients without moving their data."] * 4
    return compute_mask(model, SparseMaskConfig(density=density, calibration_num_sequences=4, calibration_seq_len=32),
                        calibration=text, tokenizer=tok, progress=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--density", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from meerkat_hf import MeerkatZOArguments, MeerkatZOTrainer, get_meerkat_model
    from meerkat_hf.federated import FederatedClient, LRSchedule, ProtocolParams
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.modeling.precision import bf16_matmul_speedup

    base, tok = load_model_and_tokenizer(args.model)
    mask = _mask(base, tok, args.density)
    models = {"fp32": get_meerkat_model(base, mask), "bf16": get_meerkat_model(load_model_and_tokenizer(args.model)[0], mask)}
    models["bf16"].set_forward_precision("bf16-mixed")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, min(20000, base.config.vocab_size), (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mm in models.items():
            targs = MeerkatZOArguments(os.path.join(tmp, name), bf16=name == "bf16", use_cpu=True, report_to="none",
                                       max_steps=args.steps, disable_tqdm=True)
            trainer = MeerkatZOTrainer(model=mm, args=targs)
            trainer.create_optimizer()
            trainers[name] = trainer
        params = ProtocolParams(1, LRSchedule(1e-4))
        rows = [list(map(int, r)) for r in ids]

        def collate(features):
            t = torch.tensor(features)
            return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t}

        clients = {name: FederatedClient(0, rows, collate, batch_size=args.batch_size, data_seed=0) for name in models}
        times: dict[str, list[float]] = {f"{path}:{name}": [] for path in ("trainer", "client") for name in models}
        for step in range(args.steps + 1):  # the first round of each is a warm-up
            for name in ("fp32", "bf16"):
                trainer = trainers[name]
                start = time.perf_counter()
                trainer.training_step(models[name], dict(batch))
                trainer.zo_optimizer.step()
                if step:
                    times[f"trainer:{name}"].append(time.perf_counter() - start)
                start = time.perf_counter()
                clients[name].train_zo(models[name], models[name].values.clone(), 0, 1, params, mask.checksum, 1e-3)
                if step:
                    times[f"client:{name}"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "batch": [args.batch_size, args.seq_len], "threads": torch.get_num_threads(),
              "k": mask.num_selected, "steps": args.steps, "median_s_per_step": med,
              "trainer_speedup_bf16": med["trainer:fp32"] / med["trainer:bf16"],
              "client_speedup_bf16": med["client:fp32"] / med["client:bf16"],
              "bf16_matmul_speedup": bf16_matmul_speedup("cpu"),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average": os.getloadavg()}
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len}, {result['threads']} threads, k = {result['k']}, "
          f"CPU capability {result['cpu_capability']}, load average {result['load_average'][0]:.2f}")
    print("| path | fp32 s/step | bf16 s/step | bf16 speedup |\n|---|---|---|---|")
    for path in ("trainer", "client"):
        print(f"| {path} | {med[f'{path}:fp32']:.3f} | {med[f'{path}:bf16']:.3f} | "
              f"{med[f'{path}:fp32'] / med[f'{path}:bf16']:.2f}x |")
    print(f"bf16 matmul alone (512x576 @ 576x1536): {result['bf16_matmul_speedup']:.2f}x fp32")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
