"""What a run is built from a `FederationConfig`: the base model, the mask, the wrapped model,
and the protocol objects (lr schedule, server, Meerkat-VP scheduler).

Shared by every transport (the in-process driver, Accelerate ranks, the Flower server and
clients), so they all train the same coordinates of the same model, and the set-up that
decides bits exists once: `tests/test_flower.py` checks the driver and Flower agree bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..baselines import lora_mask
from ..calibration import SelfGenerated, source_identity
from ..config import CONFIG_NAME
from ..loading import load_model_and_tokenizer
from ..mask import SparseMask
from ..mask_cache import get_or_compute_mask
from ..model import get_meerkat_model
from .federation_config import FederationConfig
from .protocol.gradip import StepScheduler
from .protocol.server import FederatedServer
from .protocol.virtual_path import LRSchedule, ProtocolParams


def load_base_model(config: FederationConfig):
    m = config.model
    return load_model_and_tokenizer(m.model_name_or_path, m.gguf_file, m.dtype, m.revision)


def default_mask_location(config: FederationConfig) -> str:
    """Where the server's mask is: `mask.path`, or the mask it computed into `<output_dir>/mask`."""
    return config.mask.path if config.mask.path is not None else str(Path(config.output_dir) / "mask")


def _calibration_source(config: FederationConfig, data):
    """The configured calibration source; "task" means the task's own prompts (not pre-training-like)."""
    src = config.mask.calibration
    if src == "self":
        return SelfGenerated()
    if src == "task":
        return list(data.calibration_texts or [])
    return src  # None, "python_docs" or a path: calibration.py resolves them


def _calibration_id(config: FederationConfig) -> str | None:
    """What the calibration text is, for the mask cache key (None: do not cache)."""
    if config.mask.calibration == "task":
        t = config.task
        return f"task:{t.name}:{t.data_files}:{t.max_train_examples}:{config.seed}"
    return source_identity(config.mask.calibration)


def build_mask(config: FederationConfig, model, tokenizer, data, runtime, output_dir: Path) -> SparseMask:
    """Load `mask.path`, or compute the configured mask once (main rank) and share it via disk.

    Computed masks are cached (`mask.cache`, see `meerkat_hf.mask_cache`), so the calibration
    backprop runs once per model and spec, not once per run.
    """
    if config.mask.path is not None:
        return SparseMask.from_pretrained(config.mask.path)
    mask_dir = output_dir / "mask"
    if not (config.resume and (mask_dir / CONFIG_NAME).is_file()):
        if runtime.is_main:
            full = config.mask_method == "full"
            mask = get_or_compute_mask(
                model, config.mask.spec(config.mask_method), None if full else _calibration_source(config, data), tokenizer,
                cache=config.mask.cache, calibration_id=None if full else _calibration_id(config),
                progress=config.progress)
            mask.save_pretrained(mask_dir, model_card=False)
        runtime.barrier()
    return SparseMask.from_pretrained(mask_dir)


def wrap_model(config: FederationConfig, model, tokenizer, data, runtime, output_dir: Path):
    """(MeerkatModel, mask): LoRA for lora-fedzo, else the configured/computed mask."""
    if config.uses_lora:
        from peft import LoraConfig, get_peft_model  # only the LoRA baseline needs PEFT's model classes

        torch.manual_seed(config.seed)  # every rank/run initializes the same adapter
        lc = config.lora
        peft_model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                      target_modules=lc.target_modules or ["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))
        peft_model.eval()
        mask = lora_mask(peft_model)
        return get_meerkat_model(peft_model, mask), mask
    mask = build_mask(config, model, tokenizer, data, runtime, output_dir)
    return get_meerkat_model(model, mask), mask


# -- the protocol objects ---------------------------------------------------------------------
def protocol_params(config: FederationConfig) -> ProtocolParams:
    return ProtocolParams(config.seed, LRSchedule(config.lr, config.lr_schedule, config.rounds, config.lr_min_ratio),
                          config.q, config.weight_decay)


def build_server(config: FederationConfig, mask, initial_values) -> FederatedServer:
    zo = config.local_optimizer == "zo"
    server = FederatedServer(initial_values, mask.checksum, mask.fingerprint, protocol_params(config),
                             num_clients=config.num_clients, pretrain_grad=mask.pretrain_grad,
                             validation=config.validation, mode="zo" if zo else "dense")
    if config.uses_lora:  # the adapter's initial values are not part of the base model: download them
        server.synced = {c: None for c in range(config.num_clients)}
    return server


def build_scheduler(config: FederationConfig, mask) -> StepScheduler:
    scheduler = StepScheduler(config.scheduler_mode, config.local_steps, config.vp, config.seed)
    if scheduler.needs_gradip and mask.pretrain_grad is None:
        raise ValueError(f"{config.algorithm} needs the mask's pre-training gradient g_p, and this mask has none")
    return scheduler
