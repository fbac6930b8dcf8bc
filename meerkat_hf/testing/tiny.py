"""Tiny random causal LMs built from configs and a BPE tokenizer trained in milliseconds: no network.

For tests, examples and studies that need a real Hugging Face model without downloading one (as
`transformers.testing_utils` and `accelerate.test_utils` serve theirs).
"""

from __future__ import annotations

import random

import torch

__all__ = ["WORDS", "make_corpus", "build_tiny_tokenizer", "tiny_config", "tiny_model"]

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
