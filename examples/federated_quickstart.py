"""Federated Meerkat from Python, fully offline.

    python examples/federated_quickstart.py                      # the embedded default: SmolLM2-135M on tweets (~5 min, CPU)
    python examples/federated_quickstart.py --tiny               # tiny random Llama + toy data: the plumbing in ~10 s
    python examples/federated_quickstart.py --algorithm full-fedzo --rounds 4
    python examples/federated_quickstart.py --model HuggingFaceTB/SmolLM2-360M-Instruct --task sst2   # online

The default run is the package's default federation (`meerkat_hf/federated/default.yaml`, the
same job as `meerkat-hf federate`); `--model`/`--task`/`--algorithm`/`--rounds`/... override it.
With `--tiny` a 2-layer Llama and a BPE tokenizer are built from configs and clients hold a toy
two-class set, so the numbers only show the plumbing: bytes per round, GradIP, replay checks.
Results land in `--output-dir`: metrics.jsonl, plots/*.png, checkpoints/, final/ (with a card).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a Hub id or local dir instead of the embedded SmolLM2-135M")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny random model + toy data (seconds; plumbing only)")
    p.add_argument("--task", default=None, help="tasks-module name (default: tweets_binary)")
    p.add_argument("--algorithm", default=None, help="meerkat, meerkat-vp, full-fedzo, lora-fedzo, ...")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--output-dir", default="runs/quickstart")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import yaml

    from meerkat_hf.federated import FederationConfig, run_federation
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG
    from meerkat_hf.federated.reporting import format_report

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        # the library's test utilities: a 2-layer Llama + BPE tokenizer saved like a Hub checkpoint, toy rows as CSV
        from meerkat_hf.testing import make_model_dir, toy_rows, write_csv

        files = {"train": write_csv(out / "train.csv", toy_rows(160, 0)), "test": write_csv(out / "test.csv", toy_rows(48, 1))}
        cfg = {
            "model": {"model_name_or_path": make_model_dir(out)},
            "mask": {"method": "sensitivity", "density": 0.02, "calibration": "task",
                     "calibration_num_sequences": 8, "calibration_seq_len": 32},
            "task": {"name": "toy", "prompt": "{text}\nSentiment:", "verbalizer": [" bad", " good"], "data_files": files},
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_single_label_clients": 1},
            "algorithm": "meerkat-vp", "num_clients": 5, "rounds": 5, "local_steps": 5, "learning_rate": 1e-2, "batch_size": 8,
            "max_length": 48, "eval_every": 1, "eval_examples": 48, "device": "cpu", "torch_threads": 1, "seed": 0,
            "vp": {"min_steps": 2},
        }
    else:
        cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
        if args.model:
            cfg["model"] = {"model_name_or_path": args.model, "gguf_file": args.gguf_file}
        if args.task:
            cfg["task"] = {**cfg.get("task", {}), "name": args.task}
    for key, value in (("algorithm", args.algorithm), ("rounds", args.rounds), ("num_clients", args.clients),
                       ("local_steps", args.local_steps), ("learning_rate", args.lr)):
        if value is not None:
            cfg[key] = value
    cfg["output_dir"] = str(out / cfg.get("algorithm", "meerkat"))
    result = run_federation(FederationConfig.from_dict(cfg))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
