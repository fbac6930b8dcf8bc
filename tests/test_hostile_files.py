"""Hostile files (issue 29.2): every hash consistent, the content still refused with one line naming the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from meerkat_hf import MeerkatModel, SparseMask
from meerkat_hf.federated import FederatedServer, LRSchedule, ProtocolParams
from meerkat_hf.hub.artifacts import sha256_bytes
from meerkat_hf.masks.mask import config_content_sha256
from test_delta_files import base_dir, trained  # noqa: F401  (base_dir is a fixture)


def _rehash(folder: Path) -> None:
    """Recompute every hash a delta folder records, as a hostile sender who edits files would."""
    mask_cfg = folder / "mask_config.json"
    raw = json.loads(mask_cfg.read_text())
    raw["meerkat_mask"]["weights_sha256"] = sha256_bytes((folder / "mask.safetensors").read_bytes())
    raw["meerkat_mask"]["config_sha256"] = config_content_sha256(raw)
    mask_cfg.write_text(json.dumps(raw, indent=2))
    delta_cfg = folder / "meerkat_config.json"
    if delta_cfg.is_file():
        cfg = json.loads(delta_cfg.read_text())
        cfg["weights_sha256"] = sha256_bytes((folder / "sparse_delta.safetensors").read_bytes())
        cfg["files_sha256"] = {n: sha256_bytes((folder / n).read_bytes()) for n in cfg["files_sha256"]}
        cfg["config_sha256"] = config_content_sha256(cfg)
        delta_cfg.write_text(json.dumps(cfg, indent=2))


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_a_delta_with_non_finite_or_absurd_values_is_refused(tmp_path, base_dir, bad):  # noqa: F811
    folder = tmp_path / "delta"
    trained(base_dir).save_pretrained(folder, model_card=False)
    path = folder / "sparse_delta.safetensors"
    tensors = load_file(path)
    tensors["values"][0] = bad
    save_file(tensors, path, metadata={"format": "pt", "meerkat": "sparse_delta"})
    _rehash(folder)
    with pytest.raises(ValueError) as err:
        MeerkatModel.from_pretrained(folder)
    message = _one_line(err)
    assert "sparse_delta.safetensors" in message and ("NaN/inf" in message or "beyond" in message)


def test_a_mask_whose_gp_is_nan_is_refused_not_silently_vp_less(tmp_path, base_dir):  # noqa: F811
    folder = tmp_path / "mask"
    mask = trained(base_dir).mask
    mask.pretrain_grad = torch.randn(mask.num_selected)  # as a sensitivity mask carries it
    mask.save_pretrained(folder)
    assert SparseMask.from_pretrained(folder).pretrain_grad is not None
    path = folder / "mask.safetensors"
    tensors = load_file(path)
    tensors["pretrain_grad"][:] = float("nan")
    save_file(tensors, path, metadata={"format": "pt", "meerkat": "mask"})
    _rehash(folder)
    with pytest.raises(ValueError) as err:
        SparseMask.from_pretrained(folder)
    assert "mask.safetensors" in _one_line(err) and "g_p" in str(err.value)


def test_mask_configs_of_the_wrong_shape_oversized_or_nested_are_one_line(tmp_path, base_dir, caplog):  # noqa: F811
    folder = tmp_path / "mask"
    trained(base_dir).mask.save_pretrained(folder)
    cfg_path, weights = folder / "mask_config.json", folder / "mask.safetensors"
    good_cfg, good_weights = cfg_path.read_text(), weights.read_bytes()

    raw = json.loads(good_cfg)
    raw["meerkat_mask"]["parameter_shapes"] = list(raw["meerkat_mask"]["parameter_shapes"].items())
    raw["meerkat_mask"]["config_sha256"] = config_content_sha256(raw)
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'parameter_shapes' a mapping") as err:
        SparseMask.from_pretrained(folder)
    _one_line(err)

    cfg_path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply") as err:
        SparseMask.from_pretrained(folder)
    _one_line(err)

    cfg_path.write_text(good_cfg)
    weights.write_bytes(good_weights + bytes(10 << 20))  # far more than its k indices and g_p can take
    with pytest.raises(ValueError, match="more than the") as err:
        SparseMask.from_pretrained(folder)
    _one_line(err)

    weights.write_bytes(good_weights)
    raw = json.loads(good_cfg)
    del raw["meerkat_mask"]["config_sha256"]  # a file from before the hash: loads, and says what it lacks
    cfg_path.write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        SparseMask.from_pretrained(folder)
    assert "has no config_sha256" in caplog.text


def test_a_checkpoint_with_non_finite_server_values_does_not_resume(base_dir):  # noqa: F811
    mm = trained(base_dir)
    server = FederatedServer(mm.base_values, mm.mask.checksum, mm.mask.fingerprint, ProtocolParams(0, LRSchedule(1e-3)),
                             num_clients=2)
    state = server.state_dict()
    state["values"] = state["values"].clone()
    state["values"][3] = float("nan")
    with pytest.raises(ValueError, match=r"runs/x/round_000002\.pt: 1 of the \d+ values of the server's global state are NaN/inf"):
        server.load_state_dict(state, source="runs/x/round_000002.pt")
    assert torch.isfinite(server.values).all()


@pytest.mark.parametrize("record", ["gpt2", {"kind": "local", "path": "/x", "dtype": "no_such_dtype"},
                                    {"kind": "teleport", "name_or_path": "x"}, {"kind": "hub", "name_or_path": 3}])
def test_a_malformed_base_record_is_one_line(tmp_path, base_dir, record):  # noqa: F811
    folder = tmp_path / "delta"
    trained(base_dir).save_pretrained(folder, model_card=False)
    cfg = json.loads((folder / "meerkat_config.json").read_text())
    cfg["base_model"] = record
    cfg["config_sha256"] = config_content_sha256(cfg)
    (folder / "meerkat_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is not a valid base-model record") as err:
        MeerkatModel.from_pretrained(folder)
    _one_line(err)


def test_a_downloaded_delta_cannot_point_this_machine_at_a_local_folder():
    from meerkat_hf.modeling.model import check_base_record

    record = {"kind": "local", "name_or_path": "/home/victim/model", "path": "/home/victim/model"}
    with pytest.raises(ValueError, match="not followed unless you pass allow_local_base=True"):
        check_base_record(record, Path("cache/meerkat_config.json"), downloaded=True, allow_local_base=False)
    check_base_record(record, Path("x"), downloaded=True, allow_local_base=True)  # the user allowed it
    check_base_record(record, Path("x"), downloaded=False, allow_local_base=False)  # the user's own folder


def test_leftovers_of_killed_saves_are_removed_at_the_next_save(tmp_path, base_dir):  # noqa: F811
    import os
    import time

    from meerkat_hf.federated.checkpoint import save_checkpoint

    folder = tmp_path / "mask"
    mask = trained(base_dir).mask
    mask.save_pretrained(folder)
    old = time.time() - 3600
    stale = [folder / ".README.md.0123456789ab.tmp", folder / ".mask.safetensors.0123456789ab.bak"]
    fresh = folder / ".mask_config.json.ba9876543210.tmp"  # another process may be saving right now
    for path in [*stale, fresh]:
        path.write_bytes(b"partial")
    for path in stale:
        os.utime(path, (old, old))
    mask.save_pretrained(folder)
    assert not any(p.exists() for p in stale) and fresh.exists()
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "round_000003.pt.tmp").write_bytes(b"killed mid-save")
    save_checkpoint(tmp_path / "run", 4, {"server": {}})
    assert sorted(p.name for p in ckpts.iterdir()) == ["round_000004.pt"]
