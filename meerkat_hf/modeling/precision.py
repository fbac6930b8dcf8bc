"""Forward-pass precision for zeroth-order training: bf16 forwards, fp32 everything the protocol replays.

ZO needs forward passes only, and on CPUs with AMX-BF16 (and on every GPU) a bf16 forward is several
times faster than an fp32 one. The protocol does not change with it: the sparse master `values`, the
perturbation z and every update stay fp32 on the CPU, bit for bit what a replaying server computes;
only the weights the forward reads are bf16.

Precisions (`MeerkatModel.set_forward_precision`):

* ``fp32``: the model as loaded (the reference).
* ``bf16``: the whole model in bf16. Fastest, but 1-D weights (norms, ~1.0) have a bf16 spacing of
  2^-7 ~ 0.008, coarser than a perturbation eps * z at eps <= 3e-3, so perturbations and small updates
  of masked norm weights round to 0 or to one step, and the residual stream is bf16 too.
* ``bf16-mixed`` (what ``bf16=True`` selects): matrix weights (Linear, Embedding: >= 2-D) in bf16,
  1-D weights (norms, biases) kept fp32, forwards under ``torch.autocast(bfloat16)``: the matmuls run
  on the bf16 units with no per-forward weight cast and the masked norm weights keep fp32 resolution
  (activations, the residual stream included, are bf16).
* ``autocast``: fp32 weights under ``torch.autocast(bfloat16)``: exact weights, but every forward
  casts every matrix weight again (slower than ``bf16-mixed``).

`research/bf16_precision.py` measures each against the exact directional derivative.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import ContextManager

import torch
from torch import nn

logger = logging.getLogger(__name__)

FORWARD_PRECISIONS = ("fp32", "bf16", "bf16-mixed", "autocast")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16-mixed", "bf16": "bf16", "fp32": "fp32",
            "bf16-mixed": "bf16-mixed", "autocast": "autocast"}


def normalize_precision(precision: str) -> str:
    """`precision` or one of its aliases (`float32`, `bfloat16` = bf16-mixed) as a FORWARD_PRECISIONS name."""
    try:
        return _ALIASES[precision]
    except (KeyError, TypeError):
        raise ValueError(f"forward precision must be one of {', '.join(FORWARD_PRECISIONS)} "
                         f"(or float32 / bfloat16), got {precision!r}") from None


def cast_model(model: nn.Module, precision: str) -> None:
    """Cast `model`'s floating-point parameters and buffers in place for `precision` (parameter objects kept)."""
    precision = normalize_precision(precision)
    if precision in ("fp32", "autocast"):
        target = lambda t: torch.float32  # noqa: E731
    elif precision == "bf16":
        target = lambda t: torch.bfloat16  # noqa: E731
    else:  # bf16-mixed: matrices bf16, vectors fp32
        target = lambda t: torch.bfloat16 if t.dim() >= 2 else torch.float32  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_floating_point() and p.dtype != target(p):
                    p.data = p.data.to(target(p))
            for name, b in list(module.named_buffers(recurse=False)):
                # rotary inverse frequencies and the like stay fp32: they are not weights
                if b.is_floating_point() and b.dtype != torch.float32 and precision in ("fp32", "autocast"):
                    module._buffers[name] = b.float()


def autocast_for(precision: str, device: torch.device | str) -> ContextManager:
    """The context every forward of `precision` runs under (autocast for the mixed ones, else nothing)."""
    precision = normalize_precision(precision)
    if precision in ("bf16-mixed", "autocast"):
        device_type = torch.device(device).type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup(device_type: str = "cpu") -> float:
    """How much faster a bf16 matmul of a typical ZO forward's shape runs than fp32 here (measured once).

    CPUs without AMX-BF16 / AVX512-BF16 emulate bf16 and run it several times slower than fp32; the
    speedup is then < 1 and `warn_if_slow_bf16` says so. On CUDA, bf16 tensor cores are assumed
    (compute capability >= 8.0, `torch.cuda.is_bf16_supported`), not measured.
    """
    if device_type == "cuda":
        return 4.0 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 0.5
    a, w = torch.randn(512, 576), torch.randn(1536, 576)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), w.to(dtype)
        x @ y.T  # warm-up (oneDNN picks its kernel)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(4):
                x @ y.T
            best = min(best, time.perf_counter() - start)
        timings[dtype] = best
    return timings[torch.float32] / timings[torch.bfloat16]


def warn_if_slow_bf16(device: torch.device | str) -> float:
    """Warn once when bf16 forwards are requested on hardware without a fast bf16 path; returns the speedup."""
    device_type = torch.device(device).type
    speedup = bf16_matmul_speedup(device_type)
    if speedup < 1.2:
        logger.warning(
            "bf16 forwards requested, but a bf16 matmul ran at %.2fx the speed of fp32 on this %s (no AMX-BF16/"
            "AVX512-BF16 or bf16 tensor cores): training will be slower, not faster; use fp32 on this machine",
            speedup, device_type.upper())
    return speedup


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32 (`torch.set_float32_matmul_precision("high")` or the cuBLAS flag)."""
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def warn_if_fp32_on_cuda(model: nn.Module, precision: str) -> bool:
    """Warn once when fp32 forwards run on CUDA with TF32 off: the GPU's matrix units then sit idle (an H100's dense
    bf16 rate is ~15x its plain fp32 rate; TF32 ~7x). True if it warned."""
    device = model_device(model)
    if device.type != "cuda" or normalize_precision(precision) != "fp32" or tf32_enabled():
        return False
    if any(p.dtype == torch.float32 and p.dim() >= 2 for p in model.parameters()):
        logger.warning("fp32 forwards on %s with TF32 off leave the GPU's tensor cores idle (bf16 runs matmuls ~15x "
                       "faster on an H100): pass bf16=True / model.dtype: bfloat16 (with eps >= %g), or "
                       "torch.backends.cuda.matmul.allow_tf32 = True", torch.cuda.get_device_name(device), BF16_MIN_EPS)
        return True
    return False


# Below this eps a bf16 finite difference is dominated by rounding: on SmolLM2's density-1e-5 mask its
# correlation with the exact directional derivative was 0.56 at eps 1e-3 and 0.84 at 3e-3 (fp32: 1.00, 0.995;
# research/bf16_precision.py, research/RESULTS.md "Learning per CPU-minute").
BF16_MIN_EPS = 1e-2


def warn_if_eps_below_bf16_resolution(precision: str, eps: float) -> bool:
    """Warn when bf16 forwards meet an eps whose perturbation bf16 cannot resolve; True if it warned."""
    if normalize_precision(precision) in ("bf16", "bf16-mixed", "autocast") and eps < BF16_MIN_EPS:
        logger.warning("bf16 forwards with eps=%g: below eps %g the bf16 rounding dominates the finite difference "
                       "(correlation with the true directional derivative 0.56 at eps 1e-3, 0.84 at 3e-3 on SmolLM2; "
                       "research/RESULTS.md); use eps >= %g with bf16", eps, BF16_MIN_EPS, BF16_MIN_EPS)
        return True
    return False


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
