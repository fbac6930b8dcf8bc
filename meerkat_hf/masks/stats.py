"""Mask statistics: where the selected coordinates live and how concentrated sensitivity is."""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from .selection import top_values

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def module_type(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj'; biases keep a '.bias' suffix."""
    parts = name.split(".")
    leaf = parts[-2] if len(parts) >= 2 else parts[-1]
    return leaf + (".bias" if parts[-1] == "bias" else "")


def layer_index(name: str) -> int | None:
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else None


def placement(counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """Selected coordinates per module type and per layer ('other' = outside the blocks)."""
    by_type: Counter = Counter()
    by_layer: Counter = Counter()
    for name, c in counts.items():
        if not c:
            continue
        by_type[module_type(name)] += c
        layer = layer_index(name)
        by_layer["other" if layer is None else str(layer)] += c
    layer_key = lambda k: (k == "other", int(k) if k != "other" else 0)  # noqa: E731
    return {
        "per_module_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "per_layer": {k: by_layer[k] for k in sorted(by_layer, key=layer_key)},
    }


def concentration(scores: dict[str, torch.Tensor], selected: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """Gradient-mass statistics of squared-gradient scores.

    * `mass_share`: share of total squared-gradient mass on the selected coordinates;
    * `top_0.1%_mass_share`: the same for the top 0.1% (density-independent);
    * `concentration_ratio`: mean score of the top 0.1% / mean of the 0.1%-1% tier (the paper
      reports ~52x on LLaMA-class models).
    """
    total = float(sum(s.double().sum() for s in scores.values()))
    n = sum(s.numel() for s in scores.values())
    chosen = 0.0
    for name, idx in selected.items():
        s = scores[name].reshape(-1)
        chosen += float(s.double().sum() if idx is None else s[idx].double().sum())
    k01, k1 = max(1, math.ceil(n * 1e-3)), max(2, math.ceil(n * 1e-2))
    top = top_values(scores.values(), min(k1, n)).double()
    tier = top[k01:k1]
    return {
        "mass_share": chosen / total if total > 0 else float("nan"),
        "top_0.1%_mass_share": float(top[:k01].sum()) / total if total > 0 else float("nan"),
        "concentration_ratio": float(top[:k01].mean() / tier.mean()) if tier.numel() and tier.mean() > 0 else float("nan"),
    }
