"""`python -m meerkat_hf.federated --config FILE.yaml` (also under `accelerate launch`).

With `accelerate launch --num_processes N -m meerkat_hf.federated --config FILE.yaml` the
round's clients are split across the N ranks; every rank replays the same aggregate.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter

from .federation_config import DEFAULT_CONFIG, ConfigError, FederationConfig
from .driver import run_federation
from .reporting import format_report
from .run_dir import check_output_dir, lock_output_dir, move_aside, unlock_output_dir
from .runtime import make_runtime


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meerkat_hf.federated", description=__doc__)
    add_federate_arguments(p)
    return p


def add_federate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="federation YAML file (default: the embedded default job, "
                        "SmolLM2-135M-Instruct on offline tweet sentiment, ~5 minutes on 2 CPU cores)")
    p.add_argument("--model", default=None,
                   help="any Hub id or local directory instead of the config's model (GGUF: add --gguf-file)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="push the trained sparse delta (mask + values + model card) to this Hub repo at the end")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rounds=3 --set mask.density=0.01 (repeatable)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir already holds a run: move it aside to <dir>.old-<timestamp> and start afresh "
                        "(without --resume or --overwrite an existing run is an error; nothing is deleted)")
    p.add_argument("--summary-json", default=None, help="also write the final summary to this file")


def all_rejected(rows: list[dict]) -> str | None:
    """Why a finished run learned nothing because the server refused every uplink (None if any was used)."""
    if not rows or any(row.get("accepted") for row in rows):
        return None
    reasons = Counter(rej.get("reason", "?") for row in rows for rej in row.get("rejected", []))
    if not reasons:
        return None
    listed = ", ".join(f"{reason} x{n}" for reason, n in reasons.most_common())
    return (f"the server rejected every uplink of the run ({sum(reasons.values())}: {listed}), so the model is the "
            "base model; see 'rejected' in metrics.jsonl and the validation.* bounds")


def check_device(device: str) -> None:
    """A CUDA device this torch cannot use: one line before anything loads (torch says it with an AssertionError)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device={device} but torch {torch.__version__} sees no CUDA device "
                          f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}): use device=cpu or auto")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def federate(args) -> int:
    overrides = list(args.overrides or [])
    if args.model:
        overrides += [f"model.model_name_or_path={args.model}", f"model.gguf_file={args.gguf_file or 'null'}"]
    elif args.gguf_file:
        overrides.append(f"model.gguf_file={args.gguf_file}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append("resume=true")
    config = FederationConfig.from_yaml(args.config or DEFAULT_CONFIG, overrides)
    config.check_files()  # a missing data file: one line now, not after the model has loaded
    check_device(config.device)
    runtime = make_runtime(config.device)
    if not runtime.is_main:  # one copy of the logs is enough
        logging.getLogger().setLevel(logging.WARNING)
    # Never lose a run: one run per folder (the main rank holds its lock for the whole run), and every rank
    # checks before the main one moves anything.
    if runtime.is_main:
        lock_output_dir(config.output_dir)
    try:
        return _federate_locked(args, config, runtime)
    finally:
        if runtime.is_main:
            unlock_output_dir(config.output_dir)


def _federate_locked(args, config, runtime) -> int:
    found = check_output_dir(config.output_dir, resume=config.resume, overwrite=getattr(args, "overwrite", False))
    runtime.barrier()
    if found and getattr(args, "overwrite", False):
        if runtime.is_main:
            aside = move_aside(config.output_dir)
            print(f"moved the previous run in {config.output_dir} to {aside}")
        runtime.barrier()
    result = run_federation(config, runtime=runtime)
    summary = {
        "algorithm": config.algorithm, "rounds": config.rounds, "final_eval": result.final_eval,
        "state_digest": result.state_digest, "k": result.k, "num_params": result.num_params,
        "limited_clients": result.limited_clients, "total_uplink_bytes": result.total_uplink_bytes,
        "total_downlink_bytes": result.total_downlink_bytes, "total_fedavg_full_bytes": result.total_fedavg_full_bytes,
        "output_dir": str(result.output_dir), "num_processes": runtime.num_processes,
    }
    if runtime.is_main:
        summary["initial_eval"] = result.initial_eval
        key = "balanced_accuracy"
        for side, ev in (("before", result.initial_eval), ("after", result.final_eval)):
            if ev.get(key) is not None:
                summary[f"{key}_{side}"] = {"value": ev[key], "ci95": [ev.get(f"{key}_ci_low"), ev.get(f"{key}_ci_high")]}
        if result.gain:
            summary[f"{key}_gain"] = {"value": result.gain["gain"], "ci95": result.gain["gain_ci"],
                                      "excludes_zero": result.gain["excludes_zero"], "n": result.gain["n"],
                                      "method": result.gain["method"]}
            summary["eval_examples"] = result.gain["n"]
            auc = result.gain.get("auc")
            if auc:
                summary["auc_before"] = {"value": auc["before"], "ci95": auc["before_ci"]}
                summary["auc_after"] = {"value": auc["after"], "ci95": auc["after_ci"]}
                summary["auc_gain"] = {"value": auc["gain"], "ci95": auc["gain_ci"], "excludes_zero": auc["excludes_zero"],
                                       "n": result.gain["n"], "method": result.gain["method"]}
        print(format_report(result))
        failure = all_rejected(result.metrics)
        if failure is not None:  # the run finished, but nothing any client sent was used: not a success
            if args.summary_json:
                with open(args.summary_json, "w") as fh:
                    json.dump({**summary, "error": failure}, fh, indent=2)
            print(f"meerkat-hf: error: {failure}", file=sys.stderr)
            return 1
        if args.push_to_hub:
            summary["pushed"] = result.model.push_to_hub(args.push_to_hub, training_summary=result.training_summary)
            print(f"pushed the sparse delta to {summary['pushed']}")
        if args.summary_json:
            with open(args.summary_json, "w") as fh:
                json.dump(summary, fh, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return federate(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"{build_parser().prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
