"""Example-level DP across `MeerkatZOTrainer` checkpoints: fresh noise on resume, and an honest epsilon.

Two things go wrong if a DP run's resume is treated like any other:

* **Noise reuse.** Restarting the private generator at the run's start would draw, after the
  resume, noise values the run already released: the difference of two released scalars then
  carries no noise at all. Here every step keys its own streams by the global step (the Poisson
  batch of step t and the noise of step t), so no value is ever drawn for two steps, and a seeded
  run resumed from a checkpoint is bit for bit the uninterrupted run. (With the default secret
  seed every stream is seeded from `secrets` anyway.)
* **Understated epsilon.** A multiplier solved for a target epsilon over N planned steps is
  too small for more steps; the accountant would compose every step under the *new*, larger
  multiplier and report less than the first N steps spent. A checkpoint therefore records the
  settings the accountant used (`dp_state.json`); resuming with other settings, with DP switched
  on or off, or with a target epsilon and another number of steps is refused before any step.
  A fixed multiplier may be extended: it composes step by step.

Why not Trainer's RNG checkpointing: it restores the *global* generators, which the private
noise must never use (a user's seed, or any library drawing from them, would reveal it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .. import privacy
from ..hub.artifacts import write_files_atomically
from ..modeling.model import DELTA_CONFIG_NAME

DP_STATE_NAME = "dp_state.json"
BATCH_STREAM, NOISE_STREAM = 1, 2  # the private streams' first coordinate (then the global step)

# what the accountant's epsilon depends on; none may change when a DP run is resumed
_FIXED = ("clip", "delta", "sample_rate", "noise_seed", "target_epsilon")


def dp_state(dp: privacy.ExampleDP, delta: float, target_epsilon: float | None, planned_steps: int) -> dict:
    return {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier, "delta": delta, "sample_rate": dp.sample_rate,
            "noise_seed": dp.noise_seed, "target_epsilon": target_epsilon, "planned_steps": planned_steps}


def save_dp_state(folder: str | os.PathLike, state: dict) -> None:
    """Write `dp_state.json` atomically (a checkpoint never holds half a record)."""
    write_files_atomically(folder, {DP_STATE_NAME: (json.dumps(state, indent=2) + "\n").encode()})


def check_dp_resume(folder: str | os.PathLike, now: dict | None) -> dict | None:
    """Refuse to resume `folder` with other privacy settings than it was trained with (None: DP off).

    Returns the checkpoint's record (None for a non-private checkpoint)."""
    path = Path(folder) / DP_STATE_NAME
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is None and now is None:
        return None
    if saved is None:
        if "dp_epsilon" in _training_summary(folder):
            raise ValueError(f"cannot resume {folder}: a private run of an older meerkat-hf, which did not record "
                             "the privacy settings its epsilon depends on; start a new run")
        raise ValueError(f"cannot resume {folder} with differential privacy: its steps were trained without it, "
                         "so no epsilon bounds them; start a new run")
    if now is None:
        raise ValueError(f"cannot resume {folder} without differential privacy: it was trained with it "
                         "(pass the same dp_ settings, or start a new run)")
    changed = [k for k in _FIXED if not _same(saved.get(k), now.get(k))]
    if now.get("target_epsilon") is None and not _same(saved["noise_multiplier"], now["noise_multiplier"]):
        changed.append("noise_multiplier")
    if now.get("target_epsilon") is not None and saved["planned_steps"] != now["planned_steps"]:
        changed.append(f"planned steps ({saved['planned_steps']} -> {now['planned_steps']}: the noise was solved "
                       "for the run's length)")
    if changed:
        raise ValueError(f"cannot resume {folder}: DP settings {changed} differ from the checkpointed run's")
    return saved


def _training_summary(folder: str | os.PathLike) -> dict:
    """The `training` section MeerkatModel.save_pretrained wrote into the checkpoint's config ({} if none)."""
    path = Path(folder) / DELTA_CONFIG_NAME
    try:
        return json.loads(path.read_text()).get("training") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


class PoissonBatches:
    """A batch sampler drawing Poisson batches (what the accountant assumes), batch t from the private
    stream keyed by t; `len` is ceil(n / B) steps an epoch.

    `first_index` is the global step of the first batch this sampler yields: a resumed run's Trainer
    fast-forwards through the batches of its epoch it already trained, so those are re-drawn (and
    discarded) from their own keys and step t's batch is the uninterrupted run's.
    """

    def __init__(self, num_examples: int, dp: privacy.ExampleDP, first_index: int = 0):
        self.num_examples, self.dp, self.index = num_examples, dp, first_index

    @staticmethod
    def steps_per_epoch(num_examples: int, batch_size: int) -> int:
        return math.ceil(num_examples / batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch(self.num_examples, self.dp.batch_size)

    def __iter__(self):
        for _ in range(len(self)):
            generator = self.dp.generator(BATCH_STREAM, self.index)
            self.index += 1
            yield privacy.poisson_indices(self.num_examples, self.dp.sample_rate, generator)


class EmptyAware:
    """The data collator, except that an empty Poisson batch becomes {} (a noise-only step)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        return self.collator(features) if features else {}
