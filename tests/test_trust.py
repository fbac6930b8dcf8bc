"""Trust boundaries (issue 11): server-side bounds, client identity, checkpoint integrity, resume."""

from __future__ import annotations

import logging

import pytest
import torch

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import FederationConfig
from meerkat_hf.federated.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from meerkat_hf.federated.driver import FederationHooks, SimulatedCrash, run_federation


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return root, make_model_dir(root), make_task_files(root)


def _config(tmp_path, assets, **kw) -> FederationConfig:
    _, model_dir, files = assets
    return FederationConfig.from_dict(base_config(tmp_path, model_dir, files, **kw))


# -- 3. checkpoints ---------------------------------------------------------------------------------
def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def test_checkpoint_hash_weights_only_and_fallback(tmp_path, caplog):
    state = {"server": {"values": torch.arange(5, dtype=torch.float32), "history": [(0, [(1, 2, 1, [0.5], [])])]},
             "config": {"lr": 1e-3, "task": {"verbalizer": [" a", " b"]}, "x": None}, "clients": [{"steps_done": 3}]}
    for r in range(3):
        save_checkpoint(tmp_path, r, {**state, "tag": r}, keep=2)
    paths = list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["round_000001.pt", "round_000002.pt"]  # the last two are kept
    assert read_checkpoint(paths[-1])["tag"] == 2
    # every single-bit flip anywhere in the newest file is detected; the previous one is used instead
    newest = paths[-1].read_bytes()
    for offset in (0, 9, 40, len(newest) // 2, len(newest) - 1):
        paths[-1].write_bytes(newest)
        _flip(paths[-1], offset)
        with pytest.raises(CheckpointError):
            read_checkpoint(paths[-1])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ck = load_latest_checkpoint(tmp_path)
        assert ck["tag"] == 1 and ck["path"].endswith("round_000001.pt")
        assert "falling back to the previous one" in caplog.text
    paths[-1].write_bytes(newest[: len(newest) // 3])  # truncated
    assert load_latest_checkpoint(tmp_path)["tag"] == 1
    _flip(paths[0], 100)
    assert load_latest_checkpoint(tmp_path) is None  # nothing intact: nothing to resume from


def test_checkpoint_refuses_pickled_code(tmp_path):
    import hashlib
    import io

    from meerkat_hf.federated import checkpoint as ckpt

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"format": ckpt.FORMAT, "round": 0, "evil": Evil()}, buf)
    payload = buf.getvalue()  # a correct hash: only weights_only=True stops it
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "round_000000.pt").write_bytes(ckpt.MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint(folder / "round_000000.pt")


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, assets, caplog):
    kw = dict(rounds=4, client_fraction=0.5, eval_every=4)
    full = run_federation(_config(tmp_path / "a", assets, **kw))

    def crash(r, row):
        if r == 2:
            raise SimulatedCrash("power cut after round 2")

    with pytest.raises(SimulatedCrash):
        run_federation(_config(tmp_path / "b", assets, **kw), hooks=FederationHooks(after_round=crash))
    paths = list_checkpoints(tmp_path / "b" / "run")
    assert [p.name for p in paths] == ["round_000001.pt", "round_000002.pt"]
    _flip(paths[-1], len(paths[-1].read_bytes()) // 2)
    caplog.set_level(logging.WARNING)
    resumed = run_federation(_config(tmp_path / "b", assets, resume=True, **kw))
    assert "falling back to the previous one" in caplog.text
    assert resumed.state_digest == full.state_digest  # round 2 is redone from round 1's checkpoint


# -- 4. resume=True with nothing to resume from is a fresh run ------------------------------------
@pytest.mark.parametrize("algorithm", ["random-early-stop", "meerkat-vp"])
def test_resume_without_checkpoint_equals_fresh_run(tmp_path, assets, algorithm):
    kw = dict(algorithm=algorithm, rounds=3, local_steps=3, eval_every=3, vp={"random_count": 2}
              if algorithm == "random-early-stop" else {"min_steps": 2, "ratio_threshold": 0.9})
    fresh = run_federation(_config(tmp_path / "a", assets, **kw))
    resumed = run_federation(_config(tmp_path / "b", assets, resume=True, **kw))
    assert resumed.state_digest == fresh.state_digest
    assert resumed.limited_clients == fresh.limited_clients
    assert [r["budgets"] for r in resumed.metrics] == [r["budgets"] for r in fresh.metrics]
    if algorithm == "random-early-stop":
        assert len(fresh.limited_clients) == 2
