"""meerkat-hf: zeroth-order federated fine-tuning of causal LMs with transferable sparsity.

The trainer is imported lazily: `import meerkat_hf` for masks alone does not pay for
`transformers.Trainer` (and its optional integrations).
"""

from .calibration import SelfGenerated
from .compute import compute_mask
from .config import SparseMaskConfig
from .mask import MaskMismatchError, SparseMask
from .mask_cache import get_or_compute_mask
from .model import MeerkatModel, get_meerkat_model

__version__ = "0.1.0"

_LAZY = {"MeerkatZOTrainer": "trainer", "MeerkatZOArguments": "training_args", "CandidateAccuracy": "trainer",
         "ZOSGD": "zo_optimizer", "lora_mask": "baselines", "full_mask": "baselines"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CandidateAccuracy",
    "MaskMismatchError",
    "MeerkatModel",
    "MeerkatZOArguments",
    "MeerkatZOTrainer",
    "SelfGenerated",
    "SparseMask",
    "SparseMaskConfig",
    "ZOSGD",
    "compute_mask",
    "full_mask",
    "get_meerkat_model",
    "get_or_compute_mask",
    "lora_mask",
]
