"""Masks for the paper's baselines, so they train through the same `MeerkatZOTrainer`.

* `full_mask(model)`: every parameter (MeZO-style full-parameter ZO).
* `lora_mask(peft_model)`: exactly the PEFT adapter's trainable tensors (ZO over LoRA weights);
  `get_meerkat_model(peft_model, lora_mask(peft_model))` then perturbs and updates only those.

Both are `method="full"` masks (whole tensors, no index lists) restricted by name patterns, so
they save, load and checksum like any other mask.
"""

from __future__ import annotations

import re

from torch import nn

from .compute import compute_mask
from .config import SparseMaskConfig
from .mask import SparseMask

__all__ = ["full_mask", "lora_mask"]


def full_mask(model: nn.Module, *, include_embeddings: bool = True) -> SparseMask:
    """All parameters of `model` (tied weights once): full-parameter ZO as in MeZO.

    `include_embeddings=False` keeps Meerkat's default exclusions (embeddings, lm_head).
    """
    config = SparseMaskConfig(method="full", density=1.0)
    if include_embeddings:
        config.exclude_patterns = []
    return compute_mask(model, config, progress=False)


def lora_mask(peft_model: nn.Module) -> SparseMask:
    """The tensors a PEFT model trains (LoRA A/B, plus any `modules_to_save`), as a full mask.

    Call it before `get_meerkat_model` (which freezes every parameter): the selection is read from
    `requires_grad`, so it follows the PEFT config rather than guessing from names. Each name is
    recorded as an anchored pattern in the mask config.
    """
    if isinstance(peft_model, SparseMask) or not hasattr(peft_model, "peft_config"):
        raise TypeError(f"lora_mask expects a PEFT model (peft.get_peft_model(...)), got {type(peft_model).__name__}")
    names = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(
            "the PEFT model has no trainable parameter: call lora_mask() before get_meerkat_model(), "
            "which freezes every weight"
        )
    config = SparseMaskConfig(
        method="full", density=1.0, include_patterns=[f"^{re.escape(n)}$" for n in names], exclude_patterns=[]
    )
    return compute_mask(peft_model, config, progress=False)
