"""A local cache of computed masks, so the calibration backprop runs once per (model, spec).

Why our own and not `huggingface_hub`'s cache: that cache mirrors Hub repositories; a mask
computed here has no repository yet. The key covers everything the mask depends on: the
architecture fingerprint, a sample of the weights (two checkpoints of one architecture give
different sensitivities), the selection spec and the calibration source, so a stale entry is
never picked up. Entries are ordinary `SparseMask.save_pretrained` folders (atomic, hashed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from huggingface_hub import constants
from torch import nn

from . import compute as _compute  # looked up at call time: tests count calls by patching compute.compute_mask
from .calibration import source_identity
from .config import CONFIG_NAME, SparseMaskConfig
from .mask import SparseMask, fingerprint, parameter_shapes

logger = logging.getLogger(__name__)

_SAMPLE = 64  # values read from each parameter for the weights' part of the key


def default_cache_dir() -> Path:
    """`$MEERKAT_HF_CACHE`, else `$HF_HOME/meerkat_hf/masks` (huggingface_hub's home)."""
    env = os.environ.get("MEERKAT_HF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(constants.HF_HOME) / "meerkat_hf" / "masks"


@torch.no_grad()
def weights_sample_digest(model: nn.Module) -> str:
    """SHA-256 of the first values of every parameter: tells two checkpoints apart, reads ~KBs."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:_SAMPLE].float().cpu().numpy().tobytes())
    return h.hexdigest()


def mask_cache_key(model: nn.Module, spec: SparseMaskConfig, calibration_id: str | None) -> str:
    """A stable key for `compute_mask(model, spec, <calibration>)`."""
    # The base model's name is recorded in the mask: part of the key when given (CLI), not when None (runs).
    spec_dict = {k: v for k, v in spec.to_dict().items()
                 if not (k in ("base_model_name_or_path", "revision") and v is None)
                 and not (k == "target" and v == "all")  # masks cached before `target` existed keep their key
                 and not (k == "layers_to_transform" and v is None)}  # ... and before `layers_to_transform`
    payload = {
        "fingerprint": fingerprint(parameter_shapes(model)),
        "weights": weights_sample_digest(model),
        "spec": spec_dict,
        "calibration": calibration_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_cached_mask(key: str, cache_dir: str | os.PathLike | None = None) -> SparseMask | None:
    """The cached mask for `key`, or None (a corrupted entry is reported and ignored)."""
    folder = Path(cache_dir or default_cache_dir()) / key
    if not (folder / CONFIG_NAME).is_file():
        return None
    try:
        mask = SparseMask.from_pretrained(folder)
    except (ValueError, OSError) as err:
        logger.warning("ignoring the corrupted cached mask %s: %s", folder, err)
        return None
    logger.info("mask: using the cached mask %s (k=%d)", folder, mask.num_selected)
    return mask


def store_cached_mask(key: str, mask: SparseMask, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Save `mask` under `key`; a cache that cannot be written is a warning, never an error."""
    folder = Path(cache_dir or default_cache_dir()) / key
    try:
        mask.save_pretrained(folder, model_card=False)
    except OSError as err:
        logger.warning("could not cache the mask in %s: %s", folder, err)
        return None
    logger.info("mask: cached in %s", folder)
    return folder


def get_or_compute_mask(model: nn.Module, spec: SparseMaskConfig, calibration=None, tokenizer=None, *,
                        cache: bool | str | os.PathLike | None = True, calibration_id: str | None = None,
                        **compute_kwargs) -> SparseMask:
    """`compute_mask(model, spec, calibration, tokenizer, **compute_kwargs)`, through the cache.

    `cache`: True (the default folder, see `default_cache_dir`), a folder, or False/None (always
    compute). `calibration_id` names calibration text that has no identity of its own (a list
    of strings); by default it is `calibration.source_identity(calibration)`. A calibration
    without an identity is never cached: the key could not tell two texts apart.
    """
    cal_id = calibration_id if calibration_id is not None else source_identity(calibration)
    key = mask_cache_key(model, spec, cal_id) if (cache and cal_id is not None) else None
    cache_dir = None if isinstance(cache, bool) else cache
    mask = load_cached_mask(key, cache_dir) if key else None
    if mask is None:
        if spec.method == "sensitivity":
            where = (f"later runs with the same model, mask spec and calibration reuse it from "
                     f"{Path(cache_dir or default_cache_dir()) / key}" if key else
                     "it is not cached (" + ("caching is off" if not cache else "the calibration text has no stable "
                                             "identity to key a cache on") + ")")
            logger.info("mask: computing the sensitivity mask (density %g): one backprop pass over %d x %d tokens of "
                        "calibration text (%s), the slow step of a first run (minutes on a CPU); %s",
                        spec.density, spec.calibration_num_sequences, spec.calibration_seq_len,
                        cal_id or "given text", where)
        t0 = time.perf_counter()
        # a copy: compute_mask records the calibration's description in its config, which would change the key
        mask = _compute.compute_mask(model, dataclasses.replace(spec), calibration, tokenizer, **compute_kwargs)
        logger.info("mask: computed in %.0f s (k=%d)", time.perf_counter() - t0, mask.num_selected)
        if key:
            store_cached_mask(key, mask, cache_dir)
    return mask
