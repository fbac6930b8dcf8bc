"""A Meerkat delta as a plain PEFT SHiRA adapter (issue 28.1): loaded where meerkat-hf is not even imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from federated_support import make_model_dir
from meerkat_hf import MeerkatModel, SparseMaskConfig, compute_mask, get_meerkat_model
from meerkat_hf.cli import main

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def trained_delta(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft-export")
    model_dir = make_model_dir(root)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(method="random", density=0.05), progress=False))
    mm.set_values(mm.base_values + 0.01 * torch.randn(mm.num_selected, generator=torch.Generator().manual_seed(0)))
    mm.save_pretrained(root / "delta")
    mm.merge_and_unload().save_pretrained(root / "merged")  # the reference, computed beside PEFT in one process
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    return root, model_dir, mm, ids, root / "merged"


def _load_with_plain_peft(model_dir, adapter, ids, merged, out):
    """PEFT's outputs and the merged model's, in a process that never imports meerkat_hf (same threads, same bits)."""
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import AutoPeftModelForCausalLM, PeftModel
        ids = torch.tensor({ids.tolist()})
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({model_dir!r}), {str(adapter)!r})(input_ids=ids).logits
        b = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})(input_ids=ids).logits
        ref = AutoModelForCausalLM.from_pretrained({str(merged)!r})(input_ids=ids).logits
        torch.save({{"peft": a, "auto": b, "merged": ref, "meerkat_imported": "meerkat_hf" in sys.modules}}, {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    return torch.load(out)


def test_export_loads_in_plain_peft_bit_equal_to_merge_and_unload(trained_delta, tmp_path):
    root, model_dir, mm, ids, merged = trained_delta
    plan = mm.export_peft(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == plan.r
    assert plan.real_entries + sum(mm.mask.counts()[f"{m}.weight"] for m in plan.dense_modules
                                   if f"{m}.weight" in mm.mask.counts()) == mm.num_selected
    got = _load_with_plain_peft(model_dir, tmp_path / "adapter", ids, merged, tmp_path / "out.pt")
    assert not got["meerkat_imported"]
    assert torch.equal(got["peft"], got["merged"]) and torch.equal(got["auto"], got["merged"])
    assert "peft >= 0.21.0" in (tmp_path / "adapter" / "README.md").read_text()


def test_export_refuses_heavy_padding_unless_forced_and_the_cli_writes_it(trained_delta, tmp_path, capsys,
                                                                          monkeypatch):
    from meerkat_hf.modeling import peft_export

    root, model_dir, mm, ids, merged = trained_delta
    assert mm.export_peft(tmp_path / "small", max_padding=1.01).padding_ratio > 1.01  # tiny: written anyway
    monkeypatch.setattr(peft_export, "PADDING_FREE_BYTES", 0)  # as if the adapter were large
    with pytest.raises(ValueError, match="padding ratio .* above max_padding=1.01"):
        mm.export_peft(tmp_path / "refused", max_padding=1.01)
    assert not (tmp_path / "refused").exists()
    monkeypatch.undo()
    code = main(["export", str(root / "delta"), str(tmp_path / "cli"), "--peft", "--base", model_dir])
    assert code == 0 and "wrote a PEFT SHiRA adapter" in capsys.readouterr().out
    got = _load_with_plain_peft(model_dir, tmp_path / "cli", ids, merged, tmp_path / "cli.pt")
    assert torch.equal(got["peft"], got["merged"])
    assert MeerkatModel.from_pretrained(root / "delta", base_model=model_dir).num_selected == mm.num_selected


def test_a_linear_only_mask_exports_without_dense_modules(trained_delta, tmp_path):
    from transformers import AutoModelForCausalLM

    root, model_dir, *_ = trained_delta
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    mask = compute_mask(model, SparseMaskConfig(method="random", density=0.05, target="linear"), progress=False)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(mask.indices) <= linear and mask.num_selected > 0
    mm = get_meerkat_model(model, mask)
    mm.set_values(mm.base_values + 0.01)
    plan = mm.export_peft(tmp_path / "linear")
    assert plan.dense_modules == [] and plan.real_entries == mask.num_selected
    with pytest.raises(ValueError, match="unknown mask target 'conv'"):
        SparseMaskConfig(target="conv")
