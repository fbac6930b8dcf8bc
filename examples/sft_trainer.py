"""Instruction tuning with TRL's `SFTTrainer` data pipeline, trained by zeroth-order Meerkat.

    pip install 'meerkat-hf[trl]'
    python examples/sft_trainer.py                       # SmolLM2-135M (embedded GGUF), a built-in toy chat set
    python examples/sft_trainer.py --model HuggingFaceTB/SmolLM2-360M-Instruct --dataset trl-lib/Capybara  # online

The usual TRL script (a prompt/completion dataset, `SFTConfig`, `SFTTrainer`) with two swaps marked
`# Meerkat`: the model is wrapped with a static sparse mask, and `SFTTrainer`/`SFTConfig` become
`MeerkatSFTTrainer`/`MeerkatSFTConfig`. The loss is TRL's per-token loss on the completion tokens;
training runs forward passes only (no backward, no `.grad`), and what it saves is a sparse delta.
"""

from __future__ import annotations

import argparse
import logging

# A stand-in for a chat dataset that needs no download: short instructions and the answers to learn.
TOY_CHAT = [
    ("What is the capital of France?", "Paris."),
    ("Name a primary colour.", "Red."),
    ("What is two plus two?", "Four."),
    ("Which animal says moo?", "A cow."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."),
    ("What colour is the sky on a clear day?", "Blue."),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="Hub id, local directory, or 'smollm2' (embedded)")
    parser.add_argument("--dataset", default=None, help="a Hub dataset with prompt/completion or messages (default: toy)")
    parser.add_argument("--density", type=float, default=1e-5)  # the study's recipe (research/RESULTS.md)
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--num-perturbations", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output-dir", default="runs/sft")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from datasets import Dataset, load_dataset

    from meerkat_hf import SparseMaskConfig, get_meerkat_model, get_or_compute_mask  # Meerkat
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf import MeerkatSFTConfig, MeerkatSFTTrainer  # Meerkat

    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.dataset:
        train = load_dataset(args.dataset, split="train")
    elif tokenizer.chat_template:  # conversational prompt/completion: TRL applies the chat template
        train = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                                    "completion": [{"role": "assistant", "content": a}]} for q, a in TOY_CHAT * 4])
    else:  # a base model without a chat template: plain prompt/completion text
        train = Dataset.from_list([{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a in TOY_CHAT * 4])
    mask_config = SparseMaskConfig(density=args.density, calibration_num_sequences=args.calibration_sequences,
                                   calibration_seq_len=64)
    mask = get_or_compute_mask(model, mask_config, "python_docs", tokenizer)  # Meerkat: computed once, then cached
    model = get_meerkat_model(model, mask)  # Meerkat
    config = MeerkatSFTConfig(  # Meerkat (SFTConfig + the ZO settings)
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", zo_num_perturbations=args.num_perturbations,
        max_length=args.max_length, logging_steps=max(1, args.max_steps // 5), save_strategy="no", report_to="none",
    )
    trainer = MeerkatSFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=train,  # Meerkat
                                processing_class=tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(f"{args.output_dir}/final")
    print(f"completion loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} after {args.max_steps} ZO steps; "
          f"sparse delta saved to {args.output_dir}/final")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
