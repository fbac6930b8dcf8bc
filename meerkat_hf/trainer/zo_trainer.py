"""`MeerkatZOTrainer`: swap it for `transformers.Trainer` and train a `MeerkatModel` with forward passes only.

The trainer keeps Trainer's loop (data, accumulation, schedulers, logging, evaluation,
checkpoints, callbacks) and changes only what ZO changes, at stable seams:

* `training_step`: two forward passes per perturbation under `torch.no_grad()` in eval mode
  (dropout off, so both passes evaluate the same function) and `zo.projected_gradient`; the
  scalars go to the optimizer. The step seed is `zo.derive_seed(zo_seed, global_step, j)`:
  resumed runs and every data-parallel rank regenerate the same perturbations.
* `create_optimizer`: `ZOSGD` on the fp32 master, with `learning_rate` / `weight_decay`.
* `_save` / `_load_from_checkpoint` / `_load_best_model`: checkpoints hold the sparse delta
  (`MeerkatModel.save_pretrained`), not a full state dict.

Gradient accumulation and data parallelism (the definition this trainer implements):
    a micro-batch contributes the SPSA estimate of the loss exactly as `Trainer` would scale it
    for `backward()`, estimates are summed over the micro-batches of an optimizer step (all with
    the step's seeds) and averaged across ranks (like DDP averages gradients). For causal-LM
    losses, where Trainer passes `num_items_in_batch`, each micro-batch loss is its token-loss sum
    divided by the number of label tokens of the whole step (all micro-batches, all ranks), so
    `gradient_accumulation_steps=G` with batch b is one ZO step on the G*b batch, and N ranks with
    batch b are one step on the N*b batch, both up to float rounding. Losses that are per-batch
    means (no `num_items_in_batch`, e.g. `zo_loss="candidates"`) are divided by G, which is the
    same thing when micro-batches have equal size.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import EvalPrediction, get_last_checkpoint
from transformers.utils.generic import can_return_loss, find_labels

from .. import privacy
from .. import zo
from .dp_resume import NOISE_STREAM, EmptyAware, PoissonBatches, check_dp_resume, dp_state, save_dp_state
from ..classification_metrics import accuracy, balanced_accuracy, macro_f1
from ..hub.artifacts import write_files_atomically
from ..modeling.model import DELTA_WEIGHTS_NAME, MeerkatModel, forward_module
from ..modeling.precision import warn_if_eps_below_bf16_resolution, warn_if_fp32_on_cuda
from ..tasks import IGNORE_INDEX, balanced_class_weights, candidate_loss, prediction_positions
from .arguments import ZO_LOSSES, MeerkatZOArguments
from ..zo.optimizer import ZOSGD

logger = logging.getLogger(__name__)

__all__ = ["ZO_LOSSES", "CandidateAccuracy", "MeerkatZOArguments", "MeerkatZOTrainer"]

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer writes next to a checkpoint


class MeerkatZOTrainer(Trainer):
    """A `transformers.Trainer` that trains a `MeerkatModel` with seeded sparse SPSA (no backward pass).

    Extra constructor argument:
        candidate_ids: token ids of the label words (class order), required for
            `zo_loss="candidates"` and `"balanced"`; see `meerkat_hf.tasks.candidate_token_ids`.
        class_weights: per-class loss weights for `zo_loss="balanced"`; by default
            `balanced_class_weights` of the train_dataset's `label` column.

    `args` may be a `MeerkatZOArguments` or a plain `TrainingArguments`, converted once to a
    `MeerkatZOArguments` with the ZO defaults (and validated there).
    After training, `trainer.zo_optimizer.history` is the run's virtual path (seeds, scalars, lr).
    """

    def __init__(self, model=None, args=None, *trainer_args, candidate_ids=None, class_weights=None, **trainer_kwargs):
        if model is not None:
            _check_model(model)
        args = MeerkatZOArguments.from_training_arguments(args)  # converted once, validated there
        if args.n_gpu > 1:  # Trainer would wrap the model in nn.DataParallel, whose replicas ZO cannot perturb
            raise ValueError(
                f"{args.n_gpu} GPUs are visible to one process, so Trainer would use nn.DataParallel, which "
                "MeerkatZOTrainer does not support: run one process per GPU with `accelerate launch` or `torchrun`, "
                "or set CUDA_VISIBLE_DEVICES to one GPU")
        if args.zo_loss in ("candidates", "balanced") and candidate_ids is None:
            raise ValueError(
                f"zo_loss={args.zo_loss!r} needs the label words' token ids: "
                "MeerkatZOTrainer(..., candidate_ids=meerkat_hf.tasks.candidate_token_ids(tokenizer, task))"
            )
        self.candidate_ids = None if candidate_ids is None else torch.as_tensor(candidate_ids, dtype=torch.long).reshape(-1)
        self.class_weights = None
        if args.zo_loss == "balanced":
            self.class_weights = _class_weights(class_weights, self.candidate_ids.numel(),
                                                trainer_kwargs.get("train_dataset"))
        elif class_weights is not None:
            raise ValueError(f"class_weights= is used by zo_loss='balanced' only (zo_loss={args.zo_loss!r})")
        if trainer_kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("MeerkatZOTrainer always uses ZOSGD; drop optimizer_cls_and_kwargs")
        optimizers = trainer_kwargs.get("optimizers")
        if optimizers is not None and optimizers[0] is not None and not isinstance(optimizers[0], ZOSGD):
            raise TypeError(f"MeerkatZOTrainer needs a ZOSGD optimizer, got {type(optimizers[0]).__name__}")
        self.meerkat_model: MeerkatModel | None = model
        self._zo_direction_cache: tuple[int, tuple[torch.Tensor, ...]] | None = None
        self._warned_grad_norm = False

        super().__init__(model, args, *trainer_args, **trainer_kwargs)

        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "the accelerate config enables DeepSpeed/FSDP; MeerkatZOTrainer supports single-device and plain "
                "data-parallel training only"
            )
        if getattr(self.accelerator, "scaler", None) is not None:
            # A GradScaler scales a loss for backward and checks .grad for inf: with no backward it
            # would find no gradients and refuse to step. Forward autocast stays on.
            logger.info("fp16 mixed precision: the GradScaler is disabled (ZO has no backward pass)")
            self.accelerator.scaler = None
        self._fix_model_introspection()
        self._prepare_forward_only()
        self._apply_forward_precision()
        self.dp: privacy.ExampleDP | None = None  # set by train() when args.dp_enabled
        self._dp_record: dict | None = None  # what a checkpoint records for the accountant (trainer_privacy)
        self._dp_first_batch = 0  # the global step of the Poisson sampler's first batch
        if self.args.dp_enabled and self.accelerator.num_processes > 1:
            raise ValueError("differential privacy in MeerkatZOTrainer runs in one process (the Poisson batch and the "
                             "noise are drawn once per step); launch without data parallelism")

    def _prepare_forward_only(self) -> None:
        """Have accelerate prepare the MeerkatModel in evaluation mode: placement, autocast, compile, no DDP.

        DDP exists to all-reduce gradients after backward; ZO has neither (the projected
        gradients are all-reduced by ZOSGD instead). accelerate would still wrap the model on
        multi-CPU, and torch refuses DDP for a module with no trainable parameter.
        """
        prepare_model = self.accelerator.prepare_model

        def prepare_model_forward_only(model, device_placement=None, evaluation_mode=False):
            forward_only = evaluation_mode or isinstance(model, MeerkatModel)
            return prepare_model(model, device_placement=device_placement, evaluation_mode=forward_only)

        self.accelerator.prepare_model = prepare_model_forward_only

    # -- the model ------------------------------------------------------------------------
    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        _check_model(model)
        self.meerkat_model = model
        self._apply_forward_precision()
        return model

    def _apply_forward_precision(self) -> None:
        """`bf16=True`: every forward (training, every loss, evaluation) in bf16-mixed over the fp32 master.

        Trainer's own bf16 only autocasts `model.forward` through accelerate; the candidate and DP losses
        call the base model directly, so the precision is set on the MeerkatModel itself
        (`MeerkatModel.set_forward_precision`, meerkat_hf.modeling.precision), which every path goes through.
        """
        if self.meerkat_model is not None and getattr(self.args, "bf16", False):
            self.meerkat_model.set_forward_precision("bf16-mixed")
            warn_if_eps_below_bf16_resolution("bf16-mixed", float(self.args.zo_eps))
        elif self.meerkat_model is not None:
            warn_if_fp32_on_cuda(self.meerkat_model.base_model, self.meerkat_model.forward_precision)

    def _inner_model(self):
        """The transformers model under the MeerkatModel (and under PEFT, if any)."""
        inner = self.meerkat_model.base_model
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    def _fix_model_introspection(self) -> None:
        """Read labels and `return_loss` from the wrapped model, not from `MeerkatModel.forward(*args, **kwargs)`.

        Trainer inspects `type(model).forward`; for a MeerkatModel that would find no label
        argument, and evaluation would silently stop reporting `eval_loss`.
        """
        inner = self._inner_model()
        if self.args.label_names is None:
            self.label_names = find_labels(inner.__class__)
        self.can_return_loss = can_return_loss(inner.__class__)

    def _set_signature_columns_if_needed(self):
        # Same reason: `remove_unused_columns` keeps what the *wrapped* model's forward accepts,
        # so a script behaves exactly as it did with the plain model.
        if self._signature_columns is None:
            columns = list(inspect.signature(self._inner_model().forward).parameters)
            self._signature_columns = columns + list(set(["label", "label_ids"] + self.label_names))

    # -- differential privacy --------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = self._resume_folder(resume_from_checkpoint)
        if self.args.dp_enabled:
            self._setup_dp(checkpoint)
        elif checkpoint is not None:
            check_dp_resume(checkpoint, None)
        if self.meerkat_model is not None:  # Trainer's own count is of nn.Parameters with requires_grad: 0 under ZO
            k, total = self.meerkat_model.get_nb_trainable_parameters()
            logger.info("Meerkat: %s trainable coordinates of %s (%.4f%%); Trainer's 'Number of trainable parameters' "
                        "counts nn.Parameters with requires_grad, which ZO never sets", f"{k:,}", f"{total:,}",
                        100 * k / max(total, 1))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _resume_folder(self, resume_from_checkpoint) -> str | None:
        """The checkpoint folder `train(resume_from_checkpoint=...)` will load (Trainer's own rule), or None."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if isinstance(resume_from_checkpoint, bool):
            folder = get_last_checkpoint(self.args.output_dir)
            if folder is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            return folder
        return str(resume_from_checkpoint)

    def _dp_planned_steps(self, num_examples: int) -> int:
        a = self.args
        if a.max_steps and a.max_steps > 0:
            return int(a.max_steps)
        per_epoch = math.ceil(num_examples / a.per_device_train_batch_size)
        return max(1, math.ceil(a.num_train_epochs * per_epoch))

    def _setup_dp(self, checkpoint: str | None = None) -> None:
        """Resolve the noise multiplier (solving a target epsilon) before the first step: an unreachable
        target, or a resume with other privacy settings (`trainer_privacy`), is an error now, not after training."""
        a = self.args
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("differential privacy needs a train_dataset with a length (the Poisson rate is batch / n)")
        n, batch = len(self.train_dataset), a.per_device_train_batch_size
        sigma, planned = a.dp_noise_multiplier, self._dp_planned_steps(n)
        if sigma is None:
            sigma = privacy.solve_noise_multiplier(a.dp_target_epsilon, a.dp_delta, min(1.0, batch / n), planned)
        else:
            privacy.require_accountant()  # epsilon is reported live: fail now if the extra is missing
        dp = privacy.ExampleDP(float(a.dp_clip), float(sigma), batch, n, a.dp_noise_seed)
        record = dp_state(dp, a.dp_delta, a.dp_target_epsilon, planned)
        self._dp_first_batch = 0
        if checkpoint is not None:
            check_dp_resume(checkpoint, record)
            # Trainer fast-forwards through the resumed epoch's trained batches: the sampler starts at the
            # epoch's first step so that they are re-drawn from their own keys (see PoissonBatches)
            done = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
            self._dp_first_batch = done if a.ignore_data_skip else done - done % PoissonBatches.steps_per_epoch(n, batch)
        self.dp, self._dp_record = dp, record
        logger.info("example-level DP: clip %g, noise multiplier %.4g, Poisson rate %.4g, delta %g",
                    self.dp.clip, sigma, self.dp.sample_rate, a.dp_delta)

    def get_train_dataloader(self):
        """With DP: Poisson batches (each example joins with probability batch / n, from the private
        generator; possibly empty), what the accountant assumes. Without: Trainer's own loader."""
        if self.dp is None:
            return super().get_train_dataloader()
        import datasets

        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        sampler = PoissonBatches(len(dataset), self.dp, self._dp_first_batch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=EmptyAware(collator),
                                             num_workers=0, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def _per_example_loss(self, model, inputs) -> torch.Tensor:
        with self.compute_loss_context_manager():
            if self.args.zo_loss in ("candidates", "balanced"):
                return candidate_loss(forward_module(model), inputs, self.candidate_ids, self.class_weights,
                                      reduction="none")
            return privacy.causal_lm_per_example_loss(forward_module(model), inputs)

    def _dp_training_step(self, model, inputs) -> torch.Tensor:
        """Per-example scalars from the same 2q forward passes, clipped, averaged over the expected batch
        size, plus private noise: the noised scalar is what ZOSGD applies (and what the history records)."""
        seeds, directions = self._step_directions()
        losses: list[torch.Tensor] = []
        empty = "input_ids" not in inputs
        noise = self.dp.generator(NOISE_STREAM, self.state.global_step)  # this step's own stream: never reused

        def loss_fn() -> torch.Tensor:
            per_example = self._per_example_loss(model, inputs).detach()
            losses.append(per_example.float().mean())
            return per_example

        grads = []
        for z in directions:
            per_example = (torch.zeros(0, dtype=torch.float64) if empty else
                           zo.projected_gradients_per_example(self.meerkat_model, loss_fn, z, float(self.args.zo_eps)))
            grads.append(privacy.private_scalar(per_example, self.dp, noise)[0])
        self.zo_optimizer.accumulate(seeds, grads, directions)
        if not losses:
            return torch.zeros((), device=self.args.device)
        return torch.stack(losses).mean().to(self.args.device)

    def dp_epsilon(self) -> float | None:
        """Epsilon at `dp_delta` spent so far (Opacus RDP, the steps taken); None without DP."""
        if self.dp is None:
            return None
        return privacy.gaussian_epsilon(self.dp.noise_multiplier, self.dp.sample_rate, self.state.global_step,
                                        self.args.dp_delta)

    # -- optimizer ------------------------------------------------------------------------
    @property
    def zo_optimizer(self) -> ZOSGD | None:
        """The `ZOSGD` under accelerate's optimizer wrapper (None before training starts)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, ZOSGD):
            opt = getattr(opt, "optimizer", None)
        return opt

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            if self.args.optim not in ("adamw_torch", "adamw_torch_fused"):
                logger.info("optim=%s is ignored: MeerkatZOTrainer uses ZOSGD", self.args.optim)
            self.optimizer = ZOSGD(self.meerkat_model, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        opt = self.zo_optimizer
        if opt.model is not self.meerkat_model:
            raise ValueError("the ZOSGD optimizer was built for another MeerkatModel than the trainer's model")
        if self.accelerator.num_processes > 1 and opt.reduce is None:
            opt.reduce = self._mean_over_processes
        a = self.args
        logger.info(
            "Meerkat ZO: k=%d trainable coordinates (%s mask), estimator=%s, q=%d, eps=%g, seed=%d, loss=%s, "
            "lr=%g, weight_decay=%g, forwards=%s, processes=%d", self.meerkat_model.num_selected,
            self.meerkat_model.mask.config.method, a.zo_estimator, a.zo_num_perturbations, a.zo_eps, a.zo_base_seed,
            a.zo_loss, a.learning_rate, a.weight_decay, self.meerkat_model.forward_precision,
            self.accelerator.num_processes,
        )
        return self.optimizer

    def _mean_over_processes(self, grads: torch.Tensor) -> torch.Tensor:
        """All-reduce (mean) the projected gradients so every replica applies the same step."""
        return self.accelerator.reduce(grads.to(self.accelerator.device), reduction="mean").cpu()

    # No gradient tensors: nothing to clip, and a gradient norm of 0 would be a misleading log.
    def _clip_grad_norm(self, model):
        if not self._warned_grad_norm:
            logger.info("max_grad_norm=%s is ignored: ZO steps have no gradient tensors to clip", self.args.max_grad_norm)
            self._warned_grad_norm = True

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    # -- the ZO step ----------------------------------------------------------------------
    def _step_directions(self) -> tuple[tuple[int, ...], tuple[torch.Tensor, ...]]:
        """Seeds and z of the current optimizer step, drawn once and shared by its micro-batches."""
        step = self.state.global_step
        seeds = tuple(zo.derive_seed(self.args.zo_base_seed, step, j) for j in range(self.args.zo_num_perturbations))
        cached = self._zo_direction_cache
        if cached is None or cached[0] != step:
            k = self.meerkat_model.num_selected
            cached = (step, tuple(zo.gaussian_direction(s, k) for s in seeds))
            self._zo_direction_cache = cached
        return seeds, cached[1]

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """2q forward passes, no backward: hand the projected gradients to ZOSGD, return the mean loss."""
        model.eval()  # dropout off: both passes must evaluate the same function
        if self.zo_optimizer is None:
            raise RuntimeError("training_step needs the ZOSGD optimizer: call create_optimizer() first (train() does)")
        if self.dp is not None:  # an empty Poisson batch is a noise-only step, not an error
            return self._dp_training_step(model, self._prepare_inputs(inputs) if inputs else inputs)
        inputs = self._prepare_inputs(inputs)
        seeds, directions = self._step_directions()
        losses: list[torch.Tensor] = []

        def loss_fn() -> torch.Tensor:
            loss = self.compute_zo_loss(model, inputs, num_items_in_batch).detach()
            losses.append(loss.float().reshape(()))
            return loss

        opt = self.zo_optimizer
        if opt is None:
            raise RuntimeError("training_step needs the ZOSGD optimizer: call create_optimizer() first (train() does)")
        # None (fzoo: every perturbed loss equal, nothing to normalise by) skips the step like a NaN loss
        grads = zo.step_scalars(self.meerkat_model, loss_fn, directions, float(self.args.zo_eps),
                                self.args.zo_estimator) or [float("nan")] * len(directions)
        opt.accumulate(seeds, grads, directions)
        return torch.stack(losses).mean().to(self.args.device)

    def compute_zo_loss(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The loss one micro-batch contributes, scaled for accumulation exactly as Trainer scales it for backward."""
        if self.args.zo_loss in ("candidates", "balanced"):
            with self.compute_loss_context_manager():
                loss = candidate_loss(forward_module(model), inputs, self.candidate_ids, self.class_weights)
            scaled = False  # a per-batch mean over examples
        else:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:  # Trainer's own rule (training_step)
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                    self.compute_loss_func is not None
                )
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if not scaled:
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        return loss

    # -- logging --------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        opt = self.zo_optimizer
        if opt is not None and "loss" in logs:
            logs = {**logs, **opt.pop_log_stats()}
            if self.dp is not None:
                logs["dp_epsilon"] = self.dp_epsilon()
        super().log(logs, start_time)

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save the mask and the sparse values (kilobytes to megabytes), never the dense weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        summary = self.meerkat_training_summary()
        self.meerkat_model.save_pretrained(output_dir, training_summary=summary)
        if self._dp_record is not None:  # what a resume must not change (trainer_privacy)
            save_dp_state(output_dir, self._dp_record)
        logger.info("saved Meerkat sparse delta (k=%d) to %s", self.meerkat_model.num_selected, output_dir)
        self._save_processing_class(output_dir)

    def meerkat_training_summary(self) -> dict:
        """What the delta's card and meerkat_config.json record about this run."""
        opt = self.zo_optimizer
        summary = {
            "trainer": "MeerkatZOTrainer",
            "global_step": self.state.global_step,
            "zo_eps": float(self.args.zo_eps),
            "zo_num_perturbations": self.args.zo_num_perturbations,
            "zo_estimator": self.args.zo_estimator,
            "forward_precision": self.meerkat_model.forward_precision,
            "zo_seed": self.args.zo_base_seed,
            "zo_loss": self.args.zo_loss,
            "learning_rate": self.args.learning_rate,
            "zo_skipped_steps": 0 if opt is None else opt.num_skipped,
        }
        if self.dp is not None:
            summary.update({"differential_privacy": "example-level (per-example clipped ZO scalars, Poisson sampling, "
                                                    "private Gaussian noise; Opacus RDP accountant)",
                            "dp_clip": self.dp.clip, "dp_noise_multiplier": self.dp.noise_multiplier,
                            "dp_epsilon": self.dp_epsilon(), "dp_delta": self.args.dp_delta})
        return summary

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """The Meerkat card (mask, base, training summary, license) with Trainer's last evaluation merged in.

        Trainer's own `create_model_card` (called by `push_to_hub`) writes a generic transformers card over
        README.md; the delta's card is what tells a reader how to load and trust this folder."""
        if not self.is_world_process_zero():
            return
        summary = self.meerkat_training_summary()
        for row in self.state.log_history:  # the last value of each evaluation metric
            summary.update({k: v for k, v in row.items() if k.startswith("eval_") and isinstance(v, (int, float))})
        datasets = [dataset] if isinstance(dataset, str) else (list(dataset) if dataset else None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = self.meerkat_model.model_card(self.args.hub_model_id or self.args.output_dir, summary, datasets,
                                             license=license, tags=tags, language=language)
        write_files_atomically(self.args.output_dir, {"README.md": str(card).encode()})

    def _save_processing_class(self, output_dir: str) -> None:
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_delta(self, folder: str) -> None:
        if not (Path(folder) / DELTA_WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{folder} has no {DELTA_WEIGHTS_NAME}: not a MeerkatZOTrainer checkpoint "
                "(dense Trainer checkpoints cannot be resumed as Meerkat runs)"
            )
        self.meerkat_model.load_delta(folder)
        logger.info("loaded Meerkat sparse delta (k=%d) from %s", self.meerkat_model.num_selected, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_delta(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("loading best model from %s (score: %s)", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_delta(self.state.best_model_checkpoint)


def _class_weights(given, num_classes: int, train_dataset) -> torch.Tensor:
    """`class_weights=` as a float tensor, or the balanced weights of the training labels."""
    if given is not None:
        weights = torch.as_tensor(given, dtype=torch.float32).reshape(-1)
        if weights.numel() != num_classes or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"class_weights must be {num_classes} finite numbers >= 0 (one per label word), got {given!r}")
        return weights
    columns = getattr(train_dataset, "column_names", None) or []
    if "label" not in columns:
        raise ValueError("zo_loss='balanced' needs class_weights= or a train_dataset with a `label` column "
                         "(meerkat_hf.tasks.balanced_class_weights(labels, num_classes))")
    return balanced_class_weights(train_dataset["label"], num_classes)


def _check_model(model) -> None:
    if not isinstance(model, MeerkatModel):
        raise TypeError(
            f"MeerkatZOTrainer trains a MeerkatModel, got {type(model).__name__}. Wrap your model first: "
            "model = meerkat_hf.get_meerkat_model(model, mask) (mask from compute_mask or SparseMask.from_pretrained)"
        )


class CandidateAccuracy:
    """Offline accuracy over the label words for `Trainer.evaluate` (prompt classification).

    Use the training encoding for the eval set (`encode_classification(..., include_label_word=True)`,
    so `labels` marks the gold label token) and pass both hooks::

        acc = CandidateAccuracy(candidate_ids)
        MeerkatZOTrainer(..., compute_metrics=acc, preprocess_logits_for_metrics=acc.preprocess_logits_for_metrics)

    `preprocess_logits_for_metrics` keeps only the candidate logits at the predicting position
    ([batch, classes] instead of [batch, seq, vocab]), so evaluation memory stays small.
    """

    def __init__(self, candidate_ids: Sequence[int] | torch.Tensor):
        self.candidate_ids = torch.as_tensor(candidate_ids, dtype=torch.long).reshape(-1)
        if self.candidate_ids.numel() < 2:
            raise ValueError("CandidateAccuracy needs the token ids of at least two label words")

    def preprocess_logits_for_metrics(self, logits, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        positions = prediction_positions({"labels": labels}).to(logits.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, positions][:, self.candidate_ids.to(logits.device)]

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        scores = torch.as_tensor(eval_pred.predictions)
        labels = torch.as_tensor(eval_pred.label_ids)
        if scores.dim() != 2 or scores.shape[1] != self.candidate_ids.numel():
            raise ValueError(
                f"expected [examples, {self.candidate_ids.numel()}] candidate scores, got {tuple(scores.shape)}: "
                "pass preprocess_logits_for_metrics=CandidateAccuracy.preprocess_logits_for_metrics"
            )
        supervised = labels != IGNORE_INDEX
        gold = labels[torch.arange(labels.shape[0]), supervised.int().argmax(dim=1)]
        match = gold[:, None] == self.candidate_ids[None, :]
        if not bool(match.any(dim=1).all()):
            raise ValueError("an eval label token is not one of the candidate tokens")
        preds, gold_class = scores.argmax(dim=-1), match.int().argmax(dim=1)
        num_classes = self.candidate_ids.numel()
        return {
            "accuracy": accuracy(preds, gold_class),
            # the prior cannot fool these (a constant guess scores 1 / num_classes)
            "balanced_accuracy": balanced_accuracy(preds.numpy(), gold_class.numpy(), num_classes),
            "macro_f1": macro_f1(preds.numpy(), gold_class.numpy(), num_classes),
        }

