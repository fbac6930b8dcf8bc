"""`SparseMask`: the fixed set of trainable coordinates, its pre-training gradient and its files.

Canonical order (the protocol's): parameters in `named_parameters()` order (tied weights
once), flat indices ascending. Concatenating the masked values in that order gives the sparse
vector w_S of length k; `pretrain_grad` (g_p, for Meerkat-VP) is in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from .config import CONFIG_NAME, SparseMaskConfig
from ..hub.artifacts import push_folder, render_card, resolve_folder, sha256_bytes, write_files_atomically
from ..hub.integrity import check_finite, read_verified, safetensors_bound
from ..hub.safetensors_bytes import save_safetensors

logger = logging.getLogger(__name__)
MAX_JSON_CONFIG_BYTES = 4 << 20

MASK_WEIGHTS_NAME = "mask.safetensors"
FORMAT_VERSION = 1
_INDEX_PREFIX = "indices."


class MaskMismatchError(ValueError):
    """The mask was computed on a model with other parameter names or shapes."""


def parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def fingerprint(shapes: dict[str, list[int]]) -> str:
    """SHA-256 of the ordered (name, shape) list: identifies an architecture, not its weights."""
    text = "\n".join(f"{name}:{tuple(shape)}" for name, shape in shapes.items())
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class SparseMask:
    """Per-parameter sorted flat indices (None = the whole tensor, for the `full` method)."""

    config: SparseMaskConfig
    indices: dict[str, torch.Tensor | None]
    shapes: dict[str, list[int]]  # every parameter of the base model, canonical order
    pretrain_grad: torch.Tensor | None = None
    statistics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, idx in self.indices.items():
            if name not in self.shapes:
                raise MaskMismatchError(f"masked parameter {name!r} is not among the model's parameters")
            if idx is None:
                continue
            # protocol objects live on the CPU in fixed dtypes whatever device the model is on (a mask computed on
            # CUDA hands its indices over from there): the checksum, the files and every replay read these bits
            idx = idx.to(device="cpu", dtype=torch.long).reshape(-1).contiguous()
            numel = _numel(self.shapes[name])
            if idx.numel() and (idx[0] < 0 or idx[-1] >= numel or bool((idx[1:] <= idx[:-1]).any())):
                raise ValueError(f"indices of {name!r} must be strictly ascending and within [0, {numel})")
            self.indices[name] = idx
        order = [n for n in self.shapes if n in self.indices]
        self.indices = {n: self.indices[n] for n in order}  # enforce canonical order
        if self.pretrain_grad is not None:
            self.pretrain_grad = self.pretrain_grad.detach().float().cpu().reshape(-1)
            if self.pretrain_grad.numel() != self.num_selected:
                raise ValueError(f"pretrain_grad has {self.pretrain_grad.numel()} values for k={self.num_selected}")

    # -- sizes -------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {n: (_numel(self.shapes[n]) if i is None else int(i.numel())) for n, i in self.indices.items()}

    @property
    def num_selected(self) -> int:
        """k, the length of the sparse vector."""
        return sum(self.counts().values())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.shapes)

    @property
    def checksum(self) -> str:
        """BLAKE2b of the selected coordinates; messages carry it so clients agree on the mask."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.fingerprint.encode())
        for name, idx in self.indices.items():
            h.update(name.encode() + b"\0")
            h.update(b"ALL" if idx is None else idx.to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    # -- compatibility -----------------------------------------------------------------
    def check_compatible(self, model: nn.Module) -> None:
        """Raise `MaskMismatchError` naming the first parameter that differs from the mask's model."""
        theirs = parameter_shapes(model)
        if fingerprint(theirs) == self.fingerprint:
            return
        base = self.config.base_model_name_or_path or "its base model"
        for name, shape in self.shapes.items():
            if name not in theirs:
                raise MaskMismatchError(f"mask was computed on {base}: parameter {name!r} {tuple(shape)} is missing from this model")
            if theirs[name] != shape:
                raise MaskMismatchError(
                    f"mask was computed on {base}: parameter {name!r} has shape {tuple(shape)} there "
                    f"but {tuple(theirs[name])} in this model"
                )
        extra = next(n for n in theirs if n not in self.shapes) if len(theirs) > len(self.shapes) else None
        raise MaskMismatchError(
            f"mask was computed on {base}: this model's parameters differ "
            + (f"(extra parameter {extra!r})" if extra else "(parameter order)")
        )

    # -- files -------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, idx in self.indices.items():
            if idx is None:
                continue
            small = idx.numel() == 0 or int(idx[-1]) < 2**31
            tensors[_INDEX_PREFIX + name] = idx.to(torch.int32 if small else torch.int64).contiguous()
        if self.pretrain_grad is not None:
            tensors["pretrain_grad"] = self.pretrain_grad.contiguous()
        return tensors

    def to_files(self, *, model_card: bool = True, repo_id: str | None = None) -> dict[str, bytes]:
        """The mask's files as bytes, in commit order (the config, which hashes the rest, last)."""
        blob = save_safetensors(self._tensors(), metadata={"format": "pt", "meerkat": "mask"})
        meta = {
            "format_version": FORMAT_VERSION,
            "num_selected": self.num_selected,
            "parameters": [[n, self.shapes[n], c, self.indices[n] is None] for n, c in self.counts().items()],
            "parameter_shapes": self.shapes,
            "fingerprint": self.fingerprint,
            "checksum": self.checksum,
            "weights_sha256": sha256_bytes(blob),
            "has_pretrain_grad": self.pretrain_grad is not None,
            "statistics": self.statistics,
        }
        raw = {**self.config.to_dict(), "meerkat_mask": meta}
        meta["config_sha256"] = config_content_sha256(raw)  # density, method, base model, statistics: all hashed
        files = {MASK_WEIGHTS_NAME: blob}
        if model_card:
            files["README.md"] = str(self.model_card(repo_id)).encode()
        files[CONFIG_NAME] = json.dumps(raw, indent=2).encode()
        return files

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card: bool = True, repo_id: str | None = None) -> None:
        """Write `mask_config.json`, `mask.safetensors` and a model card, never half-written.

        The weights file is replaced first and the config (which records the weights' hash)
        last, so an interrupted save is detected at load time instead of silently mixing files.
        """
        write_files_atomically(save_directory, self.to_files(model_card=model_card, repo_id=repo_id))
        logger.info("saved mask (k=%d, %s) to %s", self.num_selected, self.config.method, save_directory)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs) -> "SparseMask":
        """Load from a local directory or a Hub repo id; detects truncated or mismatched files."""

        folder = Path(resolve_folder(path_or_repo_id, revision=revision, allow_patterns=[CONFIG_NAME, MASK_WEIGHTS_NAME, "README.md"], **hub_kwargs))
        cfg_path, weights_path = folder / CONFIG_NAME, folder / MASK_WEIGHTS_NAME
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{path_or_repo_id} has no {p.name}: not a Meerkat mask directory")
        raw = read_json_config(cfg_path, "Meerkat mask config")
        meta = raw.get("meerkat_mask")
        if not isinstance(meta, dict):
            raise ValueError(f"{cfg_path}: not a Meerkat mask config (no 'meerkat_mask' section)")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{cfg_path} uses mask format {meta['format_version']}; upgrade meerkat-hf")
        missing = [k for k in ("weights_sha256", "parameters", "parameter_shapes", "checksum") if k not in meta]
        if missing:
            raise ValueError(f"{cfg_path} is damaged: the 'meerkat_mask' section lacks {', '.join(missing)}")
        _check_meta_shapes(meta, cfg_path)
        if "config_sha256" not in meta:  # files written before the hash existed still load, visibly
            logger.warning("%s has no config_sha256: its density, method and statistics cannot be checked against "
                           "edits; re-save the mask (SparseMask.from_pretrained(...).save_pretrained(...)) to add it",
                           cfg_path)
        elif config_content_sha256(raw) != meta["config_sha256"]:
            raise ValueError(f"{cfg_path} was edited or damaged (content hash mismatch): re-save the mask "
                             "instead of editing its config")
        selected = sum(int(count) for _, _, count, whole in meta["parameters"] if not whole)
        bound = safetensors_bound(8 * selected + 4 * int(meta.get("num_selected", selected)), len(meta["parameters"]) + 1)
        blob = read_verified(weights_path, meta["weights_sha256"], bound, "Meerkat mask")
        try:
            tensors = load_safetensors(blob)
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from err
        indices: dict[str, torch.Tensor | None] = {}
        for name, _shape, count, whole in meta["parameters"]:
            if whole:
                indices[name] = None
                continue
            idx = tensors.get(_INDEX_PREFIX + name)
            if idx is None or idx.numel() != count:
                raise ValueError(f"{weights_path} lacks the {count} indices of {name!r}")
            indices[name] = idx.to(torch.long)
        if tensors.get("pretrain_grad") is not None:  # NaN g_p would silently switch Meerkat-VP off (GradIP None)
            check_finite(tensors["pretrain_grad"], "the pre-training gradient g_p", weights_path)
        mask = cls(
            config=SparseMaskConfig.from_dict(raw),
            indices=indices,
            shapes={n: list(s) for n, s in meta["parameter_shapes"].items()},
            pretrain_grad=tensors.get("pretrain_grad"),
            statistics=meta.get("statistics", {}),
        )
        if mask.checksum != meta["checksum"]:
            raise ValueError(f"{path_or_repo_id}: mask checksum mismatch (corrupted indices)")
        return mask

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload Meerkat sparse mask", **hub_kwargs) -> str:

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, repo_id=repo_id)
            return push_folder(tmp, repo_id, commit_message=commit_message, **hub_kwargs)

    # -- card --------------------------------------------------------------------------
    def model_card(self, repo_id: str | None = None):

        cfg = self.config
        types = self.statistics.get("per_module_type", {})
        k = max(1, self.num_selected)
        card_data = {
            "library_name": "meerkat-hf",
            "base_model": cfg.base_model_name_or_path,
            "tags": ["meerkat", "sparse-mask", "zeroth-order", "federated-learning"],
        }
        return render_card(
            "mask_card.md",
            card_data,
            repo_id=repo_id or "path/to/this-mask",
            base_model=cfg.base_model_name_or_path,
            density=cfg.density,
            method=cfg.method,
            scope=cfg.scope,
            num_selected=self.num_selected,
            num_selectable=self.statistics.get("num_selectable"),
            calibration={
                "source": cfg.calibration_source,
                "num_sequences": cfg.calibration_num_sequences,
                "seq_len": cfg.calibration_seq_len,
                "seed": cfg.seed,
            },
            module_table=[(t, c, c / k) for t, c in types.items()],
            mass_share=self.statistics.get("mass_share"),
            concentration_ratio=self.statistics.get("concentration_ratio"),
        )


def _check_meta_shapes(meta: dict, cfg_path: Path) -> None:
    """The 'meerkat_mask' section has the types the loader relies on (one line, not an AttributeError)."""
    params, shapes = meta["parameters"], meta["parameter_shapes"]
    ok = isinstance(shapes, dict) and isinstance(params, list) and all(
        isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[2], int)
        and not isinstance(e[2], bool) and e[2] >= 0 and isinstance(e[3], bool) for e in params)
    if not ok:
        raise ValueError(f"{cfg_path} is damaged: 'parameters' must be a list of [name, shape, count, whole] and "
                         "'parameter_shapes' a mapping of name to shape")


def config_content_sha256(raw: dict) -> str:
    """SHA-256 of a JSON config's content, without the `config_sha256` entries that record it."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "config_sha256"}
        return value

    return hashlib.sha256(json.dumps(strip(raw), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json_config(path: Path, what: str) -> dict:
    """Parse a JSON config file; any damage is a one-line `ValueError` naming the file.

    Bounded: a config is a few KB (4 MiB allowed), and JSON nested past Python's recursion limit
    (which `json` meets as a RecursionError) is refused like any other damage."""
    if path.stat().st_size > MAX_JSON_CONFIG_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size:,} bytes: not a {what} (at most {MAX_JSON_CONFIG_BYTES:,})")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path} is damaged or hostile: JSON nested too deeply to be a {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is damaged: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is truncated or corrupted: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is damaged or not a {what}: expected a JSON object")
    return raw


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
