"""`SparseMaskConfig`: what a Meerkat mask is made of, in the shape of a PEFT config.

We do not subclass `peft.PeftConfig`: its loader dispatches on a registered `PeftType` enum
that third-party methods cannot extend, and a mask is not an adapter (it adds no modules).
The file layout and method names (`save_pretrained`, `from_pretrained`, `push_to_hub`,
`to_dict`) follow PEFT so the object feels familiar.
"""

from __future__ import annotations

import dataclasses
import re
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..hub.artifacts import push_folder, resolve_folder, write_files_atomically

CONFIG_NAME = "mask_config.json"

METHODS = ("sensitivity", "magnitude", "random", "full")
SCOPES = ("global", "per_layer")
TARGETS = ("all", "linear")  # linear: nn.Linear weights only (a delta then exports to PEFT SHiRA compactly)

# Default exclusions, measured on SmolLM2-135M (see README "Choosing what may be selected"):
# the input embedding/lm_head rows that dominate calibration gradients are the rows of tokens
# frequent in the calibration text, which do not transfer to a downstream task's vocabulary,
# and a tied embedding is 21% of the model. Norm weights are kept: they are tiny and sensitive.
DEFAULT_EXCLUDE = (r"(^|\.)embed_tokens\.", r"(^|\.)lm_head\.", r"(^|\.)wte\.", r"(^|\.)wpe\.", r"embed_positions")


@dataclass
class SparseMaskConfig:
    """How to choose the fixed set of trainable coordinates.

    Every field has a `help` entry so the config can feed `HfArgumentParser` directly.
    """

    # 1e-5, not the paper's 1e-3: on SmolLM2 the 1e-5 mask's best ZO step gains ~21x more loss than the 1e-3
    # mask's, whose steps are mostly a random walk (research/RESULTS.md, "Why the 0.1% mask collapses")
    density: float = field(default=1e-5, metadata={"help": "Fraction of selectable parameters to keep, in (0, 1]. "
                                                            "1e-5 is what learns under ZO on SmolLM2 (research/RESULTS.md)."})
    method: str = field(
        default="sensitivity",
        metadata={
            "help": "sensitivity = top mean squared gradient on calibration text; magnitude = top |w|; "
            "random = uniform (seeded); full = every selectable parameter (full-parameter ZO baseline)."
        },
    )
    scope: str = field(
        default="global", metadata={"help": "global = one top-k over all tensors; per_layer = density within each tensor."}
    )
    target: str = field(
        default="all",
        metadata={"help": "all: every parameter the patterns allow; linear: only the weights of nn.Linear layers, "
                          "so that a trained delta exports to a compact PEFT SHiRA adapter (no dense norm modules)"},
    )
    include_patterns: list[str] | None = field(
        default=None, metadata={"help": "Regexes (re.search) on parameter names; only matching ones may be selected."}
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "As in PEFT: only these decoder layers' parameters may be selected (negative = from the top: "
                          "[-4, -3, -2, -1] is the last four); parameters outside the layer stack (the final norm) stay "
                          "selectable. A mask that starts high lets each ZO step run the layers below it once "
                          "(meerkat_hf.modeling.frozen_trunk), so several directions a step cost little more than one."},
    )
    exclude_patterns: list[str] = field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        metadata={"help": "Regexes on parameter names that may never be selected (default: embeddings, lm_head)."},
    )
    calibration_source: str | None = field(
        default=None, metadata={"help": "Human-readable description of the calibration text (recorded in the card)."}
    )
    calibration_num_sequences: int = field(default=64, metadata={"help": "Number of calibration sequences."})
    calibration_seq_len: int = field(default=256, metadata={"help": "Tokens per calibration sequence (packed)."})
    calibration_batch_size: int = field(
        default=1, metadata={"help": "Sequences per backward pass; 1 gives per-sequence squared gradients (Fisher-like)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random method and self-generated calibration text."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model the mask was computed on."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"density must be a float in (0, 1], got {self.density!r}")
        if not (0.0 < float(self.density) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        self.density = float(self.density)
        if self.method not in METHODS:
            raise ValueError(f"unknown mask method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown mask target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.calibration_seq_len < 2:
            raise ValueError(f"calibration_seq_len must be >= 2 (a next-token loss needs two tokens), got {self.calibration_seq_len}")
        if self.calibration_num_sequences < 1:
            raise ValueError("calibration_num_sequences must be >= 1")
        if self.calibration_batch_size < 1:
            raise ValueError("calibration_batch_size must be >= 1")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers) \
                    or not layers:
                raise ValueError(f"layers_to_transform must be a layer index or a non-empty list of them, got "
                                 f"{self.layers_to_transform!r}")
            self.layers_to_transform = list(layers)
        self.exclude_patterns = list(self.exclude_patterns or [])
        if self.include_patterns is not None:
            self.include_patterns = list(self.include_patterns)
        for name in ("exclude_patterns", "include_patterns"):
            for pattern in getattr(self, name) or []:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err})") from None

    # -- PEFT-like serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseMaskConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:

        payload = json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()
        write_files_atomically(save_directory, {CONFIG_NAME: payload})

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs) -> "SparseMaskConfig":

        folder = resolve_folder(path_or_repo_id, revision=revision, allow_patterns=[CONFIG_NAME], **hub_kwargs)
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path_or_repo_id}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {err}") from err
        return cls.from_dict(data)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload Meerkat mask config", **hub_kwargs) -> str:


        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, commit_message=commit_message, **hub_kwargs)
