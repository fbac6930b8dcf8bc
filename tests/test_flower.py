"""Flower deployment (the optional `flower` extra): Meerkat's ServerApp/ClientApp in Flower's
simulation engine (Ray backend) reach the very bits of the in-process `run_federation`, and a
client whose reply is malformed is dropped from the round with a logged reason.

Skipped where flwr is not installed (the main test run). CI tests the extra on its own, in a
separate virtualenv, with MEERKAT_REQUIRE_FLWR=1: there a missing flwr is an error, not a skip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported; no network here
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

if os.environ.get("MEERKAT_REQUIRE_FLWR") == "1":
    import flwr  # noqa: F401  (hard import: the flower CI step must never skip)
else:
    pytest.importorskip("flwr")

import torch
import yaml

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import FederationConfig, run_federation
from meerkat_hf.federated.checkpoint import load_latest_checkpoint
from meerkat_hf.federated.protocol.codec import decode_uplink, uplink_size
from meerkat_hf.federated.driver import FederationHooks
from meerkat_hf.federated.flower import (
    FlowerOptions,
    federation_config_from_run_config,
    options_from_run_config,
    run_flower_simulation,
)
from meerkat_hf.federated.flower import messages as M

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"
ROUNDS = 2
CLIENTS = 3
LOCAL_STEPS = 3


@pytest.fixture(scope="module")
def fed_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    return root, make_model_dir(root), make_task_files(root)


def _config(fed_files, name: str) -> dict:
    root, model_dir, files = fed_files
    # Meerkat-VP with a 2-step window: clients are judged after round 0, so round 1's budgets
    # come from the detector -- the scheduler is part of what must match.
    return base_config(root / name, model_dir, files, algorithm="meerkat-vp", num_clients=CLIENTS, rounds=ROUNDS,
                       local_steps=LOCAL_STEPS, partition={"scheme": "iid"}, vp={"min_steps": 2},
                       output_dir=str(root / name / "out"))


def _both(cfg: dict, hooks: FederationHooks | None = None):
    ref = run_federation(FederationConfig.from_dict({**cfg, "output_dir": cfg["output_dir"] + "-driver"}), hooks=hooks)
    res = run_flower_simulation(FederationConfig.from_dict(cfg), hooks=hooks, options=FlowerOptions(round_timeout=300))
    return ref, res


def _assert_same_federation(ref, res) -> None:
    assert res.final_values.dtype == torch.float32
    assert torch.equal(res.final_values, ref.final_values), "Flower's global w_S differs from run_federation's"
    assert res.state_digest == ref.state_digest
    # The same rounds: same participants, budgets (VP), accepted clients, state after every round.
    for key in ("participants", "budgets", "accepted", "limited_clients", "state_digest", "uplink_bytes",
                "downlink_bytes"):
        assert [row[key] for row in res.metrics] == [row[key] for row in ref.metrics], key
    assert res.limited_clients == ref.limited_clients
    # The round checkpoint on disk holds the same bits.
    ckpt = load_latest_checkpoint(res.output_dir)
    assert ckpt["round"] == ROUNDS and torch.equal(ckpt["server"]["values"], ref.final_values)


def _report_bytes(res) -> None:
    print(f"\nbytes per round, {CLIENTS} clients x T={LOCAL_STEPS} (codec payload | serialized Flower messages):")
    for row in res.metrics:
        fm = row["flower_message_bytes"]
        print(f"  round {row['round']}: uplink {row['uplink_bytes']} | {fm['uplink']}   "
              f"downlink {row['downlink_bytes']} ({row['downlink_kinds']}) | {fm['downlink']}   hello | {fm['hello']}")


def test_flower_simulation_matches_run_federation(fed_files):
    ref, res = _both(_config(fed_files, "clean"))
    _assert_same_federation(ref, res)
    assert all(row["accepted"] == list(range(CLIENTS)) and not row["rejected"] for row in res.metrics)
    assert sorted(res.clients) == list(range(CLIENTS))
    assert all(not row["replay_mismatches"] for row in res.metrics)
    # Every uplink is T float32 scalars + the 52-byte frame; the Flower message around it stays
    # a few hundred bytes, independent of the model size.
    row0 = res.metrics[0]
    assert row0["uplink_bytes"] == sum(uplink_size(b) for b in row0["budgets"].values())
    assert 0 < row0["flower_message_bytes"]["uplink"] < CLIENTS * 1024
    _report_bytes(res)


def tamper(round_id: int, client_id: int, data: bytes) -> list[bytes]:
    """Round 0: client 1 sends garbage; round 1: client 2 signs with another mask's checksum."""
    if round_id == 0 and client_id == 1:
        return [b"garbage that is not a Meerkat uplink, long enough to pass the length check"]
    if round_id == 1 and client_id == 2:
        return [dataclasses.replace(decode_uplink(data), mask_checksum=bytes(16)).encode()]
    return [data]


def test_flower_drops_malformed_replies(fed_files, caplog):
    caplog.set_level(logging.WARNING, logger="meerkat_hf")
    hooks = FederationHooks(tamper_uplink=tamper)
    ref, res = _both(_config(fed_files, "tampered"), hooks)
    _assert_same_federation(ref, res)
    r0, r1 = res.metrics
    assert r0["accepted"] == [0, 2] and r1["accepted"] == [0, 1]
    assert [(x["client_id"], x["reason"]) for x in r0["rejected"]] == [(None, "bad-magic")]
    assert [(x["client_id"], x["reason"]) for x in r1["rejected"]] == [(2, "wrong-mask")]
    logged = [rec.getMessage() for rec in caplog.records if "rejected uplink" in rec.getMessage()]
    assert any("round 0" in m and "bad-magic" in m for m in logged), logged
    assert any("round 1" in m and "client 2" in m and "wrong-mask" in m for m in logged), logged


# -- no simulation: the adapter's pieces ------------------------------------------------------------
def test_messages_round_trip_and_malformed_replies(monkeypatch):
    data = bytes(range(200))
    assert M.read_downlink(M.downlink_content(data, 7)) == (data, 7)
    monkeypatch.setattr(M, "INLINE_LIMIT", 64)  # large downlinks ride in a chunked ArrayRecord
    big = M.downlink_content(data, 8)
    assert M.DOWNLINK in big and M.read_downlink(big) == (data, 8)

    assert M.read_reply(M.uplink_content([data])).uplinks == [data]  # > INLINE_LIMIT: ArrayRecord
    ok = M.read_reply(M.uplink_content([b"up"], mean_loss=0.5, final_digest=b"12345678"))
    assert (ok.status, ok.uplinks, ok.mean_loss, ok.final_digest) == ("ok", [b"up"], 0.5, b"12345678")
    assert M.read_reply(M.uplink_content([b"a", b"b"])).uplinks == [b"a", b"b"]
    assert M.read_reply(M.need_dense_content("cache-mismatch")).status == M.STATUS_NEED_DENSE

    # the client's data pointer: reported in a reply, sent back with a downlink; a malformed one is ignored
    from meerkat_hf.federated.protocol.client import ClientState

    state = ClientState(epoch=2, position=5, steps_done=9, examples_seen=36, rounds_done=3, nan_steps=1, synced_round=3)
    carried = M.read_reply(M.uplink_content([b"up"], client_state=state)).client_state
    assert carried == {k: v for k, v in state.to_dict().items() if k != "synced_round"}
    assert M.read_client_state(M.downlink_content(data, 9, carried)[M.META]) == carried
    assert M.read_client_state(M.downlink_content(data, 9)[M.META]) is None
    for bad in ([1, 2], [-1, 0, 0, 0, 0, 0], ["1", 0, 0, 0, 0, 0], "[0, 0, 0, 0, 0, 0]"):
        assert M.read_client_state({"client-state": bad}) is None

    from flwr.app import ConfigRecord, RecordDict

    for content in (RecordDict(), RecordDict({M.META: ConfigRecord({"status": "bogus"})}),
                    RecordDict({M.META: ConfigRecord({"status": "ok", "uplink": "not bytes"})})):
        reply = M.read_reply(content)
        assert reply.status == "malformed" and reply.reason == "malformed-reply"


def test_run_config_to_federation_config(tmp_path):
    (tmp_path / "fed.yaml").write_text("num_clients: 4\nmask: {density: 0.01}\n")
    run_config = {"config-file": "fed.yaml", "local-steps": 7, "mask.calibration-num-sequences": 3,
                  "task.verbalizer": '[" bad", " good"]', "task.prompt": "{text}:", "task.data-files": "x.csv",
                  "flower.round-timeout": 0, "flower.min-nodes": 2, "flower.server-eval": False}
    cfg = federation_config_from_run_config(run_config, tmp_path)
    assert (cfg.num_clients, cfg.local_steps, cfg.mask.density, cfg.mask.calibration_num_sequences) == (4, 7, 0.01, 3)
    assert cfg.task.verbalizer == [" bad", " good"]
    assert options_from_run_config(run_config) == FlowerOptions(min_nodes=2, round_timeout=None, server_eval=False)
    with pytest.raises(ValueError, match="unknown key"):
        federation_config_from_run_config({"local-stepz": 3})
    with pytest.raises(ValueError, match="unknown Flower option"):
        options_from_run_config({"flower.round-timeuot": 3})


def test_example_app_is_a_valid_flower_app():
    """examples/flower passes flwr's own validation (components importable) and describes a
    valid federation on the embedded default model."""
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    config, warnings = load_and_validate(EXAMPLE / "pyproject.toml", check_module=True)
    assert not warnings, warnings
    run_config = flatten_dict(config["tool"]["flwr"]["app"]["config"])
    fed = federation_config_from_run_config(run_config, EXAMPLE)
    assert fed.model.model_name_or_path == "smollm2"
    assert fed.algorithm == "meerkat-vp"
    options_from_run_config(run_config)
    assert "tool" not in config or "federations" not in config["tool"]["flwr"]  # see README: flwr >= 1.3x migrates it


def _final_contents(folder: Path) -> dict:
    """final/'s files, read back: safetensors as metadata + tensors, JSON parsed, the rest as text.

    Left out: the mask computation's wall time ("seconds"). The files' SHA-256 stay in: our
    safetensors files are byte-reproducible (`meerkat_hf.hub.safetensors_bytes`)."""
    from safetensors import safe_open

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k != "seconds"}
        return value

    contents = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            contents[path.name] = untimed(json.loads(path.read_text()))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                contents[path.name] = (fh.metadata(), {k: fh.get_tensor(k).tolist() for k in fh.keys()})
        else:  # the card's usage snippet names the run's own folder
            contents[path.name] = path.read_text().replace(str(folder), "<final>")
    return contents


def test_flower_and_driver_write_the_same_final_folder(fed_files):
    """One round engine: whichever transport ran the config, final/ holds the same mask, delta,
    model card and training summary."""
    cfg = {**_config(fed_files, "final"), "save_final": True}
    ref, res = _both(cfg)
    assert res.state_digest == ref.state_digest
    driver, flower = _final_contents(ref.output_dir / "final"), _final_contents(res.output_dir / "final")
    assert sorted(flower) == sorted(driver) and "README.md" in flower and "meerkat_config.json" in flower
    for name in driver:
        assert flower[name] == driver[name], name
    assert res.training_summary == ref.training_summary and res.training_summary["state_digest"] == ref.state_digest


class _FakeReply:
    def __init__(self, node: int, reply_to: str, content=None, error: str | None = None):
        self.metadata = type("Meta", (), {"src_node_id": node, "reply_to_message_id": reply_to})()
        self.content = content
        self.error = type("Error", (), {"reason": error})()

    def has_error(self) -> bool:
        return self.error.reason is not None


class _FakeGrid:
    """Nodes answer the hello with the client id they claim (a node's own node-config)."""

    def __init__(self, claims: dict[int, tuple[int, int]], checksum: str):
        self.claims, self.checksum = claims, checksum

    def get_node_ids(self):
        return list(self.claims)

    def send_and_receive(self, msgs, timeout=None):
        replies = []
        for i, m in enumerate(msgs):  # like Flower's grids, give each message its id as it is pushed
            m.metadata.message_id = f"hello-{i}"
            node = m.metadata.dst_node_id
            replies.append(_FakeReply(node, m.metadata.message_id, M.hello_content(*self.claims[node], self.checksum)))
        return replies


@pytest.fixture
def bare_server(monkeypatch):
    """`MeerkatFlowerServer`s without a model or a Flower app: enough for node bookkeeping and replies."""
    from types import SimpleNamespace

    from meerkat_hf.federated.flower import server_app

    monkeypatch.setattr(M, "message_nbytes", lambda m: 0)
    monkeypatch.setattr(server_app, "Message", lambda content, dst_node_id, message_type: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=dst_node_id)))  # a real one needs a running Flower app

    def server(options: FlowerOptions):
        s = object.__new__(server_app.MeerkatFlowerServer)
        s.config = SimpleNamespace(num_clients=3, validation=SimpleNamespace(max_examples=2**31 - 1), uses_lora=False)
        s.options, s.client_mask_path = options, "mask"
        s.engine = SimpleNamespace(mask=SimpleNamespace(checksum="ab" * 16), counters={"hello_messages": 0},
                                   server=SimpleNamespace(example_caps={}, synced={0: 0, 1: 0, 2: 0}))
        s.node_of, s.client_of, s.refused, s.client_states = {}, {}, {}, {}
        s.bound = dict(options.client_nodes or {})
        return s

    return server


def test_client_ids_are_bound_to_nodes_by_the_server(bare_server):
    """A node is bound to its client id for the whole run (not first-hello-per-connection), a second
    node claiming it is refused even once the first has gone, an operator's client-nodes map decides
    up front, and a client's FedAvg weight is capped by what it declared when it enrolled."""
    server = bare_server
    s = server(FlowerOptions())
    s.discover(_FakeGrid({101: (0, 10), 102: (1, 20)}, "ab" * 16))
    assert s.node_of == {0: 101, 1: 102} and s.engine.server.example_caps == {0: 10, 1: 20}
    s.discover(_FakeGrid({102: (1, 20)}, "ab" * 16))  # node 101 leaves
    assert s.node_of == {1: 102}
    s.discover(_FakeGrid({102: (1, 20), 666: (0, 10**6)}, "ab" * 16))  # an impostor claims the free slot
    assert 0 not in s.node_of and "bound to node 101" in s.refused[666]
    s.engine.server.synced[0] = 5  # what client 0 held when its node left
    s.discover(_FakeGrid({102: (1, 20), 666: (0, 10**6), 101: (0, 10**6)}, "ab" * 16))  # 101 comes back
    assert s.node_of == {0: 101, 1: 102} and s.engine.server.example_caps[0] == 10  # the first declaration holds
    assert s.engine.server.synced[0] == 0  # a node that says hello again is taken to hold a fresh Context
    assert s.checkpoint_state()["flower_nodes"] == {0: 101, 1: 102}

    opts = options_from_run_config({"flower.client-nodes": "0:7, 1:8"})
    assert opts.client_nodes == {0: 7, 1: 8}
    s = server(opts)
    s.discover(_FakeGrid({7: (1, 5), 8: (1, 5), 9: (2, 5)}, "ab" * 16))
    assert s.node_of == {1: 8}
    assert "bound to node 8" in s.refused[7] and "assigned to no node" in s.refused[9]
    s = server(opts)
    s.discover(_FakeGrid({7: (2, 5)}, "ab" * 16))  # node 7 is client 0 by the map, whatever it claims
    assert "node 7 is client 0, not 2" in s.refused[7] and not s.node_of
    # resuming: the checkpoint's bindings and client data pointers come back; the operator's map wins
    s = server(options_from_run_config({"flower.client-nodes": "1:9"}))
    s.restore({"flower_nodes": {0: 7, 1: 8}, "flower_client_states": {0: {"epoch": 1, "position": 4}}})
    assert s.bound == {0: 7, 1: 9} and s.client_states == {0: {"epoch": 1, "position": 4}}
    with pytest.raises(ValueError, match="client-nodes"):
        FlowerOptions(client_nodes="0-7")


def test_a_superlink_error_reply_drops_its_addressee_at_once(bare_server):
    """For a node that cannot answer (its SuperNode was killed: its heartbeats stopped) the SuperLink
    answers itself, with an error and its own node id as the sender. That answer closes the node's
    part of the round, with its reason; a reply from a node the message was not sent to is ignored."""
    from types import SimpleNamespace

    from meerkat_hf.federated.engine import ClientOutcome
    from meerkat_hf.federated.flower.server_app import _Sent

    class Grid:
        def send_and_receive(self, msgs, timeout=None):
            msgs[0].metadata.message_id = "m7"
            return [_FakeReply(9, "m7", M.uplink_content([b"not yours"])),
                    _FakeReply(1, "m7", error="Error: Node Unavailable")]

    s = bare_server(FlowerOptions(round_timeout=300))
    sent = [_Sent(2, 7, "records", 10, SimpleNamespace(metadata=SimpleNamespace(dst_node_id=7)))]
    replies, _, _ = s._exchange(Grid(), sent)
    outcomes = {2: ClientOutcome(2)}
    s._take_replies(0, sent, replies, outcomes, {}, [], allow_fallback=True)
    assert outcomes[2].dropped == "SuperLink error: Error: Node Unavailable"


def test_simulated_clients_get_a_gpu_share_where_cuda_is_visible(monkeypatch):
    from meerkat_hf.federated.flower import default_backend_config

    cpu_only = default_backend_config()
    assert cpu_only["client_resources"]["num_gpus"] == (0.25 if torch.cuda.is_available() else 0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    two = default_backend_config()
    assert two["client_resources"]["num_gpus"] == 0.25 and two["init_args"]["num_gpus"] == 2
    assert default_backend_config(num_gpus_per_client=1)["client_resources"]["num_gpus"] == 1.0
    assert default_backend_config(device="cpu")["client_resources"]["num_gpus"] == 0.0  # the user asked for CPU


def test_a_run_config_over_an_old_config_file_takes_either_name(tmp_path):
    """The Flower app declares `learning-rate`; a config-file that still says `lr:` is read, not refused."""
    model_dir, files = make_model_dir(tmp_path), make_task_files(tmp_path)
    old = base_config(tmp_path, model_dir, files)
    old["lr"] = old.pop("learning_rate")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.warns(FutureWarning, match="'lr' is deprecated"):
        cfg = federation_config_from_run_config({"config-file": str(path), "learning-rate": 2e-3, "zo-eps": 4e-3})
    assert (cfg.learning_rate, cfg.zo_eps) == (2e-3, 4e-3)  # the run config wins, as declared keys always do
    with pytest.warns(FutureWarning):
        cfg = federation_config_from_run_config({"config-file": str(path), "lr": 3e-3})
    assert cfg.learning_rate == 3e-3
