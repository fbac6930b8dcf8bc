"""meerkat-hf: zeroth-order federated fine-tuning of causal LMs with transferable sparsity."""

from .calibration import SelfGenerated
from .compute import compute_mask
from .config import SparseMaskConfig
from .mask import MaskMismatchError, SparseMask
from .model import MeerkatModel, get_meerkat_model

__version__ = "0.1.0"

__all__ = [
    "MaskMismatchError",
    "MeerkatModel",
    "SelfGenerated",
    "SparseMask",
    "SparseMaskConfig",
    "compute_mask",
    "get_meerkat_model",
]
