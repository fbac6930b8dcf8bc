"""`MeerkatSFTTrainer`: TRL's `SFTTrainer` (chat templates, completion-only labels, packing) trained by ZO.

All the zeroth-order logic is `MeerkatZOTrainer`'s (this class only puts it in front of `SFTTrainer` in
the MRO); what this file adds is the glue TRL needs around a `MeerkatModel`:
* TRL's fused LM head (per-token log-probabilities without the full logits) patches the model it is
  given and expects `model.base_model` to be the backbone. For a `MeerkatModel` that is the whole causal
  LM, so the head is moved onto the causal LM, under the forward-precision wrapper when there is one.
* ZO evaluates its perturbed losses with dropout off (`model.eval()`), and TRL files its token metrics
  and logs under "train" or "eval" by `model.training`; the wrapper's own flag (not its children's) is
  set for the duration of a training loss and of a training log, so metrics land under the right prefix.
The loss is TRL's per-token negative log-likelihood over the completion tokens; no `.grad` is ever made.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

from .arguments import MeerkatZOArguments
from .zo_trainer import MeerkatZOTrainer

try:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.utils import add_fused_lm_head
except ImportError as err:  # the optional [trl] extra
    raise ImportError("MeerkatSFTTrainer needs TRL: pip install 'meerkat-hf[trl]'") from err

_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer's loss and token metrics read


@dataclass
class MeerkatSFTConfig(MeerkatZOArguments, SFTConfig):
    """`SFTConfig` (dataset, chat template, completion_only_loss, packing, max_length) plus the ZO settings of
    `MeerkatZOArguments` (zo_eps, zo_num_perturbations, zo_estimator, ...). `zo_loss` is "lm": SFT's per-token loss."""


class MeerkatSFTTrainer(MeerkatZOTrainer, SFTTrainer):
    """Instruction tuning of a `MeerkatModel` with forward passes only: `SFTTrainer`'s data side, ZO's optimizer."""

    def __init__(self, model=None, args: MeerkatSFTConfig | None = None, *trainer_args, **trainer_kwargs):
        if args is not None and not isinstance(args, MeerkatSFTConfig):
            raise TypeError(f"MeerkatSFTTrainer needs MeerkatSFTConfig arguments, got {type(args).__name__}")
        if args is not None and args.zo_loss != "lm":
            raise ValueError(f"MeerkatSFTTrainer trains SFT's per-token LM loss: zo_loss must be 'lm' (got {args.zo_loss!r})")
        self._zo_loss_active = False
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._move_fused_head()

    def _move_fused_head(self) -> None:
        """Put TRL's fused LM head on the causal LM (its `base_model` is the backbone), not on the wrapper."""
        mm = self.meerkat_model
        mm.__dict__.pop("forward", None)  # SFTTrainer patched the wrapper, whose base_model is the whole LM
        base = mm.base_model
        add_fused_lm_head(base, outputs=_FUSED_OUTPUTS)
        if mm.forward_precision in ("bf16-mixed", "autocast"):
            # the fused path calls the backbone directly, around the precision wrapper: give it the same autocast
            from ..modeling.precision import autocast_for, model_device

            fused = base.forward

            @functools.wraps(fused)
            def fused_under_autocast(*args, **kwargs):
                with autocast_for(mm.forward_precision, model_device(base)):
                    return fused(*args, **kwargs)

            base.forward = fused_under_autocast

    @contextlib.contextmanager
    def _wrapper_mode(self, training: bool):
        """Set only the wrapper's `training` flag (its children keep theirs: dropout stays off under ZO)."""
        model = self.model
        before = model.training
        model.training = training
        try:
            yield
        finally:
            model.training = before

    def compute_zo_loss(self, model, inputs, num_items_in_batch=None):
        with self._wrapper_mode(True):  # SFTTrainer files the token metrics of a training loss under "train"
            return super().compute_zo_loss(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        evaluating = any(key.startswith("eval_") for key in logs)
        with self._wrapper_mode(not evaluating):
            super().log(logs, start_time)
