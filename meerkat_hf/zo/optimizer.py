"""`ZOSGD`: the zeroth-order update as a `torch.optim.Optimizer`, so transformers' schedulers work.

Why an Optimizer at all: `Trainer`, its LR schedulers and its checkpointing all speak to
`optimizer.param_groups`, `step()` and `state_dict()`. ZOSGD has one param group holding the
MeerkatModel's fp32 CPU master `values`, with `lr` and `weight_decay` in it; a scheduler rescales
`lr` exactly as it would for SGD. There are no `.grad` tensors: the trainer hands in projected
gradients (one scalar per perturbation seed) with `accumulate`, and `step()` turns them into a
`zo.ZOStep`, applies it to the master with `zo.apply_step`, writes the weights and records the
step. The recorded steps are the run's virtual path: `zo.replay(model.base_values, history)`
reproduces `model.values` bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from .. import zo
from ..modeling.model import MeerkatModel

logger = logging.getLogger(__name__)

__all__ = ["ZOSGD"]


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD on a `MeerkatModel`'s sparse master (`w <- w - lr (mean_j g_j z_j + wd w)`).

    Args:
        model: the `MeerkatModel` whose `values` are trained; `step()` syncs its weights.
        lr, weight_decay: stored in the single param group (schedulers change `lr` there).
        reduce: optional function applied to the float64 vector of accumulated projected
            gradients before the update, e.g. a mean all-reduce across data-parallel ranks so
            every replica applies the very same step.
        keep_history: record every applied `ZOStep` in `history` (a few dozen bytes a step).

    Accumulation follows `.grad` semantics: projected gradients passed to `accumulate` for the
    same seeds are summed until `step()`. Scale the losses as you would before `backward()`
    (`Trainer` divides by the accumulation steps or by the number of items in the batch), and
    the sum is the projected gradient of the accumulated objective.
    """

    def __init__(
        self,
        model: MeerkatModel,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        keep_history: bool = True,
        max_consecutive_skips: int = 20,
    ):
        if not isinstance(model, MeerkatModel):
            raise TypeError(
                f"ZOSGD trains a MeerkatModel, got {type(model).__name__}; wrap it with "
                "meerkat_hf.get_meerkat_model(model, mask)"
            )
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        super().__init__([model.values], {"lr": float(lr), "weight_decay": float(weight_decay)})
        self.model = model
        self.reduce = reduce
        self.keep_history = keep_history
        self.history: list[zo.ZOStep] = []
        self.last_step: zo.ZOStep | None = None
        self.num_steps = 0  # applied steps
        self.num_skipped = 0  # steps dropped for a non-finite projected gradient
        self.consecutive_skips = 0
        self.max_consecutive_skips = int(max_consecutive_skips)
        self._abs_grad_sum, self._abs_grad_count = 0.0, 0  # for logging, reset by pop_log_stats()
        self._seeds: tuple[int, ...] | None = None
        self._grads: list[float] | None = None
        self._directions: list[torch.Tensor] | None = None

    # -- the accumulator ------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Whether projected gradients wait for `step()`."""
        return self._seeds is not None

    def accumulate(
        self, seeds: Sequence[int], grads: Sequence[float], directions: Sequence[torch.Tensor] | None = None
    ) -> None:
        """Add projected gradients `grads[j]` for perturbation seeds `seeds[j]` (summed until `step()`).

        `directions` may pass the z_j already drawn for these seeds, so `step()` does not
        regenerate them (it matters for full-parameter ZO, where k is the model size).
        """
        seeds = tuple(int(s) for s in seeds)
        grads = [float(g) for g in grads]
        if len(seeds) != len(grads) or not seeds:
            raise ValueError(f"need one projected gradient per seed, got {len(seeds)} seeds and {len(grads)} values")
        if self._seeds is None:
            self._seeds, self._grads = seeds, grads
            self._directions = list(directions) if directions is not None else None
            return
        if seeds != self._seeds:
            raise ValueError(
                "all micro-batches of one optimizer step must use the same perturbation seeds "
                f"(pending {self._seeds}, got {seeds}); call step() between optimizer steps"
            )
        self._grads = [a + b for a, b in zip(self._grads, grads)]

    def _clear(self) -> None:
        self._seeds = self._grads = self._directions = None

    # -- torch.optim.Optimizer ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Apply the accumulated step (skipped, weights untouched, if it is not finite)."""
        if closure is not None:
            raise ValueError("ZOSGD.step() takes no closure: projected gradients come from accumulate()")
        if self._seeds is None:
            logger.debug("ZOSGD.step(): nothing accumulated, no update")
            return
        seeds, grads, directions = self._seeds, self._grads, self._directions
        self._clear()
        vector = torch.tensor(grads, dtype=torch.float64)
        if self.reduce is not None:
            vector = self.reduce(vector).to(device="cpu", dtype=torch.float64)
        grads = tuple(float(g) for g in vector.tolist())
        if not all(math.isfinite(g) for g in grads):
            self.num_skipped += 1
            self.consecutive_skips += 1
            if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
                group = self.param_groups[0]
                raise FloatingPointError(
                    f"{self.consecutive_skips} ZO steps in a row had a NaN/inf loss (lr={group['lr']:g}, "
                    f"weight_decay={group['weight_decay']:g}); the model diverged or eps is too large: lower lr or eps"
                )
            logger.warning(
                "ZO step skipped: non-finite projected gradient %s (a NaN/inf loss, or fzoo losses with no spread); "
                "weights untouched "
                "(%d step(s) skipped so far)", grads, self.num_skipped,
            )
            return
        self.consecutive_skips = 0
        group = self.param_groups[0]
        step = zo.ZOStep(seeds=seeds, grads=grads, lr=float(group["lr"]), weight_decay=float(group["weight_decay"]))
        zo.apply_step(self.model.values, step, directions=directions)
        self.model.sync_weights()
        self.last_step = step
        self.num_steps += 1
        self._abs_grad_sum += sum(abs(g) for g in grads) / len(grads)
        self._abs_grad_count += 1
        if self.keep_history:
            self.history.append(step)
        return

    def pop_log_stats(self) -> dict[str, float]:
        """Mean |projected gradient| over the steps applied since the last call, and the skip count."""
        stats = {"zo_skipped_steps": self.num_skipped}
        if self._abs_grad_count:
            stats["zo_abs_projected_grad"] = self._abs_grad_sum / self._abs_grad_count
        self._abs_grad_sum, self._abs_grad_count = 0.0, 0
        return stats

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: ZO never allocates `.grad` (the accumulator is consumed by `step()`)."""

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Param groups (lr, weight decay) plus the step counters and the recorded virtual path.

        Only plain Python numbers and lists, so `torch.load(weights_only=True)` reads it. The
        master values themselves are checkpointed with the model (`MeerkatModel.save_pretrained`).
        """
        out = super().state_dict()
        out["zo"] = {
            "num_selected": int(self.model.values.numel()),
            "mask_checksum": self.model.mask.checksum,
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
            "history": [[list(s.seeds), list(s.grads), s.lr, s.weight_decay] for s in self.history],
        }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        if extra["mask_checksum"] != self.model.mask.checksum or extra["num_selected"] != self.model.values.numel():
            raise ValueError(
                "this ZOSGD state was saved for another mask "
                f"(checksum {extra['mask_checksum']}, k={extra['num_selected']})"
            )
        self.num_steps = int(extra["num_steps"])
        self.num_skipped = int(extra["num_skipped"])
        self.history = [
            zo.ZOStep(seeds=tuple(int(x) for x in s), grads=tuple(float(x) for x in g), lr=float(lr), weight_decay=float(wd))
            for s, g, lr, wd in extra["history"]
        ]
        self.last_step = self.history[-1] if self.history else None
        self._clear()

    def __repr__(self) -> str:
        group = self.param_groups[0]
        return (
            f"ZOSGD(k={self.model.values.numel()}, lr={group['lr']:g}, weight_decay={group['weight_decay']:g}, "
            f"steps={self.num_steps}, skipped={self.num_skipped})"
        )
