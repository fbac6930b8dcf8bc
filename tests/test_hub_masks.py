"""SparseMask and the trained sparse delta go through the Hub API and come back bit-exact.

The Hub is the loopback fake in `hub_server.py`; pushes and pulls run in a subprocess with
HF_ENDPOINT pointing at it, exactly as a user's script would.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from hub_server import fake_hub, run_with_hub  # noqa: F401  (fixture)
from meerkat_hf import SparseMask, SparseMaskConfig, compute_mask, get_meerkat_model


def test_mask_push_then_from_pretrained_by_repo_id(fake_hub, tmp_path, tiny_tokenizer, corpus):  # noqa: F811
    mask = compute_mask(tiny_model("llama"), SparseMaskConfig(density=0.01, calibration_num_sequences=4,
                        calibration_seq_len=16), corpus, tiny_tokenizer, progress=False)
    mask.save_pretrained(tmp_path / "local")
    result = run_with_hub(fake_hub, f"""
        import json
        from meerkat_hf import SparseMask
        local = SparseMask.from_pretrained({str(tmp_path / "local")!r})
        url = local.push_to_hub("hospital-net/smol-mask")
        remote = SparseMask.from_pretrained("hospital-net/smol-mask", cache_dir={str(tmp_path / "cache")!r})
        remote.save_pretrained({str(tmp_path / "pulled")!r})
        print(json.dumps({{"url": url, "checksum": remote.checksum}}))
    """)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["checksum"] == mask.checksum
    files = fake_hub.files("hospital-net/smol-mask")
    assert {"mask_config.json", "mask.safetensors", "README.md"} <= set(files)
    assert "hospital-net/smol-mask" in files["README.md"].decode()  # card rendered with the repo id
    pulled = SparseMask.from_pretrained(tmp_path / "pulled")
    for name in mask.indices:
        assert torch.equal(pulled.indices[name], mask.indices[name])
    assert torch.equal(pulled.pretrain_grad, mask.pretrain_grad)
    assert not fake_hub.unknown_requests


def test_sparse_delta_push_and_load_on_a_fresh_base(fake_hub, tmp_path):  # noqa: F811
    base = tiny_model("llama")
    mm = get_meerkat_model(base, compute_mask(base, SparseMaskConfig(density=0.02, method="random"), progress=False))
    mm.set_values(mm.values + 0.05 * torch.randn(mm.num_selected, generator=torch.Generator().manual_seed(0)))
    mm.save_pretrained(tmp_path / "delta", training_summary={"rounds": 2})
    torch.save(mm.values, tmp_path / "expected.pt")
    run_with_hub(fake_hub, f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from conftest import tiny_model
        from meerkat_hf import MeerkatModel, SparseMask
        mask = SparseMask.from_pretrained({str(tmp_path / "delta")!r})
        mm = MeerkatModel.from_pretrained(tiny_model("llama"), {str(tmp_path / "delta")!r})
        mm.push_to_hub("school-a/smol-delta", training_summary={{"rounds": 2}})
        again = MeerkatModel.from_pretrained(tiny_model("llama"), "school-a/smol-delta")
        assert torch.equal(again.values, torch.load({str(tmp_path / "expected.pt")!r})), "values differ"
        print("ok")
    """)
    assert {"sparse_delta.safetensors", "meerkat_config.json", "mask.safetensors"} <= set(fake_hub.files("school-a/smol-delta"))


def test_masks_are_named_by_convention_and_listed_by_base_model(fake_hub, tmp_path):
    from meerkat_hf import mask_repo_name

    assert mask_repo_name("HuggingFaceTB/SmolLM2-135M-Instruct", 1e-5) == "SmolLM2-135M-Instruct-meerkat-mask-1e-05"
    with pytest.raises(ValueError, match="density"):
        mask_repo_name("org/base", 0)
    result = run_with_hub(fake_hub, f"""
        import json, torch
        from meerkat_hf import SparseMask, SparseMaskConfig, list_masks, mask_repo_name
        from meerkat_hf.hub import resolve_folder

        def publish(base, density):
            cfg = SparseMaskConfig(method="random", density=density, base_model_name_or_path=base)
            mask = SparseMask(config=cfg, indices={{"w": torch.tensor([0, 3])}}, shapes={{"w": [4, 4]}})
            repo = "me/" + mask_repo_name(base, density)
            mask.push_to_hub(repo)
            return repo

        published = [publish("org/tiny-base", 1e-3), publish("org/tiny-base", 1e-2), publish("org/other-base", 1e-3)]
        resolve_folder(published[0], cache_dir={str(tmp_path / "cache")!r})
        print(json.dumps({{"published": published, "tiny": list_masks("org/tiny-base"), "all": list_masks(),
                          "mine": list_masks(author="me"), "nobody": list_masks(author="nobody")}}))
        """)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(out["tiny"]) == sorted(out["published"][:2])
    assert sorted(out["all"]) == sorted(out["mine"]) == sorted(out["published"]) and out["nobody"] == []
    assert any("meerkat-hf/" in agent for agent in fake_hub.user_agents)  # downloads say which library asked
