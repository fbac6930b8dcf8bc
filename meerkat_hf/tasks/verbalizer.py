"""Encode prompt+verbalizer examples for a causal LM and score them on the label words only.

The invariant everything here rests on: an example's *prompt token ids* are computed once, by
:func:`encode_prompt_ids`, and are the same at training and at evaluation time. Training appends
the first token of the gold label word and supervises only that position (``labels`` is -100
elsewhere, so a plain transformers LM loss trains it); evaluation feeds the prompt alone and reads
the logits of its last token. Because the label token is appended as ids (never re-tokenized
together with the prompt), the position that predicts it is, in both cases, the prompt's last token.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .templates import TaskTemplate, get_task

__all__ = [
    "IGNORE_INDEX",
    "label_word_token_ids",
    "candidate_token_ids",
    "encode_prompt_ids",
    "encode_classification",
    "ClassificationCollator",
    "prediction_positions",
    "candidate_logits",
    "balanced_class_weights",
    "candidate_loss",
    "predict",
    "evaluate_accuracy",
    "candidate_scores",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_CONTEXT = "\n"  # tokenized in front of a label word so it is tokenized as it is after a prompt


def label_word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids of ``word`` as it is tokenized *after some text*, not at the start of a string.

    SentencePiece-style tokenizers (Llama, Gemma) prepend a word-boundary marker to the start of
    a string, so ``tokenizer(" great")`` can start with a lone "▁" instead of "▁great". Tokenizing
    ``"\\n" + word`` and dropping the tokens of ``"\\n"`` gives the in-context ids; when that does
    not split cleanly the plain encoding is used.
    """
    if not word:
        raise ValueError("empty label word")
    base = tokenizer(_CONTEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer(_CONTEXT + word, add_special_tokens=False)["input_ids"]
    if len(full) > len(base) and full[: len(base)] == base:
        return list(full[len(base) :])
    ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"label word {word!r} encodes to no tokens")
    return ids


def candidate_token_ids(tokenizer: Any, task: str | TaskTemplate) -> torch.LongTensor:
    """First token of each label word, ordered by class id (shape ``[num_classes]``).

    Classes are told apart by that single token, so two words sharing their first token is an
    error (change a word, or its leading space).
    """
    template = get_task(task)
    firsts = [label_word_token_ids(tokenizer, w)[0] for w in template.label_words]
    seen: dict[int, str] = {}
    for word, tid in zip(template.label_words, firsts):
        if tid in seen:
            piece = tokenizer.convert_ids_to_tokens(tid)
            raise ValueError(
                f"task {template.name!r}: label words {seen[tid]!r} and {word!r} share their first token "
                f"{piece!r} (id {tid}); pick words whose first tokens differ"
            )
        seen[tid] = word
    return torch.tensor(firsts, dtype=torch.long)


def _bos_prefix(tokenizer: Any, add_bos: bool | None) -> list[int]:
    """``[bos]`` or ``[]``. ``None`` follows the tokenizer: BOS only if its own encoding adds one
    (Llama/Gemma/OPT do, GPT-2/Qwen/SmolLM2 do not), so prompts look like the model's pretraining."""
    if add_bos is False:
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        if add_bos:
            raise ValueError("add_bos=True but the tokenizer has no bos_token")
        return []
    if add_bos is None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        if not with_special or with_special[0] != bos:
            return []
    return [int(bos)]


def encode_prompt_ids(
    tokenizer: Any, prompts: Sequence[str], max_length: int = 128, *, add_bos: bool | None = None
) -> tuple[list[list[int]], int]:
    """Prompt ids for a batch of prompt strings, left-truncated to ``max_length - 1`` tokens.

    One slot is kept free for the label token so that training (prompt + label token) and
    evaluation (prompt alone) see the *same* prompt ids. Truncation drops the *start* of the text:
    the end is where the label word follows. BOS (if the tokenizer has one and ``add_bos`` is not
    False) is kept in front. Returns the ids and how many prompts were truncated.
    """
    prefix = _bos_prefix(tokenizer, add_bos)
    budget = max_length - 1 - len(prefix)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt")
    bodies = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out: list[list[int]] = []
    truncated = 0
    for body in bodies:
        if len(body) > budget:
            body = body[-budget:]
            truncated += 1
        out.append(prefix + list(body))
    return out, truncated


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def encode_classification(
    tokenizer: Any,
    task: str | TaskTemplate,
    dataset: Any,
    max_length: int = 128,
    *,
    include_label_word: bool = True,
    add_bos: bool | None = None,
):
    """Tokenize ``dataset`` for prompt-based classification.

    Returns a ``datasets.Dataset`` with ``input_ids``, ``attention_mask``, ``label`` (class id)
    and, when ``include_label_word`` (training), ``labels``: the prompt ids followed by the first
    token of the gold label word, with every label -100 except that last position. With
    ``include_label_word=False`` (evaluation) the rows are the prompt alone, whose last token is
    the predicting position. Sequences are at most ``max_length`` tokens.
    """
    import datasets  # lazy: ~0.6 s to import, needed only where data is read

    template = get_task(task)
    if not isinstance(dataset, datasets.Dataset):
        dataset = datasets.Dataset.from_list(list(dataset))
    missing = [c for c in (*template.text_columns, template.label_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"task {template.name!r}: dataset lacks columns {missing} (has {dataset.column_names})")
    cand = candidate_token_ids(tokenizer, template).tolist()
    num_classes = template.num_classes
    label_column = template.label_column
    truncated = [0]

    def encode(batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(batch[label_column])
        rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        prompts = [template.format_prompt(r) for r in rows]
        ids, cut = encode_prompt_ids(tokenizer, prompts, max_length, add_bos=add_bos)
        truncated[0] += cut
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "label": []}
        if include_label_word:
            out["labels"] = []
        for prompt_ids, y in zip(ids, batch[label_column]):
            y = int(y)
            if not 0 <= y < num_classes:
                raise ValueError(f"task {template.name!r}: label {y} outside 0..{num_classes - 1}")
            seq = prompt_ids + [cand[y]] if include_label_word else prompt_ids
            out["input_ids"].append(seq)
            out["attention_mask"].append([1] * len(seq))
            out["label"].append(y)
            if include_label_word:
                out["labels"].append([IGNORE_INDEX] * len(prompt_ids) + [cand[y]])
        return out

    # Our own fingerprint: hashing the closure (tokenizer, template callables) is slow and fragile.
    # It cannot see every tokenizer detail, so cached results are never reused (load_from_cache_file=False).
    tok_id = (
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        tuple(cand),
        getattr(tokenizer, "bos_token_id", None),
    )
    fingerprint = _fingerprint(
        getattr(dataset, "_fingerprint", None), template.name, template.prompt, tuple(template.verbalizer.items()),
        tok_id, max_length, include_label_word, add_bos, "v1",
    )
    encoded = dataset.map(
        encode,
        batched=True,
        batch_size=1000,
        remove_columns=dataset.column_names,
        new_fingerprint=fingerprint,
        load_from_cache_file=False,
        desc=f"encode {template.name}",
    )
    if truncated[0]:
        logger.info("%s: left-truncated %d of %d prompts to %d tokens", template.name, truncated[0], len(dataset), max_length - 1)
    return encoded


@dataclass
class ClassificationCollator:
    """Right-pads ``input_ids`` / ``attention_mask`` / ``labels`` and stacks ``label``.

    Right padding keeps position ids aligned with unpadded inputs for every model family, and the
    predicting position is found from the mask/labels, so padding never moves it.
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    label_pad_id: int = IGNORE_INDEX

    def _pad_id(self) -> int:
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0  # masked out anyway

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        seqs = [list(map(int, f["input_ids"])) for f in features]
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        pad = self._pad_id()
        batch: dict[str, torch.Tensor] = {
            "input_ids": torch.tensor([s + [pad] * (length - len(s)) for s in seqs], dtype=torch.long)
        }
        masks = [list(map(int, f["attention_mask"])) if "attention_mask" in f else [1] * len(s) for f, s in zip(features, seqs)]
        batch["attention_mask"] = torch.tensor([m + [0] * (length - len(m)) for m in masks], dtype=torch.long)
        if "labels" in features[0]:
            labs = [list(map(int, f["labels"])) for f in features]
            batch["labels"] = torch.tensor([lab + [self.label_pad_id] * (length - len(lab)) for lab in labs], dtype=torch.long)
        if "label" in features[0]:
            batch["label"] = torch.tensor([int(f["label"]) for f in features], dtype=torch.long)
        return batch


def prediction_positions(batch: Mapping[str, torch.Tensor]) -> torch.LongTensor:
    """Index of the token whose logits predict the label word, per row.

    With ``labels`` (training encoding): the position before the supervised one. Without: the last
    attended token (right or left padding). For the same example both give the same index.
    """
    labels = batch.get("labels")
    if labels is not None:
        supervised = labels != IGNORE_INDEX
        if not bool(supervised.any(dim=1).all()):
            raise ValueError("a row of `labels` has no supervised position")
        first = supervised.int().argmax(dim=1)
        if bool((first < 1).any()):
            raise ValueError("a supervised label sits at position 0: nothing can predict it")
        return (first - 1).long()
    mask = batch.get("attention_mask")
    if mask is None:
        input_ids = batch["input_ids"]
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("a row of attention_mask is all zeros")
    return (mask.shape[1] - 1 - mask.flip(dims=[1]).int().argmax(dim=1)).long()


def _model_device(model: torch.nn.Module) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None


def _unwrap_chain(model: Any) -> list[Any]:
    """The model and what PEFT / DDP-style wrappers (forward(**kwargs)) hold inside it."""
    chain = [model]
    for _ in range(3):
        target = chain[-1]
        inner = target.get_base_model() if hasattr(target, "get_base_model") else getattr(target, "module", None)
        if inner is None or inner is target:
            break
        chain.append(inner)
    return chain


_KEEP_MODE_CACHE: dict[tuple[type, ...], str] = {}


def _logits_to_keep_mode(model: Any) -> str:
    """'2d' (per-row positions), '1d' (shared positions) or 'none' for ``model``'s forward.

    Cached per chain of wrapper types: ``inspect.signature`` costs ~ms per call.
    """
    chain = _unwrap_chain(model)
    key = tuple(type(m) for m in chain)
    if key in _KEEP_MODE_CACHE:
        return _KEEP_MODE_CACHE[key]
    mode = "none"
    for target in chain:
        try:
            params = inspect.signature(target.forward).parameters
        except (TypeError, ValueError, AttributeError):
            break
        if "logits_to_keep" in params:
            try:
                from transformers import modeling_utils

                mode = "2d" if hasattr(modeling_utils, "slice_logits_to_keep") else "1d"
            except Exception:  # noqa: BLE001
                mode = "1d"
            break
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break  # a forward without **kwargs cannot pass logits_to_keep on
    _KEEP_MODE_CACHE[key] = mode
    return mode


def candidate_logits(model: Any, batch: Mapping[str, torch.Tensor], candidate_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the candidate label tokens at each row's predicting position: ``[batch, classes]``.

    Only the needed positions go through the LM head when the model takes ``logits_to_keep``
    (transformers >= 5 accepts per-row positions; older versions a shared 1-D set); otherwise the
    full logits are computed and gathered.
    """
    device = _model_device(model) or batch["input_ids"].device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    positions = _batch_positions(batch, device)
    rows = torch.arange(input_ids.shape[0], device=device)
    mode = _logits_to_keep_mode(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    picked: torch.Tensor | None = None
    with _candidate_rows_only(model, candidate_ids) as restricted:
        if mode == "2d":
            logits = model(**inputs, logits_to_keep=positions[:, None]).logits
            if logits.dim() == 3 and logits.shape[:2] == (input_ids.shape[0], 1):
                picked = logits[:, 0]
        elif mode == "1d":
            keep, inverse = torch.unique(positions, return_inverse=True)
            logits = model(**inputs, logits_to_keep=keep).logits
            if logits.dim() == 3 and logits.shape[1] == keep.numel():
                picked = logits[rows, inverse]
        if picked is None:
            logits = model(**inputs).logits
            picked = logits[rows, positions]
    if restricted() and picked.shape[-1] == candidate_ids.numel():
        return picked
    return picked[:, candidate_ids.to(picked.device)]


@contextlib.contextmanager
def _candidate_rows_only(model: Any, candidate_ids: torch.Tensor):
    """While open, the model's LM head computes the candidate tokens' logits only (columns in candidate order).

    Why: a full-vocabulary head reads its whole weight (49,152 x 576 on SmolLM2, 113 MB in fp32) for every
    forward, although a classification loss needs C rows of it. Once the frozen trunk has removed the decoder
    layers below the mask from a ZO step's repeated forwards, that read is most of what remains (0.11 of
    0.14 s a forward on one core). The rows are gathered from the live weight on each call, so a masked
    (perturbed) head stays correct. Yields a callable that says whether the restricted head ran; nothing
    changes where the head is not exactly `nn.Linear` (quantized subclasses) or something already wraps it.
    The two logits are the full head's to float rounding (a C-row matmul may round differently from a
    vocabulary-wide one), which moves a ZO scalar by ~1e-7 relative; the server replays scalars, so the
    protocol is unaffected.
    """
    head = None
    for m in reversed(_unwrap_chain(model)):
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            head = get()
            break
    if (type(head) is not torch.nn.Linear or "forward" in head.__dict__
            or head._forward_hooks or head._forward_pre_hooks):
        yield lambda: False
        return
    ids = candidate_ids.to(head.weight.device)
    weight = head.weight.index_select(0, ids)
    bias = None if head.bias is None else head.bias.index_select(0, ids)
    ran = []

    def candidate_rows(hidden):
        ran.append(True)
        return F.linear(hidden, weight, bias)

    head.forward = candidate_rows
    try:
        yield lambda: bool(ran)  # the logits are the candidates' only if the model went through the head
    finally:
        head.__dict__.pop("forward", None)


# A ZO step evaluates the same batch 2q (+1) times at perturbed weights. What the batch alone decides (each row's
# predicting position, its target class) is checked and computed once per batch, not per forward: each check
# is a host sync (`bool(tensor)`) that on a GPU stalls the queue of the next forward. Keyed on the batch's
# `input_ids` tensor (weakly: the entry dies with the batch), so a new batch is always checked afresh.
_BATCH_CACHE: dict[int, tuple[weakref.ref, dict]] = {}  # id(input_ids) -> (weak ref to it, entry); by identity


def _batch_entry(batch: Mapping[str, torch.Tensor]) -> dict:
    key = batch["input_ids"]
    found = _BATCH_CACHE.get(id(key))
    entry = found[1] if found is not None and found[0]() is key else None
    if entry is None or entry["labels"] is not batch.get("labels") or entry["mask"] is not batch.get("attention_mask"):
        entry = {"labels": batch.get("labels"), "mask": batch.get("attention_mask")}
        ident = id(key)
        _BATCH_CACHE[ident] = (weakref.ref(key, lambda _ref, ident=ident: _BATCH_CACHE.pop(ident, None)), entry)
    return entry


def _batch_positions(batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    entry = _batch_entry(batch)
    cached = entry.get(("positions", device))
    if cached is None:
        cached = prediction_positions({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        entry[("positions", device)] = cached
    return cached


def _targets(batch: Mapping[str, torch.Tensor], candidate_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    entry = _batch_entry(batch)
    key = ("targets", device, tuple(candidate_ids.tolist()), batch.get("label") is not None and id(batch["label"]))
    cached = entry.get(key)
    if cached is None:
        cached = entry[key] = _compute_targets(batch, candidate_ids, device)
    return cached


def _compute_targets(batch: Mapping[str, torch.Tensor], candidate_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    if "label" in batch:
        return batch["label"].to(device).long()
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("batch needs `label` (class ids) or `labels` (LM labels) for a loss")
    labels = labels.to(device)
    pos = prediction_positions({"labels": labels}) + 1
    gold = labels[torch.arange(labels.shape[0], device=device), pos]
    match = gold[:, None] == candidate_ids.to(device)[None, :]
    if not bool(match.any(dim=1).all()):
        raise ValueError("a supervised token in `labels` is not one of the candidate tokens")
    return match.int().argmax(dim=1)


def candidate_loss(model: Any, batch: Mapping[str, torch.Tensor], candidate_ids: torch.Tensor,
                   class_weights: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy over the candidate words only (MeZO's classification loss), in float32.

    `class_weights` (one per class, e.g. from :func:`balanced_class_weights`) gives the batch mean
    ``sum_i w_{y_i} l_i / B``: an unbiased estimate of the class-weighted risk whatever classes the
    batch holds. Not `F.cross_entropy(weight=...)`'s ``/ sum_i w_{y_i}``: that ratio makes a batch of
    one class that class's *unweighted* loss, so a federation whose clients hold one label each
    (Non-IID) would average back to the skewed prior the weights were meant to remove (on the main
    job's Dirichlet split, 71/29 instead of 50/50; research/RESULTS.md, "The balanced loss under label skew").
    `reduction="none"` returns the per-example losses ``w_{y_i} l_i`` ([batch]; what
    differential privacy clips), from the same forward pass.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"candidate_loss reduction must be 'mean' or 'none', got {reduction!r}")
    logits = candidate_logits(model, batch, candidate_ids).float()
    targets = _targets(batch, candidate_ids, logits.device)
    if class_weights is None:
        return F.cross_entropy(logits, targets, reduction=reduction)
    weight = class_weights.to(device=logits.device, dtype=torch.float32)
    losses = F.cross_entropy(logits, targets, weight=weight, reduction="none")
    return losses if reduction == "none" else losses.mean()


def balanced_class_weights(labels: Any, num_classes: int) -> torch.Tensor:
    """Class weights ``1 / (C * p_c)`` from the training labels' frequencies p_c.

    With them the candidate loss is the *class-balanced* cross-entropy: every class counts the same,
    so an update can no longer lower the loss by moving the label prior toward the majority class
    (on tweets_binary, 69% negative, that is the first thing plain cross-entropy learns). Classes
    absent from `labels` get weight 0 (they never occur in a batch drawn from them).
    """
    counts = torch.bincount(torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1), minlength=num_classes)
    if counts.numel() != num_classes:
        raise ValueError(f"labels hold class ids >= num_classes={num_classes}")
    if int(counts.sum()) == 0:
        raise ValueError("balanced class weights need at least one labelled example")
    prior = counts.double() / counts.sum()
    weights = torch.where(counts > 0, 1.0 / (num_classes * prior.clamp_min(1e-300)), torch.zeros((), dtype=torch.float64))
    return weights.float()


def predict(model: Any, batch: Mapping[str, torch.Tensor], candidate_ids: torch.Tensor) -> torch.LongTensor:
    """Predicted class id per row (argmax over the candidate words)."""
    return candidate_logits(model, batch, candidate_ids).argmax(dim=-1)


def candidate_scores(
    model: Any,
    tokenizer: Any,
    task: str | TaskTemplate,
    dataset: Any,
    batch_size: int = 16,
    max_examples: int | None = None,
    *,
    max_length: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-word logits ``[examples, classes]`` (float32, CPU, dataset order) and the gold labels.

    Runs under ``torch.no_grad()`` in eval mode and restores the model's previous mode. Rows are
    batched by length to cut padding; results come back in the dataset's order. Every metric
    (accuracy, balanced accuracy, AUC, prior correction) is a function of these scores.
    """
    template = get_task(task)
    if max_examples is not None and max_examples < len(dataset):
        dataset = dataset.select(range(max_examples))
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if "input_ids" not in dataset.column_names:
        dataset = encode_classification(tokenizer, template, dataset, max_length, include_label_word=False)
    columns = [c for c in ("input_ids", "attention_mask", "labels", "label") if c in dataset.column_names]
    if "label" not in columns:
        raise ValueError("encoded dataset lacks the `label` column")
    data = dataset.with_format(None).select_columns(columns).to_dict()
    n = len(data["label"])
    order = sorted(range(n), key=lambda i: len(data["input_ids"][i]))
    cand = candidate_token_ids(tokenizer, template)
    collate = ClassificationCollator(tokenizer)
    scores = torch.empty(n, len(cand), dtype=torch.float32)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = collate([{c: data[c][i] for c in columns} for i in idx])
                scores[torch.tensor(idx)] = candidate_logits(model, batch, cand).float().cpu()
    finally:
        model.train(was_training)
    return scores, torch.tensor(data["label"], dtype=torch.long)


def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    task: str | TaskTemplate,
    dataset: Any,
    batch_size: int = 16,
    max_examples: int | None = None,
    *,
    max_length: int = 128,
) -> float:
    """Accuracy of prompt-based classification on ``dataset`` (raw task columns or already encoded)."""
    scores, labels = candidate_scores(model, tokenizer, task, dataset, batch_size, max_examples, max_length=max_length)
    return int((scores.argmax(dim=-1) == labels).sum()) / len(labels)
