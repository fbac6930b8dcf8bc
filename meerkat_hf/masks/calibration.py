"""Calibration text -> token blocks -> per-parameter gradient statistics.

The mask publisher runs backprop once over generic text. Texts are packed (joined with EOS
and cut into `seq_len`-token blocks) like pre-training data, so every block is a full
next-token-prediction example. Gradients are folded into fp32 accumulators by
post-accumulate hooks and freed at once, so no `.grad` is ever kept on the model.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SELF_GENERATED = "self"
PYTHON_DOCS = "python_docs"  # named source: CPython's docstrings, generic prose on every machine


@dataclass
class SelfGenerated:
    """Data-free calibration: text sampled from the model itself (no corpus needed).

    Useful when no pre-training-like text may leave the publisher; the model's own samples
    follow its pre-training distribution.
    """

    temperature: float = 1.0
    top_k: int = 50


def _texts_from_file(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno} is not a JSON line: {err}") from err
                if text_column not in row:
                    raise KeyError(f"{path}:{lineno} has no {text_column!r} field (fields: {sorted(row)})")
                yield str(row[text_column])
    else:  # plain text: one document per blank-line separated paragraph
        doc: list[str] = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    doc.append(line.rstrip("\n"))
                elif doc:
                    yield "\n".join(doc)
                    doc = []
        if doc:
            yield "\n".join(doc)


def iter_texts(source, text_column: str = "text") -> Iterator[str]:
    """Texts from a list of strings, a `datasets` (Iterable)Dataset, local .txt/.jsonl files/dirs,
    or the named source `"python_docs"`."""
    if source == PYTHON_DOCS:
        yield from python_docs_corpus()
        return
    if isinstance(source, str) and source != SELF_GENERATED and not os.path.exists(source):
        raise FileNotFoundError(
            f"calibration source {source!r} is neither a file, a directory, {PYTHON_DOCS!r} nor {SELF_GENERATED!r}"
        )
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json", ".md")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"no .txt/.jsonl files under {path}")
        for f in files:
            yield from _texts_from_file(f, text_column)
        return
    column_names = getattr(source, "column_names", None)
    if column_names is not None:  # datasets.Dataset / IterableDataset
        if text_column not in column_names:
            raise KeyError(f"calibration dataset has no {text_column!r} column (columns: {column_names})")
        for row in source:
            yield str(row[text_column])
        return
    for item in source:  # a list of strings, or rows (dicts) of a dataset without known columns
        if isinstance(item, dict):
            if text_column not in item:
                raise KeyError(f"calibration dataset has no {text_column!r} column (columns: {sorted(item)})")
            item = item[text_column]
        if not isinstance(item, str):
            raise TypeError(f"calibration items must be strings, got {type(item).__name__}")
        yield item


def pack_blocks(texts: Iterable[str], tokenizer, num_sequences: int, seq_len: int) -> list[torch.Tensor]:
    """Join tokenized texts with EOS and cut `num_sequences` blocks of `seq_len` tokens.

    A final shorter block is kept if the text runs out (and has >= 2 tokens); an empty or
    too-short calibration set is an error, never a silent no-op.
    """
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn calibration text into tokens")
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    blocks: list[torch.Tensor] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        buffer.extend(ids + ([eos] if eos is not None else []))
        while len(buffer) >= seq_len and len(blocks) < num_sequences:
            blocks.append(torch.tensor(buffer[:seq_len], dtype=torch.long))
            buffer = buffer[seq_len:]
        if len(blocks) >= num_sequences:
            break
    if len(blocks) < num_sequences and len(buffer) >= 2:
        blocks.append(torch.tensor(buffer, dtype=torch.long))
    if not blocks:
        raise ValueError(
            "calibration text is empty or shorter than 2 tokens; a next-token loss needs at least 2 tokens"
        )
    if len(blocks) < num_sequences:
        logger.warning("calibration text gave only %d of %d requested sequences", len(blocks), num_sequences)
    return blocks


@torch.no_grad()
def generate_blocks(model: nn.Module, num_sequences: int, seq_len: int, seed: int, spec: SelfGenerated) -> list[torch.Tensor]:
    """Sample calibration sequences from the model, starting at BOS (data-free calibration)."""
    device = next(model.parameters()).device
    bos = getattr(model.config, "bos_token_id", None)
    if bos is None:
        raise ValueError("self-generated calibration needs model.config.bos_token_id")
    torch.manual_seed(seed)
    blocks = []
    for _ in tqdm(range(num_sequences), desc="sampling calibration text", leave=False):
        start = torch.tensor([[bos]], device=device)
        out = model.generate(
            start, do_sample=True, temperature=spec.temperature, top_k=spec.top_k,
            max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=bos,
        )
        blocks.append(out[0].cpu())
    return blocks


def calibration_blocks(model, source, tokenizer, num_sequences: int, seq_len: int, seed: int, text_column: str = "text"):
    """Resolve any supported calibration source to a list of 1-D token tensors."""
    if isinstance(source, SelfGenerated) or source == SELF_GENERATED:
        spec = source if isinstance(source, SelfGenerated) else SelfGenerated()
        return generate_blocks(model, num_sequences, seq_len, seed, spec)
    if source is None:
        raise ValueError("this mask method needs calibration text")
    return pack_blocks(iter_texts(source, text_column), tokenizer, num_sequences, seq_len)


def describe_source(source) -> str:
    if isinstance(source, SelfGenerated) or source == SELF_GENERATED:
        return "self-generated (text sampled from the base model)"
    if source == PYTHON_DOCS:
        return "python_docs (CPython standard-library docstrings)"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(getattr(source, "info", None), "dataset_name", None)
    return f"dataset:{name}" if name else f"{type(source).__name__} of texts"


def source_identity(source) -> str | None:
    """A cheap identity of a calibration source, for cache keys; None when there is none to be had
    (in-memory lists and datasets, directories)."""
    if isinstance(source, SelfGenerated) or source == SELF_GENERATED:
        return SELF_GENERATED
    if source == PYTHON_DOCS:  # the docstrings change between Python versions
        return f"{PYTHON_DOCS}:{sys.version_info[0]}.{sys.version_info[1]}"
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        st = Path(source).stat()
        return f"file:{Path(source).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return None


@dataclass
class GradientStatistics:
    """Per-parameter fp32 accumulators: mean squared gradient and mean gradient."""

    sq_mean: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    num_batches: int


def gradient_statistics(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    blocks: list[torch.Tensor],
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> GradientStatistics:
    """Backprop over the blocks; average g**2 and g per selectable parameter, in fp32.

    Why hooks: a post-accumulate-grad hook folds each gradient into the accumulators as soon
    as it is ready and drops it, so peak memory is accumulators + one layer's gradient,
    and no `.grad` outlives the call.
    """
    was_training = model.training
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    sq = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params}
    mean = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params}
    selected = {id(p) for _, p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in selected)

    def make_hook(name):
        def hook(param):
            g = param.grad.detach().float()
            sq[name].add_(g * g)
            mean[name].add_(g)
            param.grad = None

        return hook

    handles = [p.register_post_accumulate_grad_hook(make_hook(name)) for name, p in params]
    ckpt_was_on = _checkpointing_on(model)
    device = params[0][1].device
    batches = _batches(blocks, batch_size)
    try:
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # HF only checkpoints in training mode
        else:
            model.eval()
        for batch in tqdm(batches, desc="calibration backprop", disable=not progress):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"calibration loss is {loss.item()}; the model or text is broken")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
            p.grad = None
        if gradient_checkpointing and not ckpt_was_on:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
    n = len(batches)
    for name in sq:
        sq[name].div_(n)
        mean[name].div_(n)
    return GradientStatistics(sq, mean, n)


def _checkpointing_on(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing -> is_activation_checkpointing
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            return bool(getattr(model, attr))
    return False


def _batches(blocks: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length blocks into batches (a short final block gets its own batch)."""
    out, current = [], []
    for block in blocks:
        if current and (len(current) == batch_size or current[0].numel() != block.numel()):
            out.append(torch.stack(current))
            current = []
        current.append(block)
    if current:
        out.append(torch.stack(current))
    return out


def python_docs_corpus(min_chars: int = 200) -> list[str]:
    """Generic English prose available on every machine offline: CPython's stdlib docstrings.

    A stand-in for pre-training text when nothing can be downloaded; the README reports how
    masks from it compare with masks from self-generated text.
    """
    texts: list[str] = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and not m.name.startswith("_"))
    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "test", "lib2to3", "ensurepip", "venv"}
    for name in names:
        if name in skip:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # optional stdlib modules (curses, dbm.gnu, ...) may be missing
            continue
        objects = [module] + [obj for _, obj in inspect.getmembers(module) if inspect.isclass(obj) or inspect.isfunction(obj)]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in texts:
                texts.append(doc)
    return texts
