"""`MeerkatZOTrainer`, a drop-in `transformers.Trainer` for ZO training, its arguments and its DP resume rules."""

from .arguments import ZO_LOSSES, MeerkatZOArguments
from .zo_trainer import TRAINING_ARGS_NAME, CandidateAccuracy, MeerkatZOTrainer

__all__ = ["TRAINING_ARGS_NAME", "ZO_LOSSES", "CandidateAccuracy", "MeerkatZOArguments", "MeerkatZOTrainer"]
