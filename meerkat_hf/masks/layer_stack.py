"""Finding a causal LM's stack of decoder layers, for `layers_to_transform` and the frozen trunk.

transformers names the stack differently per architecture (`model.layers`, `transformer.h`,
`gpt_neox.layers`, ...); PEFT asks the user for a `layers_pattern` instead. The stack is the one
ModuleList of same-class blocks holding most of the model's parameters, which finds it in all
of them without a table of names.
"""

from __future__ import annotations

from torch import nn

__all__ = ["decoder_layers", "layer_index_of"]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the model's repeated blocks, or None when it has none."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len({type(m) for m in module}) != 1:
            continue
        if (len(module) != expected) if isinstance(expected, int) else len(module) < 2:
            continue  # hybrid stacks (adapters beside the layers): only the list as long as the model is deep
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    return best


def layer_index_of(parameter_name: str, stack_name: str) -> int | None:
    """The block index of a parameter inside the stack (`model.layers.3.mlp.up_proj.weight` -> 3), else None."""
    prefix = f"{stack_name}." if stack_name else ""
    if not parameter_name.startswith(prefix):
        return None
    head = parameter_name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None
