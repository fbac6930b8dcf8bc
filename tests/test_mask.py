"""SparseMaskConfig, compute_mask, SparseMask: sizes, references, files, errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import tiny_model
from meerkat_hf import MaskMismatchError, SelfGenerated, SparseMask, SparseMaskConfig, compute_mask
from meerkat_hf.masks.selection import select_global, select_per_tensor, selectable_parameters, target_size

CAL = dict(calibration_num_sequences=6, calibration_seq_len=24)


def small_config(**kw) -> SparseMaskConfig:
    return SparseMaskConfig(**{"density": 0.01, **CAL, **kw})


@pytest.mark.parametrize("method", ["sensitivity", "magnitude", "random", "full"])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_mask_has_exactly_the_requested_size(tiny_any, tiny_tokenizer, corpus, method, scope):
    cfg = small_config(method=method, scope=scope)
    mask = compute_mask(tiny_any, cfg, corpus, tiny_tokenizer, progress=False)
    selectable = sum(p.numel() for _, p in selectable_parameters(tiny_any, cfg))
    expected = selectable if method == "full" else round(0.01 * selectable)
    assert mask.num_selected == expected
    assert sum(mask.counts().values()) == expected
    for name, idx in mask.indices.items():
        assert not any(pat in name for pat in ("embed_tokens", "lm_head"))  # default exclusions
        if idx is not None:
            assert idx.dtype == torch.long and bool((idx[1:] > idx[:-1]).all())
    # compute_mask leaves no gradients and restores requires_grad
    assert all(p.grad is None for p in tiny_any.parameters())
    assert all(p.requires_grad for p in tiny_any.parameters())


def brute_force_sensitivity(model, blocks, names, k):
    """Per-sequence gradients with plain autograd, mean of squares, stable full sort."""
    params = dict(model.named_parameters())
    sq = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    mean = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for block in blocks:
        model.zero_grad()
        ids = block[None]
        model(input_ids=ids, labels=ids).loss.backward()
        for n in names:
            sq[n] += params[n].grad.float() ** 2
            mean[n] += params[n].grad.float()
    model.zero_grad(set_to_none=True)
    flat = torch.cat([sq[n].reshape(-1) / len(blocks) for n in names])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, offset = {}, 0
    for n in names:
        numel = params[n].numel()
        out[n] = torch.nonzero(chosen[offset : offset + numel]).flatten()
        offset += numel
    g = torch.cat([(mean[n].reshape(-1) / len(blocks))[out[n]] for n in names])
    return out, g


def test_sensitivity_matches_brute_force_reference(tiny_tokenizer, corpus):
    from meerkat_hf.masks.calibration import iter_texts, pack_blocks

    model = tiny_model("llama", seed=3)
    cfg = small_config(density=0.02)
    mask = compute_mask(model, cfg, corpus, tiny_tokenizer, progress=False)
    blocks = pack_blocks(iter_texts(corpus), tiny_tokenizer, cfg.calibration_num_sequences, cfg.calibration_seq_len)
    names = [n for n, _ in selectable_parameters(model, cfg)]
    ref, ref_g = brute_force_sensitivity(model, blocks, names, mask.num_selected)
    for n in names:
        assert torch.equal(mask.indices[n], ref[n]), n
    torch.testing.assert_close(mask.pretrain_grad, ref_g, rtol=1e-5, atol=1e-8)


def test_global_selection_equals_stable_sort_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = {f"t{i}": torch.randint(0, 7, (n,), generator=gen).float() for i, n in enumerate([50, 3, 200, 1, 90])}
    flat = torch.cat([s for s in scores.values()])
    for k in (1, 5, 17, 100, flat.numel()):
        got = select_global(scores, k)
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
        want, offset = {}, 0
        for n, s in scores.items():
            want[n] = sorted(i - offset for i in order if offset <= i < offset + s.numel())
            offset += s.numel()
        assert {n: v.tolist() for n, v in got.items()} == want


def test_per_tensor_selection_sums_to_k_and_is_proportional():
    scores = {"a": torch.rand(1000), "b": torch.rand(10), "c": torch.rand(333)}
    got = select_per_tensor(scores, 67)
    assert sum(v.numel() for v in got.values()) == 67
    assert [got[n].numel() for n in "abc"] == [50, 0, 17]  # largest remainder of 49.9 / 0.50 / 16.6
    for n, idx in got.items():
        if idx.numel():
            assert float(scores[n][idx].min()) >= float(torch.topk(scores[n], idx.numel()).values.min())


def test_random_mask_is_reproducible_from_its_seed(tiny_llama):
    a = compute_mask(tiny_llama, small_config(method="random", seed=7), progress=False)
    b = compute_mask(tiny_llama, small_config(method="random", seed=7), progress=False)
    c = compute_mask(tiny_llama, small_config(method="random", seed=8), progress=False)
    assert a.checksum == b.checksum and a.checksum != c.checksum
    assert a.pretrain_grad is None  # no calibration given


def test_save_load_is_bit_exact(tmp_path, tiny_any, tiny_tokenizer, corpus):
    mask = compute_mask(tiny_any, small_config(), corpus, tiny_tokenizer, progress=False)
    mask.save_pretrained(tmp_path / "m")
    files = sorted(os.listdir(tmp_path / "m"))
    assert files == ["README.md", "mask.safetensors", "mask_config.json"]
    loaded = SparseMask.from_pretrained(tmp_path / "m")
    assert loaded.checksum == mask.checksum
    for n in mask.indices:
        assert torch.equal(loaded.indices[n], mask.indices[n])
    assert torch.equal(loaded.pretrain_grad, mask.pretrain_grad)
    assert loaded.config == mask.config and loaded.shapes == mask.shapes
    assert loaded.statistics["per_module_type"] == mask.statistics["per_module_type"]
    loaded.check_compatible(tiny_any)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "library_name: meerkat-hf" in card and str(mask.num_selected) in card.replace(",", "")
    # the config alone loads like a PEFT config
    assert SparseMaskConfig.from_pretrained(tmp_path / "m") == mask.config


def test_full_mask_saves_without_index_arrays(tmp_path, tiny_llama):
    mask = compute_mask(tiny_llama, small_config(method="full"), progress=False)
    mask.save_pretrained(tmp_path)
    assert os.path.getsize(tmp_path / "mask.safetensors") < 1024
    assert SparseMask.from_pretrained(tmp_path).num_selected == mask.num_selected


def test_statistics_concentration_matches_definition(tiny_tokenizer, corpus):
    from meerkat_hf.masks.calibration import calibration_blocks, gradient_statistics

    model = tiny_model("llama", seed=1)
    cfg = small_config()
    mask = compute_mask(model, cfg, corpus, tiny_tokenizer, progress=False)
    params = selectable_parameters(model, cfg)
    blocks = calibration_blocks(model, corpus, tiny_tokenizer, cfg.calibration_num_sequences, cfg.calibration_seq_len, 0)
    sq = gradient_statistics(model, params, blocks, progress=False).sq_mean
    flat = torch.sort(torch.cat([s.reshape(-1) for s in sq.values()]).double(), descending=True).values
    n = flat.numel()
    k01, k1 = math.ceil(n * 1e-3), math.ceil(n * 1e-2)
    ratio = float(flat[:k01].mean() / flat[k01:k1].mean())
    assert mask.statistics["concentration_ratio"] == pytest.approx(ratio, rel=1e-5)
    selected = sum(float(sq[nm].reshape(-1)[i].double().sum()) for nm, i in mask.indices.items())
    assert mask.statistics["mass_share"] == pytest.approx(selected / float(flat.sum()), rel=1e-6)
    assert mask.statistics["mass_share"] == pytest.approx(float(flat[: mask.num_selected].sum() / flat.sum()), rel=1e-6)
    assert sum(mask.statistics["per_module_type"].values()) == mask.num_selected


# -- calibration sources --------------------------------------------------------------------
def test_calibration_sources_agree(tmp_path, tiny_tokenizer, corpus):
    from datasets import Dataset, IterableDataset

    model = tiny_model("llama", seed=2)
    cfg = small_config()
    ref = compute_mask(model, cfg, corpus, tiny_tokenizer, progress=False).checksum
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus))
    (tmp_path / "c.txt").write_text("\n\n".join(corpus))
    ds = Dataset.from_dict({"text": corpus})
    sources = [ds, IterableDataset.from_generator(lambda: ({"text": t} for t in corpus)),
               str(tmp_path / "c.jsonl"), str(tmp_path / "c.txt")]
    for src in sources:
        assert compute_mask(model, small_config(), src, tiny_tokenizer, progress=False).checksum == ref, src


def test_self_generated_calibration_is_data_free(tiny_llama):
    cfg = small_config(calibration_num_sequences=2, calibration_seq_len=8)
    mask = compute_mask(tiny_llama, cfg, SelfGenerated(), progress=False)
    assert mask.num_selected == target_size(sum(p.numel() for _, p in selectable_parameters(tiny_llama, cfg)), 0.01)
    assert "self-generated" in mask.config.calibration_source
    again = compute_mask(tiny_llama, small_config(calibration_num_sequences=2, calibration_seq_len=8), "self", progress=False)
    assert again.checksum == mask.checksum  # seeded sampling


def test_bf16_model_and_gradient_checkpointing(tiny_tokenizer, corpus):
    model = tiny_model("llama", dtype=torch.bfloat16)
    a = compute_mask(model, small_config(), corpus, tiny_tokenizer, progress=False)
    b = compute_mask(model, small_config(), corpus, tiny_tokenizer, gradient_checkpointing=True, progress=False)
    assert a.pretrain_grad.dtype == torch.float32
    assert a.num_selected == b.num_selected
    overlap = sum(len(set(a.indices[n].tolist()) & set(b.indices[n].tolist())) for n in a.indices)
    assert overlap / a.num_selected > 0.9  # same gradients up to bf16 rounding
    from meerkat_hf.masks.calibration import _checkpointing_on

    assert not _checkpointing_on(model)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match="density"):
        SparseMaskConfig(density=density)


def test_unknown_method_and_scope():
    with pytest.raises(ValueError, match="unknown mask method"):
        SparseMaskConfig(method="fisher")
    with pytest.raises(ValueError, match="unknown scope"):
        SparseMaskConfig(scope="local")


def test_bad_calibration_inputs(tmp_path, tiny_llama, tiny_tokenizer):
    from datasets import Dataset

    with pytest.raises(ValueError, match="empty or shorter than 2 tokens"):
        compute_mask(tiny_llama, small_config(), [], tiny_tokenizer, progress=False)
    with pytest.raises(ValueError, match="empty or shorter than 2 tokens"):
        compute_mask(tiny_llama, small_config(), ["a"], tiny_tokenizer.__class__(
            tokenizer_object=tiny_tokenizer.backend_tokenizer), progress=False)
    with pytest.raises(KeyError, match="no 'text' column"):
        compute_mask(tiny_llama, small_config(), Dataset.from_dict({"sentence": ["x y"]}), tiny_tokenizer, progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        compute_mask(tiny_llama, small_config(), None, progress=False)
    with pytest.raises(FileNotFoundError):
        compute_mask(tiny_llama, small_config(), str(tmp_path / "nope.txt"), tiny_tokenizer, progress=False)
    with pytest.raises(ValueError, match=">= 2"):
        SparseMaskConfig(calibration_seq_len=1)
    with pytest.raises(ValueError, match="no parameter"):
        compute_mask(tiny_llama, small_config(method="random", include_patterns=["nothing_matches"]), progress=False)


def test_mask_on_the_wrong_model_names_the_parameter(tiny_llama):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    mask = compute_mask(tiny_llama, small_config(method="random"), progress=False)
    cfg = tiny_config("llama")
    cfg.intermediate_size = 48
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        mask.check_compatible(other)
    with pytest.raises(MaskMismatchError, match="missing"):
        mask.check_compatible(tiny_model("qwen2"))


def test_truncated_and_corrupted_files_are_detected(tmp_path, tiny_llama):
    mask = compute_mask(tiny_llama, small_config(method="random"), progress=False)
    mask.save_pretrained(tmp_path)
    weights = tmp_path / "mask.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|corrupted"):
        SparseMask.from_pretrained(tmp_path)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="hash mismatch"):
        SparseMask.from_pretrained(tmp_path)
    weights.write_bytes(data)
    cfg = tmp_path / "mask_config.json"
    cfg.write_text(cfg.read_text()[:100])
    with pytest.raises(ValueError, match="truncated|corrupted"):
        SparseMask.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        SparseMask.from_pretrained(tmp_path / "absent")


def test_interrupted_save_never_leaves_a_half_written_mask(tmp_path, tiny_llama, monkeypatch):
    old = compute_mask(tiny_llama, small_config(method="random", seed=1), progress=False)
    new = compute_mask(tiny_llama, small_config(method="random", seed=2), progress=False)
    old.save_pretrained(tmp_path)
    real_replace = os.replace
    calls = {"n": 0}

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # crash after the weights were replaced, before the config
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [f for f in os.listdir(tmp_path) if f not in ("README.md", "mask.safetensors", "mask_config.json")]
    try:  # either the old mask is intact, or the mismatch is detected: never a silent mix
        assert SparseMask.from_pretrained(tmp_path).checksum == old.checksum
    except ValueError as err:
        assert "mismatch" in str(err)


class _DeviceTensor(torch.Tensor):
    """Stands in for a CUDA tensor on this CPU-only machine: `.numpy()` refuses, as it does on CUDA, until the
    tensor is moved to the CPU (the one place a mask hands its indices over)."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.to and isinstance(out, torch.Tensor):
            dev = (kwargs or {}).get("device", args[1] if len(args) > 1 else None)
            if str(dev) == "cpu":
                return out.as_subclass(torch.Tensor)
        return out


def test_mask_indices_from_another_device_live_on_the_cpu_and_hash_there(tiny_llama):
    mask = compute_mask(tiny_llama, small_config(method="random"), progress=False)
    moved = {n: (None if i is None else i.to(torch.int32).as_subclass(_DeviceTensor)) for n, i in mask.indices.items()}
    with pytest.raises(TypeError, match="cuda"):
        next(i for i in moved.values() if i is not None).numpy()
    again = SparseMask(config=mask.config, indices=moved, shapes=mask.shapes)
    for idx in again.indices.values():
        assert type(idx) is torch.Tensor and idx.device.type == "cpu" and idx.dtype == torch.long
    assert again.checksum == mask.checksum
