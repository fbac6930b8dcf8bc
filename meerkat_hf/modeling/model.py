"""`MeerkatModel` / `get_meerkat_model`: a causal LM whose masked coordinates are trainable.

Like `peft.get_peft_model`, wrapping happens in place: the base model's weights always hold
the current values, so the wrapped model works anywhere a transformers model does
(`generate`, pipelines). The trainable state is `values`, an fp32 CPU master of w_S; weights
are written from it (never incremented), which keeps bf16/fp16 models drift-free.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from ..masks.config import CONFIG_NAME
from ..hub.artifacts import (
    _is_repo_id,
    find_interrupted_save,
    push_folder,
    render_card,
    resolve_folder,
    sha256_bytes,
    write_directory_atomically,
)
from ..masks.mask import MASK_WEIGHTS_NAME, SparseMask, config_content_sha256, read_json_config
from ..hub.integrity import MAX_ABS_WEIGHT, check_finite, read_verified, safetensors_bound, stream_sha256
from ..hub.safetensors_bytes import save_safetensors
from .frozen_trunk import FrozenTrunk
from .sparse_view import SparseView

logger = logging.getLogger(__name__)

DELTA_CONFIG_NAME = "meerkat_config.json"
# Not `adapter_model.safetensors`: PEFT and Trainer treat that name as a LoRA adapter.
DELTA_WEIGHTS_NAME = "sparse_delta.safetensors"
DELTA_FORMAT_VERSION = 2
_CARD_MARKER = b"Rendered by meerkat-hf from model_cards/delta_card.md"


_LOAD = "load another delta with MeerkatModel.from_pretrained(base, delta_dir) or model.load_delta(delta_dir)"
_PEFT_ONLY = {  # PEFT/transformers adapter methods -> what to do with a Meerkat delta instead
    "set_adapter": _LOAD,
    "add_adapter": _LOAD,
    "load_adapter": _LOAD,
    "delete_adapter": "one delta lives in the model; unload() restores the pre-trained values",
    "active_adapters": "one delta is active, the one in model.values",
    "active_adapter": "one delta is active, the one in model.values",
    "disable_adapters": "use the context manager `with model.disable_adapter():`",
    "enable_adapters": "leave the `with model.disable_adapter():` block",
    "get_adapter_state_dict": "model.delta is the trained change (k values); save_pretrained writes it",
}


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
        self.tokenizer = None  # set by `from_pretrained(delta_dir)`, which loads the base and its tokenizer
        self.forward_precision = "fp32"
        self.reuse_frozen_trunk = True  # False: every ZO forward runs every layer (the cache's bit-equality tests)
        self._trunk: FrozenTrunk | None = None

    # -- forward precision (meerkat_hf.modeling.precision) ---------------------------------------------
    def set_forward_precision(self, precision: str) -> None:
        """Run every forward of the base model at `precision` ("fp32", "bf16-mixed", "bf16", "autocast").

        The fp32 master `values` is untouched: only the weights the forward reads change dtype, and
        the master is re-written into them. The base model's `forward` is wrapped (as accelerate does
        for mixed precision), so every caller (Trainer, the candidate losses, `generate`) gets the
        same numerics. Going back to "fp32" keeps unmasked weights at their bf16-rounded values.
        """
        from .precision import autocast_for, cast_model, model_device, normalize_precision, warn_if_slow_bf16

        precision = normalize_precision(precision)
        base = self.base_model
        if precision != "fp32" and precision != self.forward_precision:
            warn_if_slow_bf16(model_device(base))
        original = base.__dict__.pop("_meerkat_original_forward", None)
        if original is not None:
            base.forward = original
        cast_model(base, precision)
        self.sparse.write(self.values)
        self.forward_precision = precision
        if precision in ("bf16-mixed", "autocast"):
            inner = base.forward

            @functools.wraps(inner)
            def forward_under_autocast(*args, **kwargs):
                with autocast_for(precision, model_device(base)):
                    return inner(*args, **kwargs)

            base._meerkat_original_forward = inner
            base.forward = forward_under_autocast

    def frozen_trunk(self) -> contextlib.AbstractContextManager:
        """Within it, forwards on the same inputs run the layers below the mask once (`modeling.frozen_trunk`).

        The ZO estimators open it around the forwards of one step; the losses are the same bits.
        """
        if not self.reuse_frozen_trunk:
            return contextlib.nullcontext()
        if self._trunk is None:
            self._trunk = FrozenTrunk(self.base_model, [s.param for s in self.sparse.slices])
        return self._trunk()

    @property
    def trunk_depth(self) -> int | None:
        """Decoder layers a ZO step runs once (the frozen trunk): 0 when the mask reaches the first
        layer, None before a step has looked."""
        return None if self._trunk is None else self._trunk.depth

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
            if name in _PEFT_ONLY:  # transformers' PEFT integration would answer with a misleading error
                raise AttributeError(f"MeerkatModel has no {name}(): a Meerkat delta is not a PEFT adapter; "
                                     f"{_PEFT_ONLY[name]}") from None
            return getattr(self.base_model, name)

    # -- PEFT-shaped API -----------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (its masked weights hold the current values), as PEFT's `get_base_model`."""
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the pre-trained model inside the block (base values in the masked coordinates); the trained values
        come back on exit, whatever happens inside. The master `values` is never touched."""
        self.sparse.write(self.base_values)
        try:
            yield self
        finally:
            self.sparse.write(self.values)

    def unload(self) -> nn.Module:
        """The base model with its pre-trained values restored (the delta dropped), as PEFT's `unload`."""
        self.sparse.write(self.base_values)
        return self.base_model

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """As transformers' `num_parameters`, with `only_trainable=True` counting the k trained coordinates
        (no nn.Parameter requires grad under ZO, so the plain count would say 0)."""
        if only_trainable:
            return self.sparse.k
        return self.base_model.num_parameters(exclude_embeddings=exclude_embeddings)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all), as PEFT's."""
        return self.sparse.k, sum(p.numel() for p in self.base_model.parameters())

    def print_trainable_parameters(self) -> None:
        k, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {k:,} || all params: {total:,} || trainable%: {100 * k / total:.4f}")

    # -- files -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, training_summary: dict | None = None,
                        repo_id: str | None = None, model_card: bool = True, datasets: list[str] | None = None,
                        license: str | None = None) -> None:
        """Save the mask, the trained sparse values and the exact base model's record, as ONE unit.

        Everything is written into a new sibling folder and renamed into place in one step
        (`hub.write_directory_atomically`): a crash at any point leaves the previous save loadable,
        never a new mask beside an old delta. `meerkat_config.json` records the SHA-256 of every
        other file and of its own content; `from_pretrained` checks them before loading anything.
        Other files already in `save_directory` (tokenizer, Trainer state) are kept.

        `datasets` (Hub dataset ids the delta was trained on) go into the model card's metadata;
        by default they are read from `training_summary["datasets"]` when present.
        """
        from ..hub.loading import base_source  # loading imports transformers lazily; keep model.py light

        files = self.mask.to_files(model_card=False)
        blob = save_safetensors(
            {"values": self.values.contiguous(), "delta": self.delta.contiguous()},
            metadata={"format": "pt", "meerkat": "sparse_delta"},
        )
        files[DELTA_WEIGHTS_NAME] = blob
        base = base_source(self.base_model, fallback_name=self.mask.config.base_model_name_or_path)
        config = {
            "format_version": DELTA_FORMAT_VERSION,
            "base_model_name_or_path": self.mask.config.base_model_name_or_path,
            "base_model": base,
            "mask_checksum": self.mask.checksum,
            "fingerprint": self.mask.fingerprint,
            "num_selected": self.sparse.k,
            "weights_sha256": sha256_bytes(blob),
            "files_sha256": {name: sha256_bytes(files[name]) for name in (CONFIG_NAME, MASK_WEIGHTS_NAME, DELTA_WEIGHTS_NAME)},
            "training": training_summary or {},
        }
        config = json.loads(json.dumps(config, default=str))  # what the file will hold, then hashed
        config["config_sha256"] = config_content_sha256(config)
        if model_card:
            files["README.md"] = str(self.model_card(repo_id or os.fspath(save_directory), training_summary, datasets,
                                                     base=base, push_repo=repo_id, license=license)).encode()
        files[DELTA_CONFIG_NAME] = json.dumps(config, indent=2).encode()
        replace = [CONFIG_NAME, MASK_WEIGHTS_NAME, DELTA_WEIGHTS_NAME, DELTA_CONFIG_NAME]
        old_card = Path(save_directory) / "README.md"
        if not model_card and old_card.is_file() and _CARD_MARKER in old_card.read_bytes():
            replace.append("README.md")  # our card of the previous save would describe the wrong values
        write_directory_atomically(save_directory, files, replace_names=tuple(replace))

    def model_card(self, load_path: str, training_summary: dict | None = None, datasets: list[str] | None = None,
                   *, base: dict | None = None, push_repo: str | None = None, license: str | None = None,
                   tags: list[str] | None = None, language: str | list[str] | None = None):
        """The delta's model card; its usage snippet loads `load_path` (a Hub id or a local folder).

        `license` defaults to the base model's where it is known (the embedded SmolLM2: apache-2.0); a delta
        of a base whose license is unknown here says `license: other` until you pass one."""
        from ..hub.loading import base_license, base_source, describe_base

        base = base or base_source(self.base_model, fallback_name=self.mask.config.base_model_name_or_path)
        display = base.get("display_name") or self.mask.config.base_model_name_or_path
        if license is None and base_license(base) is None and push_repo is not None:
            logger.warning("the license of base model %s is not known here, so the card of %s says 'license: other': "
                           "pass license=... (the base model's license) to push_to_hub", display, push_repo)
        return render_card(
            "delta_card.md",
            {"library_name": "meerkat-hf", "base_model": display, "pipeline_tag": "text-generation",
             "license": license or base_license(base) or "other", "language": language,
             "tags": ["meerkat", "zeroth-order", "federated-learning", "sparse", *(tags or [])],
             "datasets": datasets or (training_summary or {}).get("datasets") or None},
            repo_id=load_path, base_model=display, base_description=describe_base(base),
            base_load_call=_base_load_call(base), embedded_base=base.get("kind") == "embedded",
            num_selected=self.sparse.k, density=self.mask.config.density, mask_repo=push_repo,
            training=training_summary or {},
        )

    def load_delta(self, path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs) -> None:
        """Load trained sparse values saved by `save_pretrained` (checks mask and integrity)."""
        folder = _delta_folder(path_or_repo_id, revision, hub_kwargs)
        cfg = read_delta_config(folder)
        self._load_checked(folder, cfg, path_or_repo_id)

    def _load_checked(self, folder: Path, cfg: dict, name) -> None:
        if cfg["mask_checksum"] != self.mask.checksum:
            raise ValueError(f"{name} was trained with another mask (checksum {cfg['mask_checksum']})")
        weights_path = folder / DELTA_WEIGHTS_NAME
        # values + delta, fp32: the honest size is known from k before a byte is read
        blob = read_verified(weights_path, cfg["weights_sha256"], safetensors_bound(8 * self.sparse.k, 2), "sparse delta")
        try:
            tensors = load_safetensors(blob)
            values = tensors["values"]
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"{weights_path} is not a readable sparse delta: {err}") from err
        if values.numel() != self.sparse.k:
            raise ValueError(f"{weights_path} holds {values.numel()} values for a mask of k={self.sparse.k}")
        check_finite(values, "the trained weights", weights_path, max_abs=MAX_ABS_WEIGHT)
        self.set_values(values)
        if "delta" in tensors and tensors["delta"].numel() == values.numel():
            trained_on = values - tensors["delta"]
            if not torch.allclose(trained_on, self.base_values, rtol=1e-4, atol=1e-6):
                diff = float((trained_on - self.base_values).abs().max())
                logger.warning("%s: the base model's masked weights differ from those the delta was trained on "
                               "(max |diff| %.3g); is this the same base model? (%s)", name, diff,
                               cfg.get("base_model_name_or_path"))

    @classmethod
    def from_pretrained(cls, model: nn.Module | str | os.PathLike, path_or_repo_id: str | os.PathLike | None = None,
                        revision: str | None = None, *, base_model: str | None = None, dtype: str | None = None,
                        allow_local_base: bool = False, **hub_kwargs) -> "MeerkatModel":
        """Load a saved delta: `from_pretrained(delta_dir)` or `from_pretrained(base_model, delta_dir)`.

        With one argument the base recorded in the delta is loaded too (the embedded SmolLM2 GGUF
        offline, a Hub id at its recorded commit, or a local directory); `base_model=` (a name for
        `load_model_and_tokenizer`) overrides it, `dtype=` overrides the recorded dtype. The tokenizer
        that came with a loaded base is `model.tokenizer` (None when you pass the base yourself).
        Every file is checked against the hashes in `meerkat_config.json` before the base is loaded.
        A delta downloaded from the Hub that records a *local directory* as its base is refused unless
        `allow_local_base=True` (its record would make this machine load whatever sits at that path);
        no base ever runs code of its own (`trust_remote_code=False`).
        """
        if path_or_repo_id is None:
            if isinstance(model, nn.Module):
                raise TypeError("from_pretrained(model) needs the delta too: from_pretrained(model, delta_dir)")
            path_or_repo_id, model = model, None
        folder = _delta_folder(path_or_repo_id, revision, hub_kwargs)
        cfg = read_delta_config(folder)
        mask = SparseMask.from_pretrained(folder)
        tokenizer = None
        if model is None:
            from ..hub.loading import load_base_from_source, load_model_and_tokenizer

            if base_model is not None:
                model, tokenizer = load_model_and_tokenizer(base_model, dtype=dtype)
            else:
                source = cfg.get("base_model") or _legacy_source(cfg, mask)
                check_base_record(source, folder / DELTA_CONFIG_NAME, downloaded=not _is_local(path_or_repo_id, folder),
                                  allow_local_base=allow_local_base)
                logger.info("loading the delta's base model: %s", source.get("path") or source.get("name_or_path"))
                model, tokenizer = load_base_from_source(source, dtype)
        wrapped = cls(model, mask)
        wrapped._load_checked(folder, cfg, path_or_repo_id)
        wrapped.tokenizer = tokenizer
        return wrapped

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload Meerkat sparse delta",
                    training_summary: dict | None = None, license: str | None = None, **hub_kwargs) -> str:

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, training_summary=training_summary, repo_id=repo_id, license=license)
            return push_folder(tmp, repo_id, commit_message=commit_message, **hub_kwargs)

    def export_peft(self, save_directory: str | os.PathLike, *, max_padding: float = 8.0, force: bool = False):
        """Write the delta as a PEFT SHiRA adapter that `PeftModel.from_pretrained(base, dir)` loads with the outputs
        of `merge_and_unload()`; returns the export's plan (rank, padding ratio, dense modules). See `peft_export`."""
        from .peft_export import export_peft

        return export_peft(self, save_directory, max_padding=max_padding, force=force)

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


def _delta_folder(path_or_repo_id, revision, hub_kwargs) -> Path:
    """The local folder of a saved delta; a folder left missing by a killed save falls back to its previous version."""
    previous = find_interrupted_save(path_or_repo_id) if not Path(os.fspath(path_or_repo_id)).exists() else None
    if previous is not None:
        logger.warning("%s is missing: a save was interrupted; loading its previous version %s",
                       path_or_repo_id, previous)
        return previous
    folder = Path(resolve_folder(path_or_repo_id, revision=revision, **hub_kwargs))
    for name in (DELTA_CONFIG_NAME, DELTA_WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{path_or_repo_id} has no {name}: not a saved Meerkat delta "
                                    f"(a run folder keeps it in final/)")
    return folder


def read_delta_config(folder: Path) -> dict:
    """`meerkat_config.json`, checked: its own content hash and the hash of every file it lists.

    Any damage is a one-line `ValueError` that names the file.
    """
    cfg_path = folder / DELTA_CONFIG_NAME
    cfg = read_json_config(cfg_path, "Meerkat delta config")
    missing = [k for k in ("mask_checksum", "weights_sha256") if not isinstance(cfg.get(k), str)]
    if missing:
        raise ValueError(f"{cfg_path} is damaged or not a Meerkat delta config: it lacks {', '.join(missing)}")
    if cfg.get("format_version", 1) > DELTA_FORMAT_VERSION:
        raise ValueError(f"{cfg_path} uses delta format {cfg['format_version']}; upgrade meerkat-hf")
    if "config_sha256" not in cfg and ("files_sha256" in cfg or "base_model" in cfg or "format_version" in cfg):
        raise ValueError(f"{cfg_path} is damaged: its content hash (config_sha256) is missing")
    if "config_sha256" not in cfg:  # a delta saved before the hashes existed loads, and says so
        logger.warning("%s has no config_sha256 or files_sha256 (saved by an older meerkat-hf): its files are checked "
                       "by weights_sha256 only; re-save it to add them", cfg_path)
    elif config_content_sha256(cfg) != cfg["config_sha256"]:
        raise ValueError(f"{cfg_path} was edited or damaged (content hash mismatch); "
                         "pass the base model explicitly instead of editing the file")
    files = cfg.get("files_sha256") or {}
    if not isinstance(files, dict):
        raise ValueError(f"{cfg_path} is damaged: files_sha256 must map file names to hashes")
    for name, digest in files.items():
        # a plain name in this folder only: a hash list must not make us read ../../etc/hostname
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"{cfg_path} lists {name!r}: files_sha256 may only name files inside the delta folder")
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing ({DELTA_CONFIG_NAME} lists it)")
        if stream_sha256(path) != digest:  # chunk by chunk: a listed file is never read whole to be checked
            raise ValueError(f"{path} is truncated, corrupted or from another save "
                             f"(hash mismatch with {DELTA_CONFIG_NAME})")
    return cfg


def _is_local(path_or_repo_id, folder: Path) -> bool:
    """The delta is the user's own folder (or the previous version a killed save left beside it), not a download."""
    given = Path(os.fspath(path_or_repo_id)).expanduser()
    return given.exists() or given.parent.resolve() == folder.parent.resolve()


_BASE_KINDS = ("embedded", "local", "hub", "unknown")
_BASE_DTYPES = (None, "float32", "bfloat16", "float16", "auto")


def check_base_record(source, config_path: Path, *, downloaded: bool, allow_local_base: bool) -> None:
    """A delta's base-model record is untrusted input: well-formed, and a local path only from a local delta."""
    ok = (isinstance(source, dict) and source.get("kind", "unknown") in _BASE_KINDS
          and isinstance(source.get("name_or_path", ""), str) and source.get("dtype") in _BASE_DTYPES
          and all(source.get(k) is None or isinstance(source.get(k), str) for k in ("path", "gguf_file", "commit")))
    if not ok:
        raise ValueError(f"{config_path}: 'base_model' is not a valid base-model record (kind one of "
                         f"{', '.join(_BASE_KINDS)}, dtype one of float32/bfloat16/float16): pass the base yourself, "
                         "MeerkatModel.from_pretrained(base_model, delta_dir)")
    if source.get("kind") == "local" and downloaded and not allow_local_base:
        raise ValueError(f"{config_path}: the downloaded delta names the local directory "
                         f"{source.get('path') or source.get('name_or_path')!r} as its base; it is not followed "
                         "unless you pass allow_local_base=True or the base yourself: "
                         "MeerkatModel.from_pretrained(base_model, delta_dir)")


def _legacy_source(cfg: dict, mask: SparseMask) -> dict:
    """The base of a delta saved before bases were recorded: the mask's base model name."""
    from ..hub.loading import EMBEDDED_NAME

    name = cfg.get("base_model_name_or_path") or mask.config.base_model_name_or_path
    if name == EMBEDDED_NAME:
        try:
            from ..hub.loading import embedded_model_dir

            embedded_model_dir()
            logger.warning("the delta predates base records; assuming the embedded SmolLM2 GGUF (the default "
                           "job's base) for %s; pass base_model= to choose another", name)
            return {"kind": "embedded", "name_or_path": "smollm2", "display_name": name}
        except ImportError:
            pass
    if name and os.path.isdir(os.path.expanduser(name)):
        return {"kind": "local", "name_or_path": name, "display_name": name, "path": os.path.abspath(os.path.expanduser(name))}
    return {"kind": "hub" if name and _is_repo_id(name) else "unknown", "name_or_path": name, "display_name": name}


def _base_load_call(base: dict) -> str:
    """`load_model_and_tokenizer(...)` arguments that load `base` (for the card's second snippet)."""
    kind = base.get("kind")
    if kind == "embedded":
        return '"smollm2"'
    name = base.get("path") if kind == "local" else base.get("name_or_path")
    args = [json.dumps(name or "<base model>")]
    if base.get("gguf_file"):
        args.append(f"gguf_file={json.dumps(base['gguf_file'])}")
    if kind == "hub" and (base.get("commit") or base.get("revision")):
        args.append(f"revision={json.dumps(base.get('commit') or base.get('revision'))}")
    return ", ".join(args)
