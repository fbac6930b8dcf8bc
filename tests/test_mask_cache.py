"""The mask cache: a hit needs the same architecture, weights, spec and calibration text."""

from __future__ import annotations

import torch

from conftest import tiny_model
from meerkat_hf import SparseMaskConfig, compute_mask
from meerkat_hf.masks.cache import load_cached_mask, mask_cache_key, store_cached_mask


def test_key_depends_on_weights_spec_and_calibration():
    model = tiny_model("llama")
    spec = SparseMaskConfig(density=0.01)
    key = mask_cache_key(model, spec, "python_docs:3.11")
    assert key == mask_cache_key(tiny_model("llama"), SparseMaskConfig(density=0.01), "python_docs:3.11")
    assert key != mask_cache_key(tiny_model("llama", seed=1), spec, "python_docs:3.11")  # another checkpoint
    assert key != mask_cache_key(model, SparseMaskConfig(density=0.02), "python_docs:3.11")
    assert key != mask_cache_key(model, SparseMaskConfig(density=0.01, calibration_num_sequences=8), "python_docs:3.11")
    assert key != mask_cache_key(model, spec, "python_docs:3.12")
    assert key != mask_cache_key(tiny_model("qwen2"), spec, "python_docs:3.11")  # another architecture


def test_store_then_load_is_bit_exact_and_corruption_is_a_miss(tmp_path, caplog):
    model = tiny_model("llama")
    mask = compute_mask(model, SparseMaskConfig(density=0.01, method="random"), progress=False)
    assert load_cached_mask("abc", tmp_path) is None
    folder = store_cached_mask("abc", mask, tmp_path)
    hit = load_cached_mask("abc", tmp_path)
    assert hit.checksum == mask.checksum
    assert all(torch.equal(hit.indices[n], mask.indices[n]) for n in mask.indices)
    weights = folder / "mask.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a truncated entry: ignored with a warning, never used
    assert load_cached_mask("abc", tmp_path) is None
    assert "ignoring the corrupted cached mask" in caplog.text


def test_federation_reuses_the_cached_mask(tmp_path, monkeypatch):
    from federated_support import base_config, make_model_dir, make_task_files
    from meerkat_hf.masks import compute as compute_module
    from meerkat_hf.federated import FederationConfig, run_federation

    monkeypatch.setenv("MEERKAT_HF_CACHE", str(tmp_path / "cache"))
    model_dir, files = make_model_dir(tmp_path), make_task_files(tmp_path)
    calls = []
    real = compute_module.compute_mask
    monkeypatch.setattr(compute_module, "compute_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(rounds=1, local_steps=1)
    first = run_federation(FederationConfig.from_dict(base_config(tmp_path, model_dir, files, output_dir=str(tmp_path / "a"), **kw)))
    second = run_federation(FederationConfig.from_dict(base_config(tmp_path, model_dir, files, output_dir=str(tmp_path / "b"), **kw)))
    assert len(calls) == 1  # the second run read the cache
    assert first.mask.checksum == second.mask.checksum and first.state_digest == second.state_digest
    no_cache = base_config(tmp_path, model_dir, files, output_dir=str(tmp_path / "c"), mask={"cache": False}, **kw)
    run_federation(FederationConfig.from_dict(no_cache))
    assert len(calls) == 2


def test_get_or_compute_mask_computes_once(tmp_path, monkeypatch, corpus, tiny_tokenizer):
    from meerkat_hf.masks import compute as compute_module
    from meerkat_hf import get_or_compute_mask

    calls = []
    real = compute_module.compute_mask
    monkeypatch.setattr(compute_module, "compute_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = SparseMaskConfig(density=0.01, calibration_num_sequences=2, calibration_seq_len=16)
    texts = tmp_path / "cal.txt"
    texts.write_text("\n".join(corpus))
    first = get_or_compute_mask(tiny_model("llama"), spec, str(texts), tiny_tokenizer, cache=tmp_path / "c", progress=False)
    again = get_or_compute_mask(tiny_model("llama"), spec, str(texts), tiny_tokenizer, cache=tmp_path / "c", progress=False)
    assert len(calls) == 1 and again.checksum == first.checksum
    # in-memory text has no identity of its own: computed every time unless it is named
    for _ in range(2):
        get_or_compute_mask(tiny_model("llama"), spec, corpus, tiny_tokenizer, cache=tmp_path / "c", progress=False)
    assert len(calls) == 3
    get_or_compute_mask(tiny_model("llama"), spec, corpus, tiny_tokenizer, cache=False, progress=False)
    assert len(calls) == 4
