"""Shared fixtures: tiny random causal LMs built from configs and an offline tokenizer.

Nothing here touches the network: models come from configs, the tokenizer is trained in
milliseconds (meerkat_hf.testing.tiny, shared with research/ and examples).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Masks computed by runs under test are cached in a throw-away folder, never in the user's HF_HOME.
if "MEERKAT_HF_CACHE" not in os.environ:
    import tempfile

    os.environ["MEERKAT_HF_CACHE"] = tempfile.mkdtemp(prefix="meerkat-mask-cache-")

# after the environment above: huggingface_hub reads HF_HUB_OFFLINE when it is first imported
from meerkat_hf.testing.tiny import WORDS, build_tiny_tokenizer, make_corpus, tiny_config, tiny_model  # noqa: E402,F401

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """A script of the repository (a benchmark, a study) imported as a module, so a test can call its `main`."""
    import importlib.util
    import sys

    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def corpus():
    return make_corpus()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(params=["llama", "qwen2", "gemma2"])
def tiny_any(request):
    return tiny_model(request.param)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is as fast, and immune to an oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
