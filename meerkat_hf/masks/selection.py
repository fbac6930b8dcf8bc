"""Choosing the top-k coordinates of per-tensor scores without concatenating them.

A 7B model has 7e9 scores; concatenating them for one `topk` would double peak memory.
Instead the k-th largest score is found by a running merge of per-tensor top-k values
(memory O(k)), then each tensor keeps what is above that threshold. Ties at the threshold
are broken in canonical order (tensor order, then ascending flat index), so the selection is
a pure function of the scores: the same on every machine and equal to a stable sort.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .config import SparseMaskConfig
from .layer_stack import decoder_layers, layer_index_of
from ..zo.spsa import derive_seed



def selectable_parameters(model: nn.Module, config: SparseMaskConfig) -> list[tuple[str, nn.Parameter]]:
    """Parameters that may be selected, in canonical `named_parameters()` order (tied weights once)."""
    include = [re.compile(p) for p in config.include_patterns] if config.include_patterns is not None else None
    exclude = [re.compile(p) for p in config.exclude_patterns]
    linear = None
    if config.target == "linear":  # the weights of nn.Linear layers only (not biases, norms, embeddings)
        linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers = _layers_allowed(model, config.layers_to_transform)
    chosen = []
    for name, param in model.named_parameters():
        if layers is not None:
            index = layer_index_of(name, layers[0])
            if index is not None and index not in layers[1]:
                continue
        if linear is not None and name not in linear:
            continue
        if include is not None and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in exclude):
            continue
        chosen.append((name, param))
    if not chosen:
        raise ValueError(
            "no parameter of the model matches the mask's target and include/exclude patterns "
            f"(target={config.target}, include={config.include_patterns}, exclude={config.exclude_patterns})"
        )
    return chosen


def _layers_allowed(model: nn.Module, wanted: list[int] | None) -> tuple[str, set[int]] | None:
    """(stack name, allowed block indices) for `layers_to_transform`, negatives counted from the top."""
    if wanted is None:
        return None
    stack = decoder_layers(model)
    if stack is None:
        raise ValueError("layers_to_transform is set but the model has no stack of decoder layers to index")
    n = len(stack[1])
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise ValueError(f"layers_to_transform {bad} out of range: the model has {n} decoder layers "
                         f"(0..{n - 1}, or -{n}..-1 from the top)")
    return stack[0], {i % n for i in wanted}


def target_size(num_selectable: int, density: float) -> int:
    """k = round(density * N), at least 1."""
    return max(1, min(num_selectable, int(round(density * num_selectable))))


def _clean(scores: torch.Tensor) -> torch.Tensor:
    s = scores.detach().reshape(-1).float()
    return torch.nan_to_num(s, nan=float("-inf"))


def top_values(score_tensors: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """The k largest values over all tensors, descending, holding at most 2k values at once."""
    running = torch.empty(0)
    for scores in score_tensors:
        s = _clean(scores).cpu()
        if s.numel() > k:
            s = torch.topk(s, k, sorted=False).values
        merged = torch.cat([running, s])
        running = torch.topk(merged, min(k, merged.numel()), sorted=False).values
    return torch.sort(running, descending=True).values


def _select_with_threshold(scores: torch.Tensor, threshold: float, take_equal: int) -> tuple[torch.Tensor, int]:
    """Indices strictly above `threshold` plus the first `take_equal` equal to it (ascending)."""
    above = torch.nonzero(scores > threshold).flatten()
    taken = 0
    if take_equal > 0:
        equal = torch.nonzero(scores == threshold).flatten()[:take_equal]
        taken = equal.numel()
        above = torch.cat([above, equal])
    return torch.sort(above).values, taken


def select_global(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Global top-k across tensors; returns sorted int64 flat indices per tensor (possibly empty)."""
    total = sum(s.numel() for s in scores.values())
    if not 0 < k <= total:
        raise ValueError(f"cannot select {k} of {total} coordinates")
    kth = float(top_values(scores.values(), k)[k - 1])
    above = {name: int((_clean(s) > kth).sum()) for name, s in scores.items()}
    remaining = k - sum(above.values())  # >= 1: the k-th value itself is not strictly above
    out = {}
    for name, s in scores.items():
        idx, taken = _select_with_threshold(_clean(s), kth, remaining)
        remaining -= taken
        out[name] = idx
    return out


def allocate(numels: list[int], k: int) -> list[int]:
    """Split k over tensors proportionally to their size (largest remainder), summing to k exactly."""
    total = sum(numels)
    exact = [k * n / total for n in numels]
    counts = [int(e) for e in exact]
    order = sorted(range(len(numels)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return counts


def select_per_tensor(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Top-(density) within each tensor, the per-tensor counts summing to k exactly."""
    names = list(scores)
    counts = allocate([scores[n].numel() for n in names], k)
    out = {}
    for name, count in zip(names, counts):
        out[name] = select_global({name: scores[name]}, count)[name] if count else torch.empty(0, dtype=torch.long)
    return out


def random_scores(params: list[tuple[str, nn.Parameter]], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Uniform scores, one seeded CPU generator per tensor so the draw is reproducible anywhere."""
    for position, (name, param) in enumerate(params):
        gen = torch.Generator("cpu").manual_seed(derive_seed(seed, position))
        yield name, torch.rand(param.numel(), generator=gen)
