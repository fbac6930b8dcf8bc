"""A plain Hugging Face fine-tuning script with `Trainer` swapped for `MeerkatZOTrainer`.

    python examples/single_site_trainer.py                       # SmolLM2-135M (embedded GGUF), offline tweets
    python examples/single_site_trainer.py --model HuggingFaceTB/SmolLM2-360M-Instruct --task sst2   # online
    python examples/single_site_trainer.py --mask my-org/smollm2-meerkat-mask   # a published mask

Everything is the usual recipe (load, tokenize, collate, TrainingArguments, train, evaluate,
save); the Meerkat lines are marked `# Meerkat`. Training runs forward passes only: no
backward, no `.grad`, inference-level memory. The result is a sparse delta of a few hundred
KB (`--output-dir/final`), loadable with `MeerkatModel.from_pretrained(base, dir)`.
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="Hub id, local directory, or 'smollm2' (embedded)")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--task", default="tweets_binary", help="tweets_binary, tweets, sst2, ag_news, ...")
    parser.add_argument("--mask", default=None, help="saved mask directory or Hub id (default: compute one)")
    parser.add_argument("--density", type=float, default=1e-5)  # the study's recipe (research/RESULTS.md)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--calibration-seq-len", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--zo-eps", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--output-dir", default="runs/single_site")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from meerkat_hf import MeerkatZOArguments, MeerkatZOTrainer, SparseMask, SparseMaskConfig  # Meerkat
    from meerkat_hf import get_or_compute_mask  # Meerkat
    from meerkat_hf import CandidateAccuracy, get_meerkat_model  # Meerkat
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.tasks import ClassificationCollator, candidate_token_ids, encode_classification, load_task_dataset

    model, tokenizer = load_model_and_tokenizer(args.model, args.gguf_file)
    train = encode_classification(tokenizer, args.task, load_task_dataset(
        args.task, "train", max_examples=args.train_examples), args.max_length)
    evaluation = encode_classification(tokenizer, args.task, load_task_dataset(
        args.task, "eval", max_examples=args.eval_examples), args.max_length)

    # Meerkat: a static sparse mask (published, or one backprop pass over generic offline text)
    if args.mask:
        mask = SparseMask.from_pretrained(args.mask)
    else:
        config = SparseMaskConfig(density=args.density, calibration_num_sequences=args.calibration_sequences,
                                  calibration_seq_len=args.calibration_seq_len)
        mask = get_or_compute_mask(model, config, "python_docs", tokenizer)  # computed once, then cached
    model = get_meerkat_model(model, mask)  # Meerkat: in place, like peft.get_peft_model
    model.print_trainable_parameters()

    candidates = candidate_token_ids(tokenizer, args.task)
    accuracy = CandidateAccuracy(candidates)
    training_args = MeerkatZOArguments(  # Meerkat: TrainingArguments + zo_* fields
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32, logging_steps=10,
        save_strategy="no", report_to="none", seed=0, zo_eps=args.zo_eps, zo_loss="candidates",
        dataloader_pin_memory=False,
    )
    trainer = MeerkatZOTrainer(  # Meerkat: was `Trainer(...)`
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
        data_collator=ClassificationCollator(tokenizer), candidate_ids=candidates,
        compute_metrics=accuracy, preprocess_logits_for_metrics=accuracy.preprocess_logits_for_metrics,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    model.save_pretrained(f"{args.output_dir}/final", training_summary={
        "task": args.task, "steps": args.max_steps, "accuracy_before": before["eval_accuracy"],
        "accuracy_after": after["eval_accuracy"]})
    print(f"accuracy: {before['eval_accuracy']:.4f} (zero-shot) -> {after['eval_accuracy']:.4f} "
          f"after {args.max_steps} ZO steps; sparse delta saved to {args.output_dir}/final")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
