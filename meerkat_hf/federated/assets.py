"""What a run is built from a `FederationConfig`: the base model, the mask, the wrapped model,
and the protocol objects (lr schedule, server, Meerkat-VP scheduler).

Shared by every transport (the in-process driver, Accelerate ranks, the Flower server and
clients), so they all train the same coordinates of the same model, and the set-up that
decides bits exists once: `tests/test_flower.py` checks the driver and Flower agree bit for bit.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..masks.baselines import lora_mask
from ..masks.calibration import SelfGenerated, source_identity
from ..masks.config import CONFIG_NAME
from ..hub.loading import load_model_and_tokenizer
from ..masks.mask import SparseMask
from ..masks.cache import get_or_compute_mask
from ..modeling.model import get_meerkat_model
from ..modeling.precision import warn_if_eps_below_bf16_resolution, warn_if_fp32_on_cuda
from ..privacy import ExampleDP, solve_noise_multiplier
from ..zo.spsa import derive_seed
from .federation_config import ConfigError, FederationConfig
from .protocol.gradip import StepScheduler
from .protocol.server import FederatedServer
from .protocol.virtual_path import LRSchedule, ProtocolParams, update_bound


def load_base_model(config: FederationConfig):
    m = config.model
    # bfloat16 = bf16 forwards over an fp32 master (meerkat_hf.modeling.precision): the weights load exactly, the
    # mask is computed on them, and `meerkat_model` casts the matrices for the forwards afterwards
    dtype = "float32" if m.dtype == "bfloat16" else m.dtype
    return load_model_and_tokenizer(m.model_name_or_path, m.gguf_file, dtype, m.revision)


def meerkat_model(config: FederationConfig, model, mask: SparseMask):
    """`get_meerkat_model` with the config's forward precision (`model.dtype: bfloat16` -> bf16-mixed)."""
    wrapped = get_meerkat_model(model, mask)
    if config.model.dtype == "bfloat16":
        wrapped.set_forward_precision("bf16-mixed")
        warn_if_eps_below_bf16_resolution("bf16-mixed", config.zo_eps)
    else:
        warn_if_fp32_on_cuda(model, wrapped.forward_precision)
    return wrapped


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

    Computed masks are cached (`mask.cache`, see `meerkat_hf.masks.cache`), so the calibration
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
        return meerkat_model(config, peft_model, mask), mask
    mask = build_mask(config, model, tokenizer, data, runtime, output_dir)
    return meerkat_model(config, model, mask), mask


# -- the protocol objects ---------------------------------------------------------------------
def protocol_params(config: FederationConfig, initial_values: torch.Tensor | None = None) -> ProtocolParams:
    """The numbers every node agrees on. Central (user-level) DP noise scales with the per-client
    update bound S = max_update_ratio x ||w_S at round 0||, so it needs the round-0 values."""
    central = 0.0
    if config.dp.central_noise_multiplier is not None:
        if initial_values is None:
            raise ValueError("dp.central_noise_multiplier: protocol_params needs the round-0 values (the bound S)")
        central = config.dp.central_noise_multiplier * update_bound(initial_values, config.validation.max_update_ratio)
    return ProtocolParams(config.seed, LRSchedule(config.learning_rate, config.lr_schedule, config.rounds, config.lr_min_ratio),
                          config.zo_num_perturbations, config.weight_decay, central)


def planned_steps(config: FederationConfig) -> int:
    """The most local steps one client can take in the run (sampled every round, never limited):
    the step count a target epsilon is solved for, so the guarantee holds whatever the sampling."""
    return config.rounds * config.local_steps


@functools.lru_cache(maxsize=1024)
def _solved_multiplier(target: float, delta: float, sample_rate: float, steps: int) -> float:
    return solve_noise_multiplier(target, delta, sample_rate, steps)


def client_noise_multiplier(config: FederationConfig, num_examples: int) -> float:
    """A client's example-level noise multiplier: `dp.noise_multiplier`, or the one solved for
    `dp.target_epsilon` from its own sample rate batch_size / n (same inputs, same answer on every node)."""
    dp = config.dp
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    rate = min(1.0, config.batch_size / num_examples)
    try:
        return _solved_multiplier(float(dp.target_epsilon), float(dp.delta), rate, planned_steps(config))
    except ValueError as err:
        raise ConfigError(f"federation config: {err}") from None


def client_privacy(config: FederationConfig, num_examples: int, client_id: int = 0) -> ExampleDP | None:
    """The `ExampleDP` of one client (None without example-level DP)."""
    dp = config.dp
    if not dp.example_level:
        return None
    seed = None if dp.noise_seed is None else derive_seed(dp.noise_seed, client_id)
    return ExampleDP(float(dp.clip), client_noise_multiplier(config, num_examples), config.batch_size, num_examples, seed)


def build_server(config: FederationConfig, mask, initial_values) -> FederatedServer:
    zo = config.local_optimizer == "zo"
    server = FederatedServer(initial_values, mask.checksum, mask.fingerprint, protocol_params(config, initial_values),
                             num_clients=config.num_clients, pretrain_grad=mask.pretrain_grad,
                             validation=config.validation, mode="zo" if zo else "dense",
                             max_catchup_directions=config.catchup_max_directions)
    if config.uses_lora:  # the adapter's initial values are not part of the base model: download them
        server.synced = {c: None for c in range(config.num_clients)}
    return server


def build_scheduler(config: FederationConfig, mask) -> StepScheduler:
    scheduler = StepScheduler(config.scheduler_mode, config.local_steps, config.vp, config.seed)
    if scheduler.needs_gradip and mask.pretrain_grad is None:
        raise ValueError(f"{config.algorithm} needs the mask's pre-training gradient g_p, and this mask has none")
    return scheduler
