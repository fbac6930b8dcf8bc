"""Finding published masks: one naming convention and a Hub query, so a mask is found by its base model.

A mask is tied to one base model (its parameter shapes), and the useful question is "which masks exist
for my base?". Published masks follow `<base>-meerkat-mask-<density>` (the base's repo name, without the
owner) and carry the `meerkat-hf` library name and the `sparse-mask` tag (`SparseMask.model_card`), so
`list_masks` asks the Hub for exactly those (`HfApi.list_models`) and narrows by the base's name.
"""

from __future__ import annotations

MASK_TAG = "sparse-mask"
LIBRARY_TAG = "meerkat-hf"


def mask_repo_name(base_model: str, density: float) -> str:
    """The conventional repo name of a mask: `SmolLM2-135M-Instruct-meerkat-mask-1e-05` for
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 1e-5). Prefix your namespace: f"{user}/{mask_repo_name(...)}"."""
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    base = base_model.rstrip("/").split("/")[-1]
    if not base:
        raise ValueError(f"cannot name a mask after base model {base_model!r}")
    return f"{base}-meerkat-mask-{density:g}"


def list_masks(base_model: str | None = None, *, author: str | None = None, token: str | bool | None = None,
               limit: int | None = 100) -> list[str]:
    """Repo ids of the published Meerkat masks (for `base_model` when given, by its repo name), newest Hub order."""
    from huggingface_hub import HfApi

    search = None if base_model is None else f"{base_model.rstrip('/').split('/')[-1]}-meerkat-mask-"
    models = HfApi(token=token).list_models(filter=[LIBRARY_TAG, MASK_TAG], search=search, author=author, limit=limit)
    return [m.id for m in models]
