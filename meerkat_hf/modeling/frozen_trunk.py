"""`FrozenTrunk`: the layers below the first masked coordinate run once per ZO step, not once per forward.

Why: a ZO step evaluates the loss of one batch at several perturbed weights (2 per direction
for SPSA, N + 1 for fzoo), and a perturbation only touches the masked coordinates. Every decoder
layer below the first one that holds a masked coordinate computes the very same activations in
each of those forwards. Inside `with trunk:` the first forward on a batch keeps the output of the
last unmasked layer; later forwards on the same inputs return that output from those layers
without computing them, so only the masked part of the network runs again. The losses are the
same bits as without the cache (the same ops on the same tensors), so seeds, scalars and the
server's virtual path do not change: this is an execution detail, not part of the protocol.

It pays in proportion to how deep the mask starts: nothing for a mask with coordinates in the
first layer (the default sensitivity mask on SmolLM2 has some), most of each forward for a
mask restricted to the top layers (`SparseMaskConfig(layers_to_transform=...)`), where several
directions per step cost little more than one.

transformers has no public "resume the forward from layer L" entry point for every architecture,
so the skipped layers' `forward` is swapped for one that returns the kept output while the
context is open (the same instance-level override accelerate's hooks use), and restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..masks.layer_stack import decoder_layers, layer_index_of

__all__ = ["FrozenTrunk"]


def _snapshot(args: tuple, kwargs: dict) -> tuple:
    """What identifies a forward's inputs: tensors by value (cloned: they are token ids and masks), the rest by ==."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", v.detach().clone())
        if isinstance(v, (int, float, bool, str, type(None))):
            return ("value", v)
        return ("object", v)  # anything else: the very same object or not (compared with `is`)
    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def _same(a: tuple, b: tuple) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if x[0] != y[0]:
            return False
        if x[0] == "tensor":
            u, v = x[1], y[1]
            return u.shape == v.shape and u.dtype == v.dtype and u.device == v.device and torch.equal(u, v)
        return x[1] is y[1] if x[0] == "object" else x[1] == y[1]

    (args_a, kw_a, *rest_a), (args_b, kw_b, *rest_b) = a, b
    if rest_a != rest_b or len(args_a) != len(args_b) or [k for k, _ in kw_a] != [k for k, _ in kw_b]:
        return False
    return all(eq(x, y) for x, y in zip(args_a, args_b)) and all(eq(x, y) for (_, x), (_, y) in zip(kw_a, kw_b))


class FrozenTrunk:
    """Skips the unmasked bottom layers of `model` in repeated forwards on the same inputs.

    Args:
        model: the causal LM whose forwards repeat (its top-level module is hooked).
        masked_params: the parameters that hold masked coordinates; every decoder layer that
            finishes before the first module owning one of them is called belongs to the trunk.

    `depth` (the number of leading decoder layers in the trunk) is found on the first forward
    inside the context; 0 (a masked coordinate in the first layer, or no layer stack found)
    makes the context a no-op. Open it around the forwards of one step: within it the unmasked
    weights must not change (they never do in Meerkat; only masked coordinates are written).
    Inside it a forward that leaves `use_cache` unset returns no KV cache; one that asks for a cache,
    passes one, or asks for every layer's hidden states or attentions runs whole. Not thread-safe: one
    context on one model at a time.
    """

    def __init__(self, model: nn.Module, masked_params: list[nn.Parameter]):
        self.model = model
        stack = decoder_layers(model)
        self.layers = stack[1] if stack is not None else None
        masked = {id(p) for p in masked_params}
        self._masked_modules = [m for m in model.modules()
                                if any(id(p) in masked for p in m.parameters(recurse=False))]
        self.depth: int | None = None if self.layers is not None and self._masked_modules else 0
        # The trace finds the first masked module that *runs*; a masked layer that a forward happens to skip
        # (routed experts, layer dropping) must still bound the trunk, so the names cap it too.
        self._max_depth = len(self.layers) if self.layers is not None else 0
        if stack is not None:
            names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            for p in masked_params:
                index = layer_index_of(names.get(id(p), ""), stack[0])
                if index is not None:
                    self._max_depth = min(self._max_depth, index)
        self.reused_forwards = 0  # forwards that skipped the trunk (tests and benchmarks read it)
        self._open = False
        self._inputs: tuple | None = None  # the inputs of the forward whose trunk output is kept
        self._kept: Any = None
        self._replay = False
        self._trace: tuple[list, list] | None = None
        self._patched: list[tuple[nn.Module, Any]] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator["FrozenTrunk"]:
        if self.depth == 0 or self._open:
            yield self
            return
        self._open = True
        hooks = [self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                 self.model.register_forward_hook(self._after_forward)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            self._end_trace()
            self._unpatch()
            self._open, self._inputs, self._kept, self._replay = False, None, None, False

    # -- hooks on the top-level model ---------------------------------------------------------
    def _before_forward(self, _module, args, kwargs):
        self._end_trace()  # a forward that raised inside the context left its trace or stubs behind
        self._unpatch()
        self._replay = False
        if not _replayable(self.model, kwargs):  # caches, hidden states, attentions: run whole, keep nothing
            self._inputs = self._kept = None
            return None
        if kwargs.get("use_cache") is None:  # a loss forward: no KV cache (a replay could not fill the trunk's)
            kwargs = {**kwargs, "use_cache": False}
        snap = _snapshot(args, kwargs) + ((torch.is_grad_enabled(), self.model.training),)
        if self.depth is None:  # the first forward ever: run it whole, watching where the mask starts
            self._inputs, self._kept = snap, None
            self._start_trace()
        elif self.depth > 0:
            self._replay = self._kept is not None and _same(snap, self._inputs)
            if not self._replay:
                self._inputs, self._kept = snap, None
            self._patch()
        return args, kwargs

    def _after_forward(self, _module, _args, _out):
        if self._trace is not None:
            outputs = self._trace[1]
            self._end_trace()
            if self.depth is None:  # no masked module ran: nothing is safe to skip
                self.depth = 0
            self.depth = min(self.depth, self._max_depth)
            kept = _detached(outputs[self.depth - 1]) if 0 < self.depth <= len(outputs) else None
            if kept is None:  # a layer output we cannot copy safely (or none): never skip
                self.depth = 0
            self._kept = kept
        self._unpatch()
        self._replay = False
        return None

    # -- finding the depth, once ----------------------------------------------------------------
    def _start_trace(self) -> None:
        self._end_trace()
        finished: list[int] = [0]
        outputs: list[Any] = []

        def after_layer(_m, _a, out):
            outputs.append(out)
            finished[0] += 1

        def before_masked(_m, _a):
            if self.depth is None:
                self.depth = finished[0]

        handles = [layer.register_forward_hook(after_layer) for layer in self.layers]
        handles += [m.register_forward_pre_hook(before_masked) for m in self._masked_modules]
        self._trace = (handles, outputs)

    def _end_trace(self) -> None:
        if self._trace is not None:
            for h in self._trace[0]:
                h.remove()
            self._trace = None

    # -- the skipped layers: return the kept output when replaying, else run and keep it --------
    def _patch(self) -> None:
        if self._patched:
            return
        last = self.depth - 1
        for i in range(self.depth):
            layer = self.layers[i]
            previous = layer.__dict__.get("forward")
            original = layer.forward

            def forward(*args, _original=original, _keep=(i == last), **kwargs):
                if self._replay:  # only the last skipped layer's output is read (by the first masked layer)
                    self.reused_forwards += int(_keep)
                    return _detached(self._kept) if _keep else self._kept
                out = _original(*args, **kwargs)
                if _keep:
                    self._kept = _detached(out)  # None for an output type it cannot copy: no replay
                return out

            layer.forward = forward
            self._patched.append((layer, previous))

    def _unpatch(self) -> None:
        for layer, previous in self._patched:
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
        self._patched = []


def _detached(out: Any) -> Any:
    """A private copy of a layer's output (a tensor, or a plain tuple of tensors/None), else None (not kept)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if type(out) is tuple and all(o is None or isinstance(o, torch.Tensor) for o in out):
        return tuple(None if o is None else o.detach().clone() for o in out)
    return None


def _replayable(model: nn.Module, kwargs: dict) -> bool:
    """Whether a forward returns nothing the skipped layers would have added besides their output.

    A past or returned KV cache, every layer's hidden states or attentions all need the trunk's layers
    to run; loss forwards ask for none of them.
    """
    config = getattr(model, "config", None)
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        return False
    for flag in ("output_hidden_states", "output_attentions"):
        value = kwargs.get(flag)
        if value or (value is None and getattr(config, flag, False)):
            return False
    return True
