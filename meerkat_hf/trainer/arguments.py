"""`MeerkatZOArguments`: `TrainingArguments` plus the zeroth-order settings, validated once.

Its own module, as TRL keeps `SFTConfig` beside `SFTTrainer`. `MeerkatZOTrainer` turns a plain
`TrainingArguments` into one of these (`MeerkatZOArguments.from_training_arguments`), so every
check runs in `__post_init__`, whichever arguments a script passes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..privacy import check_dp_settings
from ..zo.spsa import ESTIMATORS, check_eps, check_estimator

ZO_LOSSES = ("lm", "candidates", "balanced")


@dataclass
class MeerkatZOArguments(TrainingArguments):
    """`TrainingArguments` plus the zeroth-order settings (all parseable by `HfArgumentParser`)."""

    # The study's recipe (research/RESULTS.md): on the density-1e-5 mask lr 1e-4 stayed stable over hundreds
    # of SPSA steps where 3e-4 and 1e-3 eroded the ranking; Trainer's own default (5e-5) is a backprop lr.
    learning_rate: float = field(default=1e-4, metadata={"help": "ZO-SGD step size (spsa: 1e-4 on a density-1e-5 "
                                                                 "mask; fzoo steps are normalised: search anew)."})
    zo_eps: float = field(
        default=1e-3,
        metadata={"help": "SPSA perturbation scale eps: the loss is evaluated at w + eps z and w - eps z, z ~ N(0, I_k)."},
    )
    zo_num_perturbations: int = field(
        default=1,
        metadata={"help": "q: perturbations per optimizer step (2 forward passes each); their estimates are averaged."},
    )
    zo_estimator: str = field(
        default="spsa",
        metadata={
            "help": "spsa: two-point differences, 2 forwards per perturbation (MeZO, the paper's); fzoo: one-sided "
            "differences over zo_num_perturbations >= 2 directions sharing the unperturbed loss, normalised by the "
            "spread of the perturbed losses (N + 1 forwards for N directions; its lr is a step length, search it anew).",
            "choices": list(ESTIMATORS),
        },
    )
    zo_seed: int | None = field(
        default=None,
        metadata={
            "help": "Base of the perturbation seed stream: step t, perturbation j uses derive_seed(zo_seed, t, j). "
            "Defaults to --seed."
        },
    )
    zo_loss: str = field(
        default="lm",
        metadata={
            "help": "lm: the model's own LM loss on `labels`; candidates: cross-entropy over the label words only "
            "(MeZO-style classification; pass candidate_ids= to the trainer); balanced: the same, class-weighted "
            "by 1/(C * training prior) so that moving the label prior cannot lower it (class_weights= or the "
            "train_dataset's `label` column).",
            "choices": list(ZO_LOSSES),
        },
    )

    dp_clip: float | None = field(
        default=None,
        metadata={"help": "Example-level differential privacy: clip each example's projected gradient to [-C, C] "
                          "(None: no DP). Batches are then Poisson-sampled with rate batch/n and the step's scalar "
                          "gets Gaussian noise of std dp_noise_multiplier * C / batch from a private generator."},
    )
    dp_noise_multiplier: float | None = field(
        default=None, metadata={"help": "Noise multiplier sigma (give this or dp_target_epsilon)."})
    dp_target_epsilon: float | None = field(
        default=None, metadata={"help": "Epsilon at dp_delta after the whole run; the noise multiplier is solved for it."})
    dp_delta: float = field(default=1e-5, metadata={"help": "The delta of the reported (epsilon, delta)."})
    dp_noise_seed: int | None = field(
        default=None,
        metadata={"help": "Tests only: seed the private noise and sampling (None: from `secrets`, unknown to anyone)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # fail at argument time, not after the model is loaded
        check_eps(self.zo_eps)
        q = self.zo_num_perturbations
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"zo_num_perturbations must be an integer >= 1, got {q!r}")
        check_estimator(self.zo_estimator, q)
        if self.zo_loss not in ZO_LOSSES:
            raise ValueError(f"zo_loss must be one of {ZO_LOSSES}, got {self.zo_loss!r}")
        _check_backward_only_options(self)
        if self.dp_enabled:
            check_dp_settings(self.dp_clip, self.dp_noise_multiplier, self.dp_target_epsilon, self.dp_delta, prefix="dp_")
            if self.zo_estimator != "spsa":
                raise ValueError("differential privacy clips per-example two-point scalars: use zo_estimator='spsa'")
            if self.gradient_accumulation_steps != 1:
                raise ValueError("differential privacy clips and noises one Poisson batch per step: "
                                 "set gradient_accumulation_steps=1 (raise the batch size instead)")

    @property
    def dp_enabled(self) -> bool:
        """Whether example-level DP is on (any dp_ setting given)."""
        return any(v is not None for v in (self.dp_clip, self.dp_noise_multiplier, self.dp_target_epsilon))

    @property
    def zo_base_seed(self) -> int:
        """The seed the perturbations derive from: `zo_seed`, else `seed`."""
        return int(self.seed if self.zo_seed is None else self.zo_seed)

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments | None) -> MeerkatZOArguments:
        """`args` itself if it already is one; a plain `TrainingArguments` gets the ZO defaults (drop-in use)."""
        if args is None:
            return cls(output_dir="tmp_trainer")
        if isinstance(args, cls):
            return args
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init})


def _check_backward_only_options(args: TrainingArguments) -> None:
    """Options that only make sense with a backward pass, or that break the two-point estimate."""
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        raise ValueError(
            "gradient/activation checkpointing saves memory in backward(); zeroth-order training runs no backward, "
            "so it would only slow the forward passes. Set gradient_checkpointing=False."
        )
    if getattr(args, "deepspeed", None):
        raise ValueError("DeepSpeed shards gradients and optimizer states, which ZO training does not have; remove deepspeed=")
    if getattr(args, "fsdp", None):
        raise ValueError(
            "FSDP is not supported by MeerkatZOTrainer: the sparse master lives outside the sharded parameters. "
            "Use plain data parallelism (accelerate launch / torchrun) instead."
        )
    if getattr(args, "neftune_noise_alpha", None) is not None:
        raise ValueError(
            "neftune_noise_alpha adds fresh random noise to every forward pass, so L(w + eps z) - L(w - eps z) would "
            "measure the noise, not the loss; unset it for zeroth-order training"
        )
