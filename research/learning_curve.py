"""Learning curves: balanced accuracy (95% intervals) against forward passes, single site and federated.

    python research/learning_curve.py single --name single --mask runs/study/masks/docs64x256-1e-05 \\
        --lr 1e-3 --steps 1500 --eval-every 100
    python research/learning_curve.py federated --name fed-dirichlet --mask runs/study/masks/docs64x256-1e-05 \\
        --set partition.scheme=dirichlet --set learning_rate=1e-3 --set rounds=30 --set local_steps=5
    python research/learning_curve.py test --name single     # the test split, once, at the end
    python research/learning_curve.py plot                   # runs/curves/learning_curves.png
    python research/learning_curve.py forgetting --delta runs/skew/NAME/final   # any saved delta's forgetting

`single` is `MeerkatZOTrainer` (the drop-in Trainer); `federated` is `meerkat-hf federate`'s own
driver. Both evaluate on the *validation* split (every hyperparameter choice is made there) and
append one row per evaluation to runs/curves/NAME.jsonl with the exact command; both resume from
their last checkpoint when rerun with the same command (Trainer checkpoints / the driver's
round checkpoints), so an interrupted curve loses nothing. `test` scores the final delta on the
test split and the paired bootstrap interval of its balanced-accuracy gain over zero-shot and
over prior-corrected zero-shot (offsets fitted on validation).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

TASK = "tweets_binary"


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _score_report(model, tokenizer, encoded) -> dict:
    from meerkat_hf.classification_metrics import ClassifierScores
    from meerkat_hf.tasks import candidate_scores

    scores, labels = candidate_scores(model, tokenizer, TASK, encoded, batch_size=32)
    rep = ClassifierScores(scores.numpy(), labels.numpy()).report()
    return {k: rep[k] for k in ("n", "accuracy", "accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci",
                                "macro_f1", "macro_f1_ci", "majority_rate", "predicted_rate", "auc")}


# ------------------------------------------------------------------------------------ single site
def single(args, command: str) -> None:
    from transformers import TrainerCallback

    from meerkat_hf import MeerkatZOArguments, MeerkatZOTrainer, SparseMask, get_meerkat_model
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.tasks import ClassificationCollator, candidate_token_ids, encode_classification, load_task_dataset

    out = Path(args.out)
    log_path, run_dir = out / f"{args.name}.jsonl", out / args.name
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("smollm2")
    mm = get_meerkat_model(model, SparseMask.from_pretrained(args.mask))
    train = load_task_dataset(TASK, "train")
    if args.balanced:  # equal classes by subsampling the majority: the balanced objective, no new loss
        labels = np.asarray(train["label"])
        per = np.bincount(labels).min()
        rng = np.random.default_rng(0)
        keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False)
                                       for c in range(labels.max() + 1)]))
        train = train.select(keep.tolist())
    train = encode_classification(tok, TASK, train, args.max_length)
    val = encode_classification(tok, TASK, load_task_dataset(TASK, "validation").select(range(args.eval_examples)),
                                args.max_length, include_label_word=False)

    class Curve(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                rep = _score_report(mm.base_model, tok, val)
                row = {"curve": args.name, "step": state.global_step,
                       "forward_passes": 2 * args.batch_size * state.global_step, **rep}
                _append(log_path, row)
                _log(f"{args.name} step {state.global_step}: balanced acc {rep['balanced_accuracy']:.4f} "
                     f"{rep['balanced_accuracy_ci']} auc {rep['auc']:.4f}")

    resume = None
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if ckpts:
        resume = str(ckpts[-1])
        _log(f"{args.name}: resuming from {resume}")
    else:
        log_path.write_text("")
        _append(log_path, {"curve": args.name, "step": 0, "forward_passes": 0, "command": command,
                           **_score_report(mm.base_model, tok, val)})
    targs = MeerkatZOArguments(
        output_dir=str(run_dir), max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch_size, logging_steps=args.eval_every, save_strategy="steps",
        save_steps=args.eval_every, save_total_limit=1, report_to="none", seed=args.seed, zo_eps=args.eps,
        zo_loss="candidates", dataloader_pin_memory=False, use_cpu=True, disable_tqdm=False,
    )
    trainer = MeerkatZOTrainer(model=mm, args=targs, train_dataset=train, data_collator=ClassificationCollator(tok),
                               candidate_ids=candidate_token_ids(tok, TASK), callbacks=[Curve()])
    trainer.train(resume_from_checkpoint=resume)
    mm.save_pretrained(run_dir / "final", training_summary={"task": TASK, "steps": args.steps, "lr": args.lr,
                                                           "command": command})


# -------------------------------------------------------------------------------------- federated
def federated(args, command: str) -> None:
    import yaml

    from meerkat_hf.federated import FederationConfig
    from meerkat_hf.federated.driver import run_federation
    from meerkat_hf.federated.federation_config import apply_overrides

    out = Path(args.out)
    log_path, run_dir = out / f"{args.name}.jsonl", out / args.name
    default = Path(__file__).resolve().parent.parent / "meerkat_hf" / "federated" / "default.yaml"
    raw = yaml.safe_load(default.read_text())
    raw.update({"output_dir": str(run_dir), "resume": True, "algorithm": "meerkat", "plots": False,
                "eval_examples": args.eval_examples, "max_length": args.max_length})
    raw["task"] = {**raw["task"], "eval_split": "validation", "max_train_examples": None}
    raw["mask"] = {**raw["mask"], "path": args.mask}
    raw["partition"] = {**raw["partition"], "num_single_label_clients": 0}
    cfg = FederationConfig.from_dict(apply_overrides(raw, args.set))  # the CLI's own --set parser
    result = run_federation(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = 2 * cfg.batch_size * cfg.zo_num_perturbations
    log_path.write_text("")
    init = result.initial_eval
    _append(log_path, {"curve": args.name, "round": 0, "forward_passes": 0, "command": command, **init})
    passes = 0
    for r in rows:
        passes += per_step * sum(int(r["budgets"][str(c)]) for c in r["accepted"])
        if r.get("balanced_accuracy") is not None:
            _append(log_path, {"curve": args.name, "round": r["round"], "forward_passes": passes,
                               **{k: r.get(k) for k in ("accuracy", "balanced_accuracy", "balanced_accuracy_ci_low",
                                                        "balanced_accuracy_ci_high", "macro_f1", "auc")}})
    _log(f"{args.name}: balanced acc {init.get('balanced_accuracy')} -> {result.final_eval.get('balanced_accuracy')}")


# ------------------------------------------------------------------------------------------- test
def test(args) -> None:
    from meerkat_hf import MeerkatModel, SparseMask
    from meerkat_hf.classification_metrics import ClassifierScores, fit_prior_offsets, paired_gain
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.tasks import candidate_scores, encode_classification, load_task_dataset

    out = Path(args.out)
    final = out / args.name / "final"
    model, tok = load_model_and_tokenizer("smollm2")
    zs = {s: torch.load(Path(args.study) / f"zeroshot_{s}.pt") for s in ("validation", "test")}
    offsets = fit_prior_offsets(zs["validation"]["scores"].numpy(), zs["validation"]["labels"].numpy())
    mm = MeerkatModel.from_pretrained(model, final)
    enc = encode_classification(tok, TASK, load_task_dataset(TASK, "test"), args.max_length, include_label_word=False)
    scores, labels = candidate_scores(mm.base_model, tok, TASK, enc, batch_size=32)
    assert torch.equal(labels, zs["test"]["labels"]), "test split differs from the study's zero-shot logits"
    trained = ClassifierScores(scores.numpy(), labels.numpy())
    zero = ClassifierScores(zs["test"]["scores"].numpy(), labels.numpy())
    row = {"curve": args.name, "split": "test", "trained": trained.report(), "zero_shot": zero.report(),
           "prior_corrected": zero.report(offsets),
           "gain_over_zero_shot": paired_gain(zero.predictions(), trained.predictions(), labels.numpy()),
           "gain_over_prior_corrected": paired_gain(zero.predictions(offsets), trained.predictions(), labels.numpy())}
    row["forgetting"] = forgetting(mm, tok)
    _append(out / "test_results.jsonl", row)
    f = row["forgetting"]
    _log(f"{args.name} forgetting: held-out generic perplexity {f['perplexity_before']:.3f} -> {f['perplexity_after']:.3f}; "
         f"{f['generations_changed']} of {len(f['generations'])} greedy generations changed")
    t, g, gp = row["trained"], row["gain_over_zero_shot"], row["gain_over_prior_corrected"]
    _log(f"{args.name} TEST: balanced acc {t['balanced_accuracy']:.4f} {t['balanced_accuracy_ci']} | "
         f"gain over zero-shot {g['gain']:+.4f} {g['gain_ci']} | over prior-corrected {gp['gain']:+.4f} {gp['gain_ci']}")


PROMPTS = ("The capital of France is", "Water boils at a temperature of", "The opposite of hot is",
           "A list of three fruits: apples,", "def add(a, b):\n    return")


def _generic_blocks(tok, n: int = 32, length: int = 128) -> list[torch.Tensor]:
    """Held-out generic text: numpy's docstrings (the calibration text is the standard library's)."""
    import inspect

    import numpy

    texts = []
    for _, obj in sorted(inspect.getmembers(numpy), key=lambda kv: kv[0]):
        doc = inspect.getdoc(obj) if callable(obj) else None
        if doc and len(doc) > 400 and doc not in texts:
            texts.append(doc)
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    return [ids[i * length:(i + 1) * length] for i in range(min(n, ids.numel() // length))]


@torch.no_grad()
def _perplexity(model, blocks) -> float:
    losses = [float(model(input_ids=b[None], labels=b[None], use_cache=False).loss) for b in blocks]
    return float(np.exp(np.mean(losses)))


@torch.no_grad()
def _generations(model, tok) -> list[str]:
    outs = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def forgetting_of_delta(args) -> None:
    """The forgetting probe for any saved delta (a `meerkat-hf federate` run's final/, a Trainer's save)."""
    from meerkat_hf import MeerkatModel

    mm = MeerkatModel.from_pretrained(args.delta)
    row = {"delta": str(args.delta), **forgetting(mm, mm.tokenizer)}
    _append(Path(args.out) / "forgetting.jsonl", row)
    _log(f"{args.delta}: held-out generic perplexity {row['perplexity_before']:.3f} -> {row['perplexity_after']:.3f}; "
         f"{row['generations_changed']} of {len(row['generations'])} greedy generations changed")


def forgetting(mm, tok) -> dict:
    """Perplexity on held-out generic text and fixed greedy generations, base vs trained."""
    blocks = _generic_blocks(tok)
    trained = mm.values.clone()
    mm.set_values(mm.base_values)
    ppl0, gen0 = _perplexity(mm.base_model, blocks), _generations(mm.base_model, tok)
    mm.set_values(trained)
    ppl1, gen1 = _perplexity(mm.base_model, blocks), _generations(mm.base_model, tok)
    return {"perplexity_before": ppl0, "perplexity_after": ppl1, "blocks": len(blocks),
            "generations": [{"prompt": p, "before": a, "after": b} for p, a, b in zip(PROMPTS, gen0, gen1)],
            "generations_changed": sum(a != b for a, b in zip(gen0, gen1))}


# ------------------------------------------------------------------------------------------- plot
def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    fig, ax = plt.subplots(figsize=(8, 5))
    for path in sorted(out.glob("*.jsonl")):
        if path.name == "test_results.jsonl":
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [r for r in rows if r.get("balanced_accuracy") is not None]
        if not rows:
            continue
        x = [r["forward_passes"] for r in rows]
        y = [r["balanced_accuracy"] for r in rows]
        lo = [r.get("balanced_accuracy_ci", [None])[0] if "balanced_accuracy_ci" in r else r.get("balanced_accuracy_ci_low")
              for r in rows]
        hi = [r.get("balanced_accuracy_ci", [None, None])[1] if "balanced_accuracy_ci" in r else r.get("balanced_accuracy_ci_high")
              for r in rows]
        ax.plot(x, y, marker="o", label=path.stem)
        if all(v is not None for v in lo + hi):
            ax.fill_between(x, lo, hi, alpha=0.15)
    base = json.loads((Path(args.study) / "baselines.json").read_text())["validation"]
    ax.axhline(base["zero_shot"]["balanced_accuracy"], color="grey", ls="--", lw=1, label="zero-shot")
    ax.axhline(base["prior_corrected"]["balanced_accuracy"], color="black", ls=":", lw=1, label="prior-corrected zero-shot")
    ax.axhline(0.5, color="red", ls="-.", lw=1, label="majority class (0.5)")
    ax.set_ylim(0.45, 1.0)
    ax.set_xlabel("forward passes (examples x 2 per ZO step)")
    ax.set_ylabel("balanced accuracy, validation (95% CI)")
    ax.set_title("SmolLM2-135M-Instruct, tweets_binary: Meerkat learning curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    _log(f"wrote {out / 'learning_curves.png'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = "python research/learning_curve.py " + " ".join(shlex.quote(a) for a in argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/curves")
    p.add_argument("--study", default="runs/study", help="zo_study.py prepare's folder (zero-shot logits)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("single", "federated", "test"):
        s = sub.add_parser(name)
        s.add_argument("--name", required=True)
        s.add_argument("--max-length", type=int, default=64)
        if name == "test":
            continue
        s.add_argument("--mask", required=True, help="a saved mask folder")
        s.add_argument("--eval-examples", type=int, default=1000)
        if name == "single":
            s.add_argument("--lr", type=float, default=1e-3)
            s.add_argument("--eps", type=float, default=1e-3)
            s.add_argument("--batch-size", type=int, default=8)
            s.add_argument("--steps", type=int, default=1000)
            s.add_argument("--eval-every", type=int, default=100)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--balanced", action="store_true", help="subsample the majority class to balance it")
        else:
            s.add_argument("--set", action="append", default=[], help="a FederationConfig override, key=value")
    sub.add_parser("plot")
    sub.add_parser("forgetting").add_argument("--delta", required=True, help="a saved delta folder")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.cmd == "single":
        single(args, command)
    elif args.cmd == "federated":
        federated(args, command)
    elif args.cmd == "test":
        test(args)
    elif args.cmd == "forgetting":
        forgetting_of_delta(args)
    else:
        plot(args)


if __name__ == "__main__":
    main()
