"""Differential privacy for seeded ZO steps: per-example clipping, private noise, Poisson sampling, accounting.

A ZO step's only data-dependent output is its projected gradient g = (L+ - L-)/(2 eps), so DP
costs one scalar's worth of work (the DP-ZO / DPZero construction):

* the two forward passes already give per-example losses, hence per-example scalars
  g_i = (l_i(w + eps z) - l_i(w - eps z)) / (2 eps) at no extra cost;
* each g_i is clipped to [-C, C] (`clip`), so changing one example moves the sum by <= 2C;
* the released scalar is (sum_i clip(g_i) + N(0, (sigma C)^2)) / B, with B the *expected* batch
  size, drawn from a generator the server never learns (`private_generator`);
* batches are **Poisson-sampled** (every example joins a step's batch independently with
  probability q = B / n, from the same private generator). That is exactly the sampled Gaussian
  mechanism Opacus's RDP accountant analyses (add/remove-one-example neighbours), so the
  epsilons reported here are the library's for what the code does.

The noised scalar is what is applied and sent, so the server's replay of (seed, scalar, lr)
stays bit-exact: DP changes what the scalar *is*, not how it travels.

The accountant is Opacus's (`pip install 'meerkat-hf[dp]'`); it is imported lazily, only for
accounting. Everything else here is torch only.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .zo.spsa import derive_seed

__all__ = [
    "DP_EXTRA_HINT",
    "ExampleDP",
    "causal_lm_per_example_loss",
    "check_dp_settings",
    "clipped_mean",
    "epsilon_floor",
    "gaussian_epsilon",
    "poisson_indices",
    "private_generator",
    "private_scalar",
    "require_accountant",
    "solve_noise_multiplier",
]

DP_EXTRA_HINT = "pip install 'meerkat-hf[dp]'"
_NOISE_TAG = 0x44504E53  # "DPNS": keeps a test seed's stream apart from every protocol seed


# -- settings -------------------------------------------------------------------------------
def check_dp_settings(clip: Any, noise_multiplier: Any = None, target_epsilon: Any = None, delta: Any = 1e-5,
                      prefix: str = "dp.") -> None:
    """One-line errors for bad DP settings (no accountant needed): clip/multiplier/target > 0, delta in (0, 1)."""
    def positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not positive(clip):
        raise ValueError(f"{prefix}clip must be a finite number > 0 (got {clip!r})")
    if noise_multiplier is not None and not positive(noise_multiplier):
        raise ValueError(f"{prefix}noise_multiplier must be a finite number > 0 (got {noise_multiplier!r})")
    if target_epsilon is not None and not positive(target_epsilon):
        raise ValueError(f"{prefix}target_epsilon must be a finite number > 0 (got {target_epsilon!r})")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(f"give exactly one of {prefix}noise_multiplier and {prefix}target_epsilon "
                         f"(got {noise_multiplier!r} and {target_epsilon!r})")
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1):
        raise ValueError(f"{prefix}delta must be in (0, 1) (got {delta!r})")


@dataclass(frozen=True)
class ExampleDP:
    """Example-level DP of one data holder: clip C, noise multiplier sigma, expected batch size B.

    `noise_seed` None (the default, and the only private choice): every step's noise and
    batch come from `secrets`, unknown to anyone. An integer makes them reproducible (tests,
    debugging) and voids the guarantee against whoever knows it.
    """

    clip: float
    noise_multiplier: float
    batch_size: int
    num_examples: int
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        check_dp_settings(self.clip, self.noise_multiplier, None, 0.5)
        if self.batch_size < 1 or self.num_examples < 1:
            raise ValueError("example-level DP needs batch_size >= 1 and at least one example")

    @property
    def sample_rate(self) -> float:
        """Poisson rate q = B / n (capped at 1: a batch larger than the data is the whole data)."""
        return min(1.0, self.batch_size / self.num_examples)

    @property
    def noise_std(self) -> float:
        """Std of the noise on the released (averaged) scalar: sigma * C / B."""
        return self.noise_multiplier * self.clip / self.batch_size

    def generator(self, *coords: int) -> torch.Generator:
        return private_generator(None if self.noise_seed is None else derive_seed(self.noise_seed, *coords))


def private_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded from `secrets` (63 bits the server never sees), or from `seed` (tests only)."""
    return torch.Generator("cpu").manual_seed(secrets.randbits(63) if seed is None else int(seed) ^ _NOISE_TAG)


def poisson_indices(num_examples: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """A Poisson-sampled batch: each index independently with probability `sample_rate` (may be empty)."""
    if sample_rate >= 1.0:
        return list(range(num_examples))
    draws = torch.rand(num_examples, generator=generator, dtype=torch.float64)
    return torch.nonzero(draws < sample_rate).reshape(-1).tolist()


# -- the private scalar ----------------------------------------------------------------------
def clipped_mean(per_example: torch.Tensor, clip: float, denominator: int) -> tuple[float, int]:
    """(sum_i clip(g_i, -C, C) / denominator, how many were clipped); a non-finite g_i counts as 0.

    The denominator is the expected batch size, never the drawn one: a data-independent divisor
    is what keeps the sensitivity at 2C / B when one example changes.
    """
    g = per_example.detach().to("cpu", torch.float64).reshape(-1)
    g = torch.where(torch.isfinite(g), g, torch.zeros((), dtype=torch.float64))
    clipped = int((g.abs() > clip).sum())
    return float(g.clamp(-clip, clip).sum()) / denominator, clipped


def private_scalar(per_example: torch.Tensor, dp: ExampleDP, generator: torch.Generator) -> tuple[float, int]:
    """The released scalar (sum_i clip(g_i) + N(0, (sigma C)^2)) / B and the number of clipped g_i."""
    mean, clipped = clipped_mean(per_example, dp.clip, dp.batch_size)
    noise = float(torch.randn((), generator=generator, dtype=torch.float64))
    return mean + dp.noise_std * noise, clipped


# -- per-example losses ----------------------------------------------------------------------
def causal_lm_per_example_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example mean token cross-entropy of a causal LM ([batch], float32).

    The model's own `.loss` is one mean over every label token of the batch; DP needs each
    example's loss separately, so the logits are scored here (same shift, same -100 masking).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"].to(logits.device)
    # shift the labels, not the logits (as transformers' own loss does): slicing [batch, seq-1, vocab]
    # out of the logits would copy them; the last position's label is -100 and counts nothing
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                             ignore_index=-100, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1)
    return tokens.sum(dim=1) / counts.clamp_min(1)


# -- accounting (Opacus) ----------------------------------------------------------------------
def require_accountant():
    """Opacus's RDP accountant class; a one-line error naming the extra when it is missing."""
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as err:
        raise ImportError(f"differential privacy accounting needs Opacus: {DP_EXTRA_HINT}") from err
    return RDPAccountant


def gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` of `steps` Poisson-subsampled Gaussian steps (Opacus RDP accountant); 0 for no step."""
    if steps <= 0:
        return 0.0
    accountant = require_accountant()()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=float(delta)))


@functools.lru_cache(maxsize=32)
def epsilon_floor(delta: float) -> float:
    """The smallest epsilon the accountant can certify at `delta`, whatever the noise (its RDP orders end at 63)."""
    return gaussian_epsilon(1e6, 1.0, 1, delta)


def solve_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier whose epsilon after `steps` steps at rate `sample_rate` is <= the target (Opacus's search)."""
    require_accountant()
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # Opacus's search starts from a large multiplier, whose best RDP order is the largest one
            # it tries, and says so; the multiplier it returns is accounted in `gaussian_epsilon`,
            # which keeps the warning (there it would mean a loose bound).
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                              sample_rate=float(sample_rate), steps=max(int(steps), 1),
                                              accountant="rdp", epsilon_tolerance=0.01 * float(target_epsilon)))
    except ValueError as err:
        raise ValueError(f"dp.target_epsilon={target_epsilon:g} at delta={delta:g} is unreachable within the run "
                         f"({steps} steps at sample rate {sample_rate:.4g}; the accountant certifies no less than "
                         f"{epsilon_floor(delta):.3g} with any noise): raise the target or delta") from err

