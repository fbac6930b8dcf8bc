"""The transferable sparse mask: which coordinates train, chosen once on generic text.

`config` (SparseMaskConfig), `calibration` (the text), `selection` (top-k by mean squared gradient),
`stats` (the gradient statistics), `compute` (compute_mask), `mask` (SparseMask and its files),
`cache` (reuse a computed mask), `baselines` (LoRA / full-parameter masks for comparison).
"""

from .cache import get_or_compute_mask
from .compute import compute_mask
from .config import SparseMaskConfig
from .mask import MaskMismatchError, SparseMask

__all__ = ["MaskMismatchError", "SparseMask", "SparseMaskConfig", "compute_mask", "get_or_compute_mask"]
