"""Export a Meerkat delta as a PEFT SHiRA adapter, so that plain `peft` loads the result.

PEFT's SHiRA tuner is a sparse adapter on `nn.Linear` weights: per targeted layer a list of (row, col)
positions and their values. Two shapes of Meerkat's mask do not fit it as they are, and the export
pays for each visibly instead of refusing silently:
* SHiRA stores exactly `r * (in + out)` entries in every targeted layer, one `r` for all of them, so
  layers with few masked weights are padded with zero-valued entries (`padding_ratio` = stored entries /
  real ones);
* masked weights outside Linear layers (norm weights, embeddings, biases) travel as PEFT's dense
  `modules_to_save` (the whole module, `dense_bytes`).
The adapter is built with PEFT's own `get_peft_model` / `save_pretrained` on a copy of the base holding
the pre-trained values, so its files are whatever this PEFT version writes and reads.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# PEFT releases whose SHiRA loads the saved indices with PeftModel.from_pretrained; transformers'
# `model.load_adapter(dir)` needs peft >= 0.22 for SHiRA and with older peft keeps random indices silently.
MIN_PEFT_VERSION = "0.21.0"
DEFAULT_MAX_PADDING = 8.0
# Below this size padding is not worth refusing: SmolLM2's default density-1e-5 mask pads 26x, to 0.26 MB in all
PADDING_FREE_BYTES = 1 << 20


@dataclass
class PeftExportPlan:
    """What an export will write: the SHiRA rank, its padding and the dense modules."""

    r: int
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]]  # Linear module -> (sorted flat indices, delta values)
    dense_modules: list[str]  # modules saved whole (modules_to_save)
    real_entries: int
    stored_entries: int
    dense_bytes: int

    @property
    def stored_bytes(self) -> int:
        """The adapter's size: SHiRA's values (fp32) and (row, col) indices, plus the dense modules."""
        return self.stored_entries * (4 + 2 * 4) + self.dense_bytes

    @property
    def padding_ratio(self) -> float:
        return self.stored_entries / max(self.real_entries, 1)

    def describe(self) -> str:
        return (f"SHiRA r={self.r} over {len(self.targets)} Linear layers: {self.stored_entries:,} stored entries for "
                f"{self.real_entries:,} trained weights (padding ratio {self.padding_ratio:.1f}x); "
                f"{len(self.dense_modules)} module(s) saved dense ({self.dense_bytes / 2**20:.2f} MiB); "
                f"adapter ~{self.stored_bytes / 2**20:.2f} MiB")


def plan_peft_export(model) -> PeftExportPlan:
    """Split a `MeerkatModel`'s masked weights into SHiRA targets and dense modules, and size the adapter."""
    base, mask = model.base_model, model.mask
    modules = dict(base.named_modules())
    delta = model.delta
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dense: set[str] = set()
    offset = 0
    for name, count in mask.counts().items():
        idx = mask.indices[name]
        values = delta[offset:offset + count]
        offset += count
        module_name, _, pname = name.rpartition(".")
        module = modules[module_name]
        if isinstance(module, nn.Linear) and pname == "weight" and idx is not None and count:
            targets[module_name] = (idx, values)
        elif count:
            dense.add(module_name)
    for module_name in dense & set(targets):  # a Linear with a masked bias travels whole
        del targets[module_name]
    r = max((math.ceil(idx.numel() / (modules[n].in_features + modules[n].out_features))
             for n, (idx, _) in targets.items()), default=1)
    stored = sum(r * (modules[n].in_features + modules[n].out_features) for n in targets)
    real = sum(idx.numel() for idx, _ in targets.values())
    dense_bytes = sum(p.numel() * p.element_size() for n in dense for p in modules[n].parameters())
    return PeftExportPlan(r, targets, sorted(dense), real, stored, dense_bytes)


def export_peft(model, save_directory: str | os.PathLike, *, max_padding: float = DEFAULT_MAX_PADDING,
                force: bool = False) -> PeftExportPlan:
    """Write `model`'s delta as a SHiRA adapter in `save_directory`; returns the plan it followed.

    `PeftModel.from_pretrained(base, save_directory)` then gives the outputs of `model.merge_and_unload()`.
    A padding ratio above `max_padding` is refused unless `force=True` (the adapter would be that many
    times larger than the trained weights it carries), when the adapter is over 1 MiB (below, it is small anyway)."""
    try:
        import peft
        from peft import ShiraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("export_peft needs peft (pip install peft)") from err
    plan = plan_peft_export(model)
    logger.info("PEFT export: %s", plan.describe())
    if not plan.targets:
        raise ValueError("the mask selects no Linear weight: a SHiRA adapter would carry nothing but dense modules")
    if plan.padding_ratio > max_padding and plan.stored_bytes > PADDING_FREE_BYTES and not force:
        raise ValueError(f"{plan.describe()}: above max_padding={max_padding:g}; pass force=True to write it anyway, "
                         "or train on a Linear-only mask (SparseMaskConfig(include_patterns=[...proj...]))")
    base = model.base_model
    with model.disable_adapter():  # the copy starts from the pre-trained values everywhere
        clone = copy.deepcopy(base)
    for attr in ("forward", "_meerkat_original_forward"):  # a precision wrapper is bound to the original
        clone.__dict__.pop(attr, None)
    _write_dense_values(model, clone, plan.dense_modules)
    modules = dict(clone.named_modules())
    positions = {n: _padded_positions(idx, modules[n], plan.r) for n, (idx, _) in plan.targets.items()}
    by_id = {id(modules[n]): n for n in plan.targets}

    def mask_fn(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
        flat = torch.zeros(base_layer.out_features * base_layer.in_features, dtype=torch.float32)
        flat[positions[by_id[id(base_layer)]]] = 1.0
        return flat.reshape(base_layer.out_features, base_layer.in_features).to(base_layer.weight.device)

    config = ShiraConfig(r=plan.r, target_modules=sorted(plan.targets), modules_to_save=plan.dense_modules or None,
                         init_weights=True)
    config.mask_fn = mask_fn
    peft_model = get_peft_model(clone, config)
    with torch.no_grad():
        for name, (idx, values) in plan.targets.items():
            layer = peft_model.base_model.model.get_submodule(name)
            stored = positions[name]
            weight = torch.zeros(stored.numel(), dtype=torch.float32)
            weight[torch.isin(stored, idx)] = values.float()  # both sorted: the masked entries in their order
            layer.shira_weight["default"].copy_(weight.to(layer.shira_weight["default"].device))
            rows, cols = stored // layer.in_features, stored % layer.in_features
            if not torch.equal(layer.shira_indices["default"].cpu().long(), torch.stack([rows, cols])):
                raise RuntimeError(f"PEFT placed SHiRA entries of {name} in another order than requested")
    peft_model.save_pretrained(os.fspath(save_directory))
    _note_min_version(Path(save_directory), peft.__version__)
    return plan


def _padded_positions(idx: torch.Tensor, layer: nn.Linear, r: int) -> torch.Tensor:
    """The masked flat indices plus the first unmasked ones up to r * (in + out) entries, sorted (row-major)."""
    want = r * (layer.in_features + layer.out_features)
    idx = idx.to(torch.long)
    if idx.numel() == want:
        return idx
    # the first m unmasked positions all lie below m + n (n masked ones can push them up by at most n):
    # look only there instead of building a dense in x out map
    candidates = torch.arange(want, dtype=torch.long)  # want = m + n
    pad = candidates[~torch.isin(candidates, idx)][: want - idx.numel()]
    return torch.sort(torch.cat([idx, pad])).values


@torch.no_grad()
def _write_dense_values(model, clone: nn.Module, dense_modules: list[str]) -> None:
    """Write the trained values of the masked weights of the dense modules into the clone."""
    wanted = set(dense_modules)
    params = dict(clone.named_parameters())
    offset = 0
    for name, count in model.mask.counts().items():
        values = model.values[offset:offset + count]
        offset += count
        if name.rpartition(".")[0] not in wanted:
            continue
        flat = params[name].data.view(-1)
        idx = model.mask.indices[name]
        if idx is None:
            flat.copy_(values.to(flat.dtype))
        else:
            flat[idx.to(flat.device)] = values.to(device=flat.device, dtype=flat.dtype)


def _note_min_version(folder: Path, version: str) -> None:
    """Say in the adapter's README which peft loads it (PEFT's own config keys stay untouched)."""
    readme = folder / "README.md"
    note = (f"\n\nExported by meerkat-hf with peft {version}. Load it with `PeftModel.from_pretrained(base, path)` "
            f"(peft >= {MIN_PEFT_VERSION}); transformers' `model.load_adapter(path)` needs peft >= 0.22 for SHiRA "
            "and with older peft silently keeps random indices.\n")
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    readme.write_text(text + note, encoding="utf-8")
