"""SparseMask and the trained sparse delta go through the Hub API and come back bit-exact.

The Hub is the loopback fake in `hub_server.py`; pushes and pulls run in a subprocess with
HF_ENDPOINT pointing at it, exactly as a user's script would.
"""

from __future__ import annotations

import json

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
