"""`compute_mask`: one backprop pass over calibration text -> a `SparseMask`."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .calibration import calibration_blocks, describe_source, gradient_statistics
from .config import SparseMaskConfig
from .mask import SparseMask, parameter_shapes
from .selection import random_scores, select_global, select_per_tensor, selectable_parameters, target_size
from .stats import concentration, placement

logger = logging.getLogger(__name__)


def compute_mask(
    model: nn.Module,
    config: SparseMaskConfig | None = None,
    calibration=None,
    tokenizer=None,
    *,
    text_column: str = "text",
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> SparseMask:
    """Select the masked coordinates of `model` and record the masked pre-training gradient g_p.

    `calibration` is a list of strings, a `datasets` (Iterable)Dataset with `text_column`,
    a local .txt/.jsonl file or directory, or `"self"` / `SelfGenerated()` for text sampled
    from the model. `sensitivity` needs it; for the other methods it is optional and, when
    given, provides g_p (Meerkat-VP) and the gradient statistics.
    """
    config = config or SparseMaskConfig()
    start = time.perf_counter()
    params = selectable_parameters(model, config)
    num_selectable = sum(p.numel() for _, p in params)
    k = target_size(num_selectable, config.density)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None

    grads = None
    if calibration is not None:
        blocks = calibration_blocks(
            model, calibration, tokenizer, config.calibration_num_sequences, config.calibration_seq_len,
            config.seed, text_column,
        )
        if config.calibration_source is None:
            config.calibration_source = describe_source(calibration)
        grads = gradient_statistics(
            model, params, blocks, config.calibration_batch_size, gradient_checkpointing, progress
        )
    elif config.method == "sensitivity":
        raise ValueError("method='sensitivity' needs calibration text (calibration=...)")

    if config.method == "full":
        indices = {name: None for name, _ in params}
    else:
        if config.method == "sensitivity":
            scores = grads.sq_mean
        elif config.method == "magnitude":
            scores = {name: p.detach().abs() for name, p in params}
        else:
            scores = dict(random_scores(params, config.seed))
        select = select_global if config.scope == "global" else select_per_tensor
        indices = select(scores, k)

    pretrain_grad = None
    if grads is not None and config.method != "full":
        pretrain_grad = torch.cat(
            [grads.mean[name].reshape(-1)[idx.to(grads.mean[name].device)].cpu() for name, idx in indices.items()]
        )

    mask = SparseMask(config=config, indices=indices, shapes=parameter_shapes(model), pretrain_grad=pretrain_grad)
    stats = {"num_selectable": num_selectable, "num_parameters": sum(p.numel() for p in model.parameters())}
    stats.update(placement(mask.counts()))
    if grads is not None:
        stats.update(concentration(grads.sq_mean, indices))
        stats["calibration_batches"] = grads.num_batches
    stats["seconds"] = round(time.perf_counter() - start, 2)
    mask.statistics = stats
    logger.info(
        "mask: method=%s k=%d of %d selectable (%.3g%%) in %.1fs", config.method, mask.num_selected,
        num_selectable, 100 * mask.num_selected / num_selectable, stats["seconds"],
    )
    return mask
