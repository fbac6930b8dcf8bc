"""Gather/scatter of the masked coordinates on flattened parameter views.

Why our own and not a PEFT tuner: PEFT adapters add modules (extra compute per forward);
Meerkat trains coordinates in place, so the forward pass is the untouched base model and
costs exactly what inference costs. Nothing dense is allocated per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..masks.mask import SparseMask


@dataclass
class _Slice:
    name: str
    param: nn.Parameter
    index: torch.Tensor | None  # on the parameter's device; None = the whole tensor
    start: int
    stop: int


class SparseView:
    """The sparse vector w_S of a model: `gather()` reads it, `write(values)` loads it."""

    def __init__(self, model: nn.Module, mask: SparseMask):
        params = dict(model.named_parameters())
        self.slices: list[_Slice] = []
        offset = 0
        for name, count in mask.counts().items():
            param = params[name]
            if not param.is_floating_point():
                raise TypeError(
                    f"masked parameter {name!r} is stored as {param.dtype} (quantized?); Meerkat writes the masked "
                    "coordinates in place and needs them in a floating-point tensor: exclude it from the mask"
                )
            if not param.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; Meerkat needs flat views of masked weights")
            idx = mask.indices[name]
            idx = None if idx is None else idx.to(param.device)
            self.slices.append(_Slice(name, param, idx, offset, offset + count))
            offset += count
        self.k = offset

    @staticmethod
    def _index(s: _Slice) -> torch.Tensor | None:
        """The slice's index on its parameter's current device (models move after wrapping, e.g. Trainer)."""
        if s.index is not None and s.index.device != s.param.device:
            s.index = s.index.to(s.param.device)
        return s.index

    @torch.no_grad()
    def gather(self) -> torch.Tensor:
        """Current masked values as an fp32 CPU vector (canonical order)."""
        out = torch.empty(self.k, dtype=torch.float32)
        for s in self.slices:
            flat = s.param.detach().view(-1)
            index = self._index(s)
            part = flat if index is None else flat.index_select(0, index)
            out[s.start : s.stop] = part.float().cpu()
        return out

    @torch.no_grad()
    def write(self, values: torch.Tensor) -> None:
        """Load an fp32 k-vector into the weights (cast to each weight's dtype)."""
        if values.numel() != self.k:
            raise ValueError(f"expected {self.k} values, got {values.numel()}")
        # One host-to-device copy per device and one cast per (device, dtype) per write, not one per tensor: a
        # bf16-mixed model has ~100 masked tensors in two dtypes, and a kernel launch per tensor per write is what
        # keeps a GPU waiting. (The master is fp32 on the CPU; the same fp32 values cast once give the same bits.)
        on_device: dict[torch.device, torch.Tensor] = {}
        cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for s in self.slices:
            dev, dtype = s.param.device, s.param.dtype
            key = (dev, dtype)
            if key not in cast:
                if dev not in on_device:
                    on_device[dev] = values if values.device == dev else values.to(dev)
                cast[key] = on_device[dev].to(dtype)
            chunk = cast[key][s.start : s.stop]
            flat = s.param.data.view(-1)
            index = self._index(s)
            if index is None:
                flat.copy_(chunk)
            else:
                flat.index_copy_(0, index, chunk)
