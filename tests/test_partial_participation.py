"""Partial participation at scale (issue 15, item 5): 1,000 simulated clients, 1% per round, seeded
dropouts, stragglers (late or never), duplicated and replayed uplinks; every uplink accounted for,
a crash mid-way resumed to the same bits. The few-hundred-round run is research/partial_participation.py."""

from __future__ import annotations

import json

import pytest
import torch

from chaos_support import SeededFaults, audit, in_flight
from federated_support import base_config, make_model_dir, make_task_files, toy_rows, write_csv
from meerkat_hf.federated import FederationConfig
from meerkat_hf.federated.checkpoint import (
    CheckpointError,
    list_checkpoints,
    pack_client_states,
    read_checkpoint,
    save_checkpoint,
    unpack_client_states,
)
from meerkat_hf.federated.protocol.client import ClientState
from meerkat_hf.federated.driver import FederationHooks, SimulatedCrash, run_federation

CLIENTS, FRACTION, ROUNDS, CHECKPOINT_EVERY, SEED = 1000, 0.01, 20, 4, 7


def scale_config(root, model_dir: str, files: dict, **kw) -> dict:
    """1,000 clients on 6,000 rows (Dirichlet alpha 2: 1-16 rows each), one local step, evaluated once at the end."""
    settings = dict(num_clients=CLIENTS, client_fraction=FRACTION, rounds=ROUNDS, local_steps=1, batch_size=2,
                    eval_before=False, eval_every=10**6, eval_examples=16, checkpoint_every=CHECKPOINT_EVERY,
                    partition={"scheme": "dirichlet", "alpha": 2.0})
    return base_config(root, model_dir, files, **{**settings, **kw})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    files = {"train": write_csv(root / "train.csv", toy_rows(6 * CLIENTS, 0)),
             "test": write_csv(root / "test.csv", toy_rows(16, 1))}
    return root, make_model_dir(root), files


def _config(tmp_path, assets, **kw) -> FederationConfig:
    _, model_dir, files = assets
    return FederationConfig.from_dict(scale_config(tmp_path, model_dir, files, **kw))


def _rows(path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_every_uplink_accounted_for_and_a_crash_resumes_exactly(tmp_path, assets):
    faults = SeededFaults(SEED)
    reference = run_federation(_config(tmp_path / "a", assets), hooks=faults.hooks())
    rows = reference.metrics
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(len(r["participants"]) == CLIENTS * FRACTION for r in rows)

    counts, problems = audit(faults, rows, reference.config, reference.initial_values)
    assert problems == []
    for key in ("dropped", "late", "late arrived", "never", "duplicated", "replayed", "rejected stale-round",
                "rejected sender-mismatch", "rejected duplicate"):
        assert counts.get(key, 0) > 0, (key, counts)  # every kind of fault occurred and was recorded
    assert counts["accepted"] + counts["missing"] == counts["participations"] == ROUNDS * CLIENTS * FRACTION

    # The checkpoint is small whatever the number of clients: client states as columns, and only the
    # global states a records downlink can still start from.
    ckpt = read_checkpoint(list_checkpoints(tmp_path / "a" / "run")[-1])
    assert len(unpack_client_states(ckpt["clients"])) == CLIENTS
    assert all(isinstance(column, torch.Tensor) for column in ckpt["clients"].values())
    first = ckpt["server"]["history"][0][0]
    assert all(first <= r <= ROUNDS for r in ckpt["global_states"])

    # Crash two rounds after a checkpoint that carries a straggler's uplink still on its way.
    mid = [k for k in range(CHECKPOINT_EVERY, ROUNDS - CHECKPOINT_EVERY, CHECKPOINT_EVERY)
           if in_flight(faults, rows, k)]
    assert mid, "no checkpoint with a late uplink in flight: pick another seed"
    resume_from = mid[len(mid) // 2]
    shared = SeededFaults(SEED)  # one harness across the crash: its recording survives, as it would
    with pytest.raises(SimulatedCrash):
        run_federation(_config(tmp_path / "b", assets), hooks=shared.hooks(crash_after=resume_from + 1))
    assert read_checkpoint(list_checkpoints(tmp_path / "b" / "run")[-1])["late_uplinks"]
    resumed = run_federation(_config(tmp_path / "b", assets, resume=True), hooks=shared.hooks())
    assert resumed.state_digest == reference.state_digest
    assert torch.equal(resumed.final_values, reference.final_values)
    assert _rows(tmp_path / "b" / "run" / "metrics.jsonl") == _rows(tmp_path / "a" / "run" / "metrics.jsonl")
    assert shared.changed == [] and faults.changed == []  # the redone rounds sent the same bytes


def test_delay_uplink_must_be_a_round_count(tmp_path, assets):
    _, model_dir, _ = assets
    config = FederationConfig.from_dict(base_config(tmp_path, model_dir, make_task_files(tmp_path), rounds=1))
    hooks = FederationHooks(delay_uplink=lambda r, c: -1)
    with pytest.raises(ValueError, match="delay_uplink must return an integer >= 0 or None, got -1"):
        run_federation(config, hooks=hooks)


def test_client_states_as_columns_and_format_2_still_read(tmp_path, monkeypatch):
    from meerkat_hf.federated import checkpoint

    states = [ClientState(epoch=2, position=5, steps_done=9, examples_seen=18, rounds_done=3, nan_steps=1,
                          synced_round=7), ClientState(synced_round=None), ClientState()]
    packed = pack_client_states(states)
    assert set(packed) == set(states[0].to_dict()) and all(len(v) == 3 for v in packed.values())
    assert unpack_client_states(packed) == states
    assert unpack_client_states([st.to_dict() for st in states]) == states  # format 2: a dict per client
    with pytest.raises(CheckpointError, match="lack the columns"):
        unpack_client_states({k: v for k, v in packed.items() if k != "epoch"})
    monkeypatch.setattr(checkpoint, "FORMAT", 2)  # a checkpoint written before the columns
    save_checkpoint(tmp_path, 2, {"clients": [st.to_dict() for st in states]})
    assert unpack_client_states(read_checkpoint(list_checkpoints(tmp_path)[-1])["clients"]) == states
    monkeypatch.setattr(checkpoint, "FORMAT", 9)
    save_checkpoint(tmp_path, 3, {})
    with pytest.raises(CheckpointError, match="has checkpoint format 9, this build reads 2, 3"):
        read_checkpoint(list_checkpoints(tmp_path)[-1])
