"""MeerkatModel: the sparse view, files, merging, low precision."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from meerkat_hf import MeerkatModel, SparseMaskConfig, compute_mask, get_meerkat_model


def random_mask(model, density=0.02, seed=0, method="random"):
    return compute_mask(model, SparseMaskConfig(density=density, method=method, seed=seed), progress=False)


def test_write_touches_only_masked_coordinates(tiny_any):
    before = {n: p.detach().clone() for n, p in tiny_any.named_parameters()}
    mask = random_mask(tiny_any)
    mm = get_meerkat_model(tiny_any, mask)
    assert all(not p.requires_grad for p in tiny_any.parameters())
    new = mm.values + torch.randn(mm.num_selected)
    mm.set_values(new)
    assert torch.equal(mm.sparse.gather(), new)
    for name, p in tiny_any.named_parameters():
        flat_before, flat_after = before[name].reshape(-1), p.detach().reshape(-1)
        changed = torch.nonzero(flat_before != flat_after).flatten()
        idx = mask.indices.get(name)
        allowed = set() if idx is None else set(idx.tolist())
        assert set(changed.tolist()) <= allowed, name
    assert torch.equal(mm.delta, new - mm.base_values)


def test_wrapped_model_behaves_like_the_base_model(tiny_llama):
    ids = torch.tensor([[1, 5, 9, 12]])
    ref = tiny_llama(ids).logits
    mm = get_meerkat_model(tiny_llama, random_mask(tiny_llama))
    assert torch.equal(mm(input_ids=ids).logits, ref)
    assert mm.config is tiny_llama.config  # attribute passthrough, like PeftModel
    out = mm.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    with pytest.raises(ValueError, match="already a MeerkatModel"):
        get_meerkat_model(mm, mm.mask)


def test_save_and_from_pretrained_round_trip(tmp_path, tiny_llama):
    mask = random_mask(tiny_llama)
    mm = get_meerkat_model(tiny_llama, mask)
    mm.set_values(mm.values + 0.01 * torch.randn(mm.num_selected))
    mm.save_pretrained(tmp_path, training_summary={"rounds": 3, "accuracy_after": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "mask.safetensors", "mask_config.json", "meerkat_config.json", "sparse_delta.safetensors"]
    assert (tmp_path / "sparse_delta.safetensors").stat().st_size < 8 * mm.num_selected + 1024
    card = (tmp_path / "README.md").read_text()
    assert "library_name: meerkat-hf" in card and "Accuracy after" in card
    fresh = tiny_model("llama")  # same init seed as the fixture: the same base weights
    loaded = MeerkatModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded.values, mm.values)
    for (n, a), (_, b) in zip(tiny_llama.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"


def test_loading_a_delta_trained_with_another_mask_fails(tmp_path, tiny_llama):
    mm = get_meerkat_model(tiny_llama, random_mask(tiny_llama, seed=1))
    mm.save_pretrained(tmp_path, model_card=False)
    other = get_meerkat_model(tiny_model("llama"), random_mask(tiny_model("llama"), seed=2))
    with pytest.raises(ValueError, match="another mask"):
        other.load_delta(tmp_path)
    blob = (tmp_path / "sparse_delta.safetensors").read_bytes()
    (tmp_path / "sparse_delta.safetensors").write_bytes(blob[:-8])
    with pytest.raises(ValueError, match="hash mismatch"):
        mm.load_delta(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_do_not_drift(dtype):
    model = tiny_model("llama", dtype=dtype)
    mm = get_meerkat_model(model, random_mask(model))
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # the MeZO dance: +eps, -2eps, +eps, written from the fp32 master
        z = torch.randn(mm.num_selected, generator=gen)
        mm.write(mm.values + 1e-3 * z)
        mm.write(mm.values - 1e-3 * z)
        mm.write(mm.values)
    assert mm.values.dtype == torch.float32
    assert torch.equal(mm.sparse.gather(), mm.values.to(dtype).float())


def test_mask_from_another_model_is_rejected(tiny_llama):
    mask = random_mask(tiny_model("qwen2"))
    with pytest.raises(ValueError, match="missing|shape"):
        get_meerkat_model(tiny_llama, mask)


def test_delta_card_carries_hub_metadata_and_results(tmp_path, tiny_llama):
    mm = get_meerkat_model(tiny_llama, compute_mask(tiny_llama, SparseMaskConfig(density=0.02, method="random"),
                                                    progress=False))
    mm.save_pretrained(tmp_path / "delta", training_summary={
        "accuracy_before": 0.5, "accuracy_after": 0.75, "uplink_bytes": 1234, "datasets": ["nyu-mll/glue"]})
    card = (tmp_path / "delta" / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "library_name: meerkat-hf" in metadata and "- nyu-mll/glue" in metadata and "- zeroth-order" in metadata
    assert "| Accuracy before | 0.5 |" in card and "| Accuracy after | 0.75 |" in card and "| Uplink bytes | 1,234 |" in card
    assert "license: other" in metadata and "pipeline_tag: text-generation" in metadata  # a base of unknown license
    mm.save_pretrained(tmp_path / "mit", license="mit")
    assert "license: mit" in (tmp_path / "mit" / "README.md").read_text().split("---")[1]


def test_peft_shaped_api(tiny_llama, capsys):
    mm = get_meerkat_model(tiny_llama, random_mask(tiny_llama))
    mm.set_values(mm.base_values + 0.5)
    ids = torch.tensor([[1, 5, 9, 2]])
    trained = mm(input_ids=ids).logits
    assert mm.get_base_model() is tiny_llama
    with mm.disable_adapter():
        base = mm(input_ids=ids).logits
        assert torch.equal(mm.sparse.gather(), mm.base_values)
    assert not torch.equal(base, trained) and torch.equal(mm(input_ids=ids).logits, trained)  # restored on exit
    with pytest.raises(RuntimeError), mm.disable_adapter():
        raise RuntimeError("inside the block")
    assert torch.equal(mm.sparse.gather(), mm.values)  # restored on an exception too
    k, total = mm.get_nb_trainable_parameters()
    assert k == mm.num_selected == mm.num_parameters(only_trainable=True) and total == tiny_llama.num_parameters()
    assert mm.num_parameters() == tiny_llama.num_parameters()
    mm.print_trainable_parameters()
    assert f"trainable params: {k:,}" in capsys.readouterr().out
    for name in ("set_adapter", "load_adapter", "active_adapters", "disable_adapters"):
        with pytest.raises(AttributeError, match=f"MeerkatModel has no {name}\\(\\): a Meerkat delta is not a PEFT adapter"):
            getattr(mm, name)
    assert not hasattr(mm, "active_adapters")
    plain = mm.unload()
    assert plain is tiny_llama and torch.equal(plain(input_ids=ids).logits, base)
