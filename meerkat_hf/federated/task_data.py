"""Per-client private datasets, the loss the clients optimize and the held-out evaluation.

Glue between a `FederationConfig` and the tasks module (prompt + verbalizer encoding,
`candidate_loss`, `evaluate_accuracy`) and `federated.partition`; it owns no task logic.
Classification tasks train with MeZO's loss (cross-entropy over the label words) and report
accuracy; `lm` tasks train with the model's LM loss and report the held-out loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..classification_metrics import ClassifierScores
from ..modeling.model import forward_module
from ..privacy import causal_lm_per_example_loss
from ..tasks import (
    ClassificationCollator,
    balanced_class_weights,
    candidate_loss,
    candidate_scores,
    candidate_token_ids,
    custom_task,
    encode_classification,
    get_task,
    load_task_dataset,
)
from .federation_config import FederationConfig
from .partition import label_count_table, partition

logger = logging.getLogger(__name__)


@dataclass
class FederatedData:
    client_examples: list[list[dict]]
    collate: Callable[[list], dict]
    loss_fn: Callable[[Any, dict], torch.Tensor]
    evaluate: Callable[[Any], dict[str, float]]
    # one loss per example of the batch (example-level DP clips each one's scalar)
    per_example_loss_fn: Callable[[Any, dict], torch.Tensor] | None = None
    labels: np.ndarray | None = None
    parts: list[list[int]] = field(default_factory=list)
    label_names: list[str] | None = None
    calibration_texts: list[str] | None = None
    description: str = ""
    # the latest evaluation's per-example predictions and gold labels (classification only), for a
    # paired before/after comparison on the same examples
    last_eval: dict = field(default_factory=dict)

    def partition_table(self) -> str:
        if self.labels is None:
            return "\n".join(f"client {c}: {len(p)} examples" for c, p in enumerate(self.parts))
        return label_count_table(self.labels, self.parts, self.label_names)


def config_partition(config: FederationConfig, labels: np.ndarray | None, n: int) -> list[list[int]]:
    """The clients' row indices as `config.partition` deals them (seeded): the one split every study replays."""
    p = config.partition
    seed = config.seed if p.seed is None else p.seed
    return partition(labels if labels is not None else np.zeros(n, dtype=np.int64), config.num_clients, p.scheme, seed,
                     alpha=p.alpha, labels_per_client=p.labels_per_client,
                     num_single_label_clients=p.num_single_label_clients, single_label_position=p.single_label_position)


def _template(config: FederationConfig):
    t = config.task
    if t.prompt is not None:
        return custom_task(t.prompt, t.verbalizer, t.text_columns, t.label_column, name=t.name or "custom")
    return get_task(t.name)


def build_classification_data(config: FederationConfig, tokenizer) -> FederatedData:
    t = config.task
    template = _template(config)
    kw = dict(data_files=t.data_files, column_mapping=t.column_mapping, seed=config.seed)
    train = load_task_dataset(template, "train", max_examples=t.max_train_examples, **kw)
    evalset = load_task_dataset(template, t.eval_split, max_examples=config.eval_examples, **kw)
    labels = np.asarray(train[template.label_column], dtype=np.int64)
    parts = config_partition(config, labels, len(train))
    encoded = encode_classification(tokenizer, template, train, config.max_length).with_format(None)
    rows = encoded.to_list()
    eval_encoded = encode_classification(tokenizer, template, evalset, config.max_length, include_label_word=False)
    cand = candidate_token_ids(tokenizer, template)
    collate = ClassificationCollator(tokenizer)
    last_eval: dict = {}

    weights = None
    if t.loss == "balanced":  # the federation's label frequencies: every client optimises the same objective
        held = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
        weights = balanced_class_weights(labels[held], template.num_classes)
        logger.info("class-balanced loss: weights %s", [round(float(w), 4) for w in weights])

    def loss_fn(model, batch):
        return candidate_loss(forward_module(model), batch, cand, weights)

    def per_example_loss_fn(model, batch):
        return candidate_loss(forward_module(model), batch, cand, weights, reduction="none")

    def evaluate(model) -> dict[str, float]:
        scores, gold = candidate_scores(forward_module(model), tokenizer, template, eval_encoded,
                                        batch_size=config.eval_batch_size, max_length=config.max_length)
        scored = ClassifierScores(scores.numpy(), gold.numpy())
        rep = scored.report()
        last_eval.update(predictions=scored.predictions(), labels=scored.labels, num_classes=scored.scores.shape[1],
                         scores=scored.scores)
        # accuracy stays the headline key for old readers; the prior-proof metrics sit beside it
        out = {key: float(rep[key]) for key in ("accuracy", "balanced_accuracy", "macro_f1", "majority_rate")}
        out.update({f"{key}_ci_low": float(rep[f"{key}_ci"][0]) for key in ("balanced_accuracy", "macro_f1")})
        out.update({f"{key}_ci_high": float(rep[f"{key}_ci"][1]) for key in ("balanced_accuracy", "macro_f1")})
        if "auc" in rep:
            out["auc"] = float(rep["auc"])
        return out

    prompts = [template.format_prompt(train[i]) for i in range(min(len(train), 256))]
    return FederatedData(
        client_examples=[[rows[i] for i in p] for p in parts], collate=collate, loss_fn=loss_fn, evaluate=evaluate,
        per_example_loss_fn=per_example_loss_fn, labels=labels, parts=parts, label_names=list(template.label_names), calibration_texts=prompts, last_eval=last_eval,
        description=f"{template.name}: {len(train)} train / {len(evalset)} eval examples, {template.num_classes} classes",
    )


@dataclass
class LMCollator:
    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        ids = [f["input_ids"] + [self.pad_id] * (length - len(f["input_ids"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
        labels = [f["input_ids"] + [-100] * (length - len(f["input_ids"])) for f in features]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def _read_texts(files: Any, column: str, column_mapping: dict | None) -> list[Any]:
    """Texts of one split from local .txt/.jsonl/.json/.csv/.parquet files; a chat dataset (a `messages`
    column of {role, content} turns and no `column`) gives its conversations, which `build_lm_data`
    renders with the tokenizer's chat template as TRL's SFTTrainer does."""
    import datasets  # lazy: ~0.6 s to import, needed only where data is read

    files = [files] if isinstance(files, (str, bytes)) or not isinstance(files, (list, tuple)) else list(files)
    first = str(files[0]).lower()
    builder = next((b for ext, b in ((".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".tsv", "csv"),
                                     (".parquet", "parquet"), (".txt", "text")) if first.endswith(ext)), None)
    if builder is None:
        raise ValueError(f"cannot tell the format of {files[0]!r}: use .txt, .jsonl, .json, .csv or .parquet")
    kwargs = {"delimiter": "\t"} if first.endswith(".tsv") else {}
    ds = datasets.load_dataset(builder, data_files={"x": [str(f) for f in files]}, split="x", **kwargs)
    if column_mapping:
        ds = ds.rename_columns(dict(column_mapping))
    if builder == "text" and column not in ds.column_names:
        column = "text"
    if column not in ds.column_names and CHAT_COLUMN in ds.column_names:
        return [list(m) for m in ds[CHAT_COLUMN] if m]
    if column not in ds.column_names:
        raise ValueError(f"lm task data lack the text column {column!r} (columns: {ds.column_names})")
    return [str(x) for x in ds[column] if x is not None and str(x).strip()]


CHAT_COLUMN = "messages"  # TRL's conversational format


def _chat_ids(tokenizer, messages: list) -> list[int]:
    """A conversation's tokens as TRL's SFTTrainer makes them for its language-modelling loss: the chat
    template applied and tokenized in one call (so the template's own special tokens are not doubled)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the task data are conversations (a 'messages' column) but the tokenizer has no chat "
                         "template: use a chat model's tokenizer or give plain texts in task.text_column")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def build_lm_data(config: FederationConfig, tokenizer) -> FederatedData:
    t = config.task
    files = t.data_files
    if isinstance(files, dict):
        if "train" not in files:
            raise ValueError(f"task.data_files needs a 'train' entry (has {sorted(files)})")
        train_texts = _read_texts(files["train"], t.text_column, t.column_mapping)
        eval_key = next((k for k in ("eval", "validation", "test") if k in files), None)
        eval_texts = _read_texts(files[eval_key], t.text_column, t.column_mapping) if eval_key else None
    else:
        train_texts, eval_texts = _read_texts(files, t.text_column, t.column_mapping), None
    if eval_texts is None:
        logger.warning("no eval split in task.data_files: holding out 10%% of the training texts")
        cut = max(1, len(train_texts) // 10)
        eval_texts, train_texts = train_texts[:cut], train_texts[cut:]
    if t.max_train_examples:
        train_texts = train_texts[: t.max_train_examples]
    if config.eval_examples:
        eval_texts = eval_texts[: config.eval_examples]

    def encode(batch: list[Any]) -> list[dict]:
        if batch and not isinstance(batch[0], str):  # conversations: TRL's chat tokenization, kept from the start
            ids = [_chat_ids(tokenizer, m)[: config.max_length] for m in batch]
        else:
            ids = tokenizer(batch, add_special_tokens=True, truncation=True, max_length=config.max_length)["input_ids"]
        return [{"input_ids": list(x)} for x in ids if len(x) >= 2]

    rows, eval_rows = encode(train_texts), encode(eval_texts)
    parts = config_partition(config, None, len(rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = LMCollator(int(pad))

    def loss_fn(model, batch):
        return forward_module(model)(**batch).loss

    def per_example_loss_fn(model, batch):
        return causal_lm_per_example_loss(forward_module(model), batch)

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        fwd = forward_module(model)
        device = next(fwd.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(eval_rows), config.eval_batch_size):
            batch = collate(eval_rows[i:i + config.eval_batch_size])
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = fwd(**{k: v.to(device) for k, v in batch.items()}).loss
            total += float(loss) * n
            count += n
        return {"eval_loss": total / max(count, 1) if count else math.nan}

    return FederatedData(
        client_examples=[[rows[i] for i in p] for p in parts], collate=collate, loss_fn=loss_fn, evaluate=evaluate,
        per_example_loss_fn=per_example_loss_fn, parts=parts,
        calibration_texts=[t if isinstance(t, str) else tokenizer.apply_chat_template(t, tokenize=False)
                           for t in train_texts[:256]],
        description=f"lm: {len(rows)} train / {len(eval_rows)} eval "
                    + ("conversations (chat template)" if train_texts and not isinstance(train_texts[0], str) else "texts"),
    )


def build_federated_data(config: FederationConfig, tokenizer) -> FederatedData:
    if config.task.type == "lm":
        return build_lm_data(config, tokenizer)
    return build_classification_data(config, tokenizer)
