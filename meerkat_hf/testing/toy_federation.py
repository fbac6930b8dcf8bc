"""A toy federation on disk: a tiny model folder, a two-class toy sentiment task, a small config.

What the federated tests, `research/` probes and examples build on: each piece is what a real run
reads (a saved model folder, CSV task files, a config mapping), only tiny.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from .tiny import build_tiny_tokenizer, tiny_model

__all__ = ["POSITIVE", "NEGATIVE", "NEUTRAL", "toy_rows", "write_csv", "make_model_dir", "make_task_files",
           "base_config"]

POSITIVE = "great good wonderful love happy fun win".split()
NEGATIVE = "terrible bad awful hate sad angry lose".split()
NEUTRAL = "the movie film plot actor story news city car road school book".split()


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 5))]
        words += [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + ".", "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def make_model_dir(root: Path, family: str = "llama") -> str:
    """A tiny random model + tokenizer saved like a Hub checkpoint (loadable by any process)."""
    out = root / f"tiny-{family}"
    if not (out / "config.json").exists():
        model = tiny_model(family)
        model.save_pretrained(out)
        build_tiny_tokenizer().save_pretrained(out)
    return str(out)


def make_task_files(root: Path, n_train: int = 96, n_test: int = 32) -> dict:
    return {"train": write_csv(root / "train.csv", toy_rows(n_train, 0)),
            "test": write_csv(root / "test.csv", toy_rows(n_test, 1))}


def base_config(root: Path, model_dir: str, data_files: dict, **overrides) -> dict:
    cfg = {
        "model": {"model_name_or_path": model_dir},
        "mask": {"method": "sensitivity", "density": 0.02, "calibration": "task",
                 "calibration_num_sequences": 4, "calibration_seq_len": 32},
        "task": {"name": "toy", "prompt": "{text}\nSentiment:", "verbalizer": [" bad", " good"],
                 "data_files": data_files},
        "partition": {"scheme": "dirichlet", "alpha": 0.5},
        "num_clients": 4,
        "rounds": 3,
        "local_steps": 3,
        "batch_size": 4,
        "max_length": 32,
        "eval_every": 1,
        "eval_examples": 32,
        "learning_rate": 1e-3,
        "zo_eps": 1e-3,
        "seed": 0,
        "output_dir": str(root / "run"),
        "torch_threads": 1,
        "progress": False,
        "device": "cpu",
        "plots": False,
        "save_final": False,
    }
    from meerkat_hf.federated.federation_config import DEPRECATED_KEYS

    for key, value in overrides.items():
        key = DEPRECATED_KEYS.get(key, key)  # tests say lr=/eps=/q= for short; the config's names are the Trainer's
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
