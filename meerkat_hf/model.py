"""`MeerkatModel` / `get_meerkat_model`: a causal LM whose masked coordinates are trainable.

Like `peft.get_peft_model`, wrapping happens in place: the base model's weights always hold
the current values, so the wrapped model works anywhere a transformers model does
(`generate`, pipelines). The trainable state is `values`, an fp32 CPU master of w_S; weights
are written from it (never incremented), which keeps bf16/fp16 models drift-free.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .hub import push_folder, render_card, resolve_folder, sha256_bytes, write_files_atomically
from .mask import SparseMask
from .sparse_view import SparseView

logger = logging.getLogger(__name__)

DELTA_CONFIG_NAME = "meerkat_config.json"
# Not `adapter_model.safetensors`: PEFT and Trainer treat that name as a LoRA adapter.
DELTA_WEIGHTS_NAME = "sparse_delta.safetensors"


class MeerkatModel(nn.Module):
    """A frozen base model plus the fp32 master of its masked coordinates."""

    def __init__(self, model: nn.Module, mask: SparseMask):
        super().__init__()
        mask.check_compatible(model)
        self.base_model = model
        self.mask = mask
        for p in model.parameters():
            p.requires_grad_(False)
        self.sparse = SparseView(model, mask)
        self.base_values = self.sparse.gather()  # the pre-trained w_S, for the delta
        self.values = self.base_values.clone()  # fp32 CPU master of the current w_S

    # -- the sparse state ----------------------------------------------------------------
    @property
    def num_selected(self) -> int:
        return self.sparse.k

    def write(self, values: torch.Tensor) -> None:
        """Load `values` into the weights without changing the master (perturbations)."""
        self.sparse.write(values)

    @torch.no_grad()
    def set_values(self, values: torch.Tensor) -> None:
        """Replace the master w_S and load it into the weights."""
        values = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        if values.numel() != self.sparse.k:
            raise ValueError(f"expected {self.sparse.k} values, got {values.numel()}")
        self.values.copy_(values)
        self.sparse.write(self.values)

    def sync_weights(self) -> None:
        """Write the master into the weights (after an in-place update of `values`)."""
        self.sparse.write(self.values)

    @property
    def delta(self) -> torch.Tensor:
        return self.values - self.base_values

    @property
    def is_quantized(self) -> bool:
        """False: the *trainable* weights are never quantized (SparseView requires float tensors).

        transformers flags every model loaded through a quantizer, GGUF included even when it was
        dequantized to float32 on load, and `Trainer` refuses such models unless adapters are
        attached. Meerkat only writes the masked coordinates, so the frozen rest may be anything.
        """
        return False

    # -- nn.Module / transformers behaviour ------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.base_model.parameters())
        k = self.sparse.k
        print(f"trainable params: {k:,} || all params: {total:,} || trainable%: {100 * k / total:.4f}")

    # -- files -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, training_summary: dict | None = None,
                        repo_id: str | None = None, model_card: bool = True, datasets: list[str] | None = None) -> None:
        """Save the mask and the trained sparse values (a few MB at most), self-contained.

        `datasets` (Hub dataset ids the delta was trained on) go into the model card's metadata;
        by default they are read from `training_summary["datasets"]` when present.
        """

        self.mask.save_pretrained(save_directory, model_card=False)
        blob = save_safetensors(
            {"values": self.values.contiguous(), "delta": self.delta.contiguous()},
            metadata={"format": "pt", "meerkat": "sparse_delta"},
        )
        config = {
            "base_model_name_or_path": self.mask.config.base_model_name_or_path,
            "mask_checksum": self.mask.checksum,
            "fingerprint": self.mask.fingerprint,
            "num_selected": self.sparse.k,
            "weights_sha256": sha256_bytes(blob),
            "training": training_summary or {},
        }
        files = {DELTA_WEIGHTS_NAME: blob}
        if model_card:
            base = self.mask.config.base_model_name_or_path
            card = render_card(
                "delta_card.md",
                {"library_name": "meerkat-hf", "base_model": base,
                 "tags": ["meerkat", "zeroth-order", "federated-learning", "sparse"],
                 "datasets": datasets or (training_summary or {}).get("datasets") or None},
                repo_id=repo_id or "path/to/this-delta", base_model=base, num_selected=self.sparse.k,
                density=self.mask.config.density, mask_repo=repo_id, training=training_summary or {},
            )
            files["README.md"] = str(card).encode()
        files[DELTA_CONFIG_NAME] = json.dumps(config, indent=2).encode()
        write_files_atomically(save_directory, files)

    def load_delta(self, path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs) -> None:
        """Load trained sparse values saved by `save_pretrained` (checks mask and integrity)."""

        folder = Path(resolve_folder(path_or_repo_id, revision=revision, **hub_kwargs))
        cfg_path, weights_path = folder / DELTA_CONFIG_NAME, folder / DELTA_WEIGHTS_NAME
        if not cfg_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{path_or_repo_id} has no {DELTA_CONFIG_NAME}/{DELTA_WEIGHTS_NAME}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path} is truncated or corrupted: {err}") from err
        if cfg["mask_checksum"] != self.mask.checksum:
            raise ValueError(f"{path_or_repo_id} was trained with another mask (checksum {cfg['mask_checksum']})")
        blob = weights_path.read_bytes()
        if sha256_bytes(blob) != cfg["weights_sha256"]:
            raise ValueError(f"{weights_path} is truncated, corrupted or from another save (hash mismatch)")
        self.set_values(load_safetensors(blob)["values"])

    @classmethod
    def from_pretrained(cls, model: nn.Module, path_or_repo_id: str | os.PathLike, revision: str | None = None,
                        **hub_kwargs) -> "MeerkatModel":
        """Wrap `model` with the mask and trained values saved at `path_or_repo_id`."""
        mask = SparseMask.from_pretrained(path_or_repo_id, revision=revision, **hub_kwargs)
        wrapped = cls(model, mask)
        wrapped.load_delta(path_or_repo_id, revision=revision, **hub_kwargs)
        return wrapped

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload Meerkat sparse delta",
                    training_summary: dict | None = None, **hub_kwargs) -> str:

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, training_summary=training_summary, repo_id=repo_id)
            return push_folder(tmp, repo_id, commit_message=commit_message, **hub_kwargs)

    def merge_and_unload(self) -> nn.Module:
        """Return the plain transformers model with the trained values written in."""
        self.sync_weights()
        return self.base_model


def forward_module(model):
    """The module to call for forward passes: a `MeerkatModel`'s base model (the transformers/PEFT
    model, whose `forward` the tasks module inspects for `logits_to_keep`), else `model` itself."""
    return model.base_model if isinstance(model, MeerkatModel) else model


def get_meerkat_model(model: nn.Module, mask: SparseMask) -> MeerkatModel:
    """Wrap `model` in place so exactly the mask's coordinates are trainable (PEFT-style)."""
    if isinstance(model, MeerkatModel):
        raise ValueError("model is already a MeerkatModel")
    wrapped = MeerkatModel(model, mask)
    if wrapped.sparse.k == 0:
        raise ValueError("the mask selects no coordinate of this model")
    logger.info("Meerkat: %d trainable coordinates (%s mask)", wrapped.sparse.k, mask.config.method)
    return wrapped
