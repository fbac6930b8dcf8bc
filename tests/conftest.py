"""Shared fixtures: tiny random causal LMs built from configs and an offline tokenizer.

Nothing here touches the network: models come from configs, the tokenizer is trained in
milliseconds on text generated below.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Masks computed by runs under test are cached in a throw-away folder, never in the user's HF_HOME.
if "MEERKAT_HF_CACHE" not in os.environ:
    import tempfile

    os.environ["MEERKAT_HF_CACHE"] = tempfile.mkdtemp(prefix="meerkat-mask-cache-")

WORDS = (
    "the a movie film great terrible good bad awful wonderful plot actor story boring fun "
    "love hate weather rain sun news sports market price stock team game win lose city "
    "car road school teacher student book read write happy sad angry calm yes no maybe"
).split()


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + "." for _ in range(n)]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(make_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def corpus():
    return make_corpus()


def tiny_config(family: str = "llama", vocab_size: int = 320):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(**common, head_dim=8, tie_word_embeddings=True)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    model.eval()
    return model


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
