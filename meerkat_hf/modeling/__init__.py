"""`MeerkatModel`: a causal LM whose masked coordinates train, its sparse view and its forward precision."""

from .model import MeerkatModel, forward_module, get_meerkat_model

__all__ = ["MeerkatModel", "forward_module", "get_meerkat_model"]
