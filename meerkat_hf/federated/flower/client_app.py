"""Meerkat as a Flower `ClientApp`: the same `FederatedClient` as the in-process driver.

A SuperNode is one Meerkat client. Its Meerkat client id (from which its step seeds are
derived) comes from the node config: ``client-id``, or Flower's ``partition-id`` in
simulation. Its private data: the node config's ``data-files`` (a CSV/JSON/Parquet/text file
of the configured task; a real site), else the site's share of the configured task's data,
partitioned exactly as `run_federation` partitions it (simulation).

Per message the app only adapts: downlink bytes in, `FederatedClient.receive` (rebuild the
round's global state from the records or the dense vector), `train_zo` (or the first-order
baseline), uplink bytes out. What a client carries between rounds lives in the Flower
`Context.state` of its node: the `ClientState` (data pointer, synced round) as a
`ConfigRecord` and the global state it last held (the k-vector records downlinks build on) as
an `ArrayRecord`. Both are committed only once the uplink exists, as in the driver. A
`Context` lasts one run on one SuperNode: a client without one (a run resumed from a
checkpoint, a restarted SuperNode) takes its data pointer from the copy the server sends.

The model, mask and data are loaded once per process and reused across rounds (and across the
simulated nodes an actor serves: each call writes its own start state into the masked
coordinates first, and nothing else in the model ever changes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from ...masks.mask import SparseMask
from ..assets import client_privacy, default_mask_location, load_base_model, meerkat_model, protocol_params, wrap_model
from ..protocol.client import ClientState, FederatedClient
from ..protocol.codec import MessageError
from ..federation_config import FederationConfig
from ..runtime import LocalRuntime
from ..task_data import build_federated_data
from . import messages as M
from .run_config import (
    NODE_DATA_FILES,
    NODE_DEVICE,
    NODE_MASK_PATH,
    federation_config_from_run_config,
    node_client_id,
)

logger = logging.getLogger(__name__)

STATE_CLIENT = "meerkat.client-state"
STATE_CACHE = "meerkat.cached-global"
STATE_SETUP = "meerkat.setup"

_NONE_ROUND = -1  # ConfigRecord has no None: "holds no usable global state"


@dataclass
class LoadedClient:
    """Everything one Meerkat client needs, loaded once per (process, config, client)."""

    config: FederationConfig
    client: FederatedClient
    model: Any  # MeerkatModel
    mask: Any  # SparseMask
    params: Any  # ProtocolParams
    device: torch.device
    initial: torch.Tensor = field(repr=False, default=None)  # w_S of the base model: the round-0 state


_MODELS: dict[str, tuple] = {}
_DATA: dict[str, Any] = {}
_CLIENTS: dict[str, LoadedClient] = {}


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _load_model(config: FederationConfig, mask_location: str, device: torch.device):
    key = _key(config.model, config.algorithm, config.lora, config.seed, mask_location, str(device))
    if key not in _MODELS:
        model, tokenizer = load_base_model(config)
        model.eval()
        model.to(device)
        if config.uses_lora:  # the adapter is built (seeded) by every node, no mask file involved
            wrapped, mask = wrap_model(config, model, tokenizer, None, LocalRuntime(str(device)), Path(config.output_dir))
        else:
            try:
                mask = SparseMask.from_pretrained(mask_location)
            except Exception as err:
                raise RuntimeError(
                    f"this site cannot load the federation's mask from {mask_location!r} ({type(err).__name__}: {err}). "
                    "Publish the mask and set mask.path (a Hub id or a path every site has), or give this "
                    f"SuperNode a local copy: --node-config '{NODE_MASK_PATH}=/path/to/mask'") from err
            wrapped = meerkat_model(config, model, mask)
        _MODELS[key] = (wrapped, mask, tokenizer, wrapped.values.clone())
    return _MODELS[key]


def _site_config(config: FederationConfig, data_files: str) -> FederationConfig:
    """The config a real site builds its data with: its own file(s), all of it for this client."""
    files = str(data_files)
    task = dataclasses.replace(config.task, data_files={"train": files, "eval": files, "test": files,
                                                        "validation": files})
    partition = dataclasses.replace(config.partition, scheme="iid", num_single_label_clients=0)
    return dataclasses.replace(config, task=task, partition=partition, num_clients=1)


def _load_examples(config: FederationConfig, client_id: int, tokenizer, data_files: str | None):
    if data_files:
        key = _key("site", config.task, config.max_length, config.seed, data_files)
        if key not in _DATA:
            _DATA[key] = build_federated_data(_site_config(config, data_files), tokenizer)
        data = _DATA[key]
        return data.client_examples[0], data
    key = _key("simulation", config.task, config.partition, config.num_clients, config.max_length, config.seed,
               config.eval_examples)
    if key not in _DATA:
        _DATA[key] = build_federated_data(config, tokenizer)
    data = _DATA[key]
    if not 0 <= client_id < len(data.client_examples):
        raise ValueError(f"client id {client_id} is outside 0..{len(data.client_examples) - 1}")
    return data.client_examples[client_id], data


def load_client(config: FederationConfig, client_id: int, *, mask_location: str | None = None,
                data_files: str | None = None, device: str | None = None) -> LoadedClient:
    """Load (or reuse) model, mask, data and the `FederatedClient` of one Meerkat client."""
    mask_location = mask_location or default_mask_location(config)
    key = _key(config.to_dict(), client_id, mask_location, data_files, device)
    if key in _CLIENTS:
        return _CLIENTS[key]
    if not 0 <= client_id < config.num_clients:
        raise ValueError(f"client id {client_id} is outside 0..{config.num_clients - 1} (num_clients={config.num_clients})")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    dev = LocalRuntime(device or config.device).device
    wrapped, mask, tokenizer, initial = _load_model(config, mask_location, dev)
    examples, data = _load_examples(config, client_id, tokenizer, data_files)
    client = FederatedClient(client_id, examples, data.collate, batch_size=config.batch_size,
                             data_seed=config.seed, loss_fn=data.loss_fn, per_example_loss_fn=data.per_example_loss_fn,
                             privacy=client_privacy(config, len(examples), client_id))
    rt = LoadedClient(config, client, wrapped, mask, protocol_params(config, initial), dev, initial)
    _CLIENTS[key] = rt
    logger.info("Meerkat client %d ready: %d examples, k=%d, mask %s", client_id, client.num_examples,
                wrapped.num_selected, mask.checksum)
    return rt


# -- Context.state <-> client state --------------------------------------------------------------
def _initial_synced(config: FederationConfig) -> int | None:
    return None if config.uses_lora else 0  # LoRA: the adapter's start is not in the base model


def load_client_state(context: Context, rt: LoadedClient,
                      carried: dict[str, int] | None = None) -> tuple[ClientState, torch.Tensor | None]:
    """The client's `ClientState` and the global state it holds (that of `synced_round`).

    `carried`: the data pointer the server last heard from this client (see `messages`), used
    only when this node's `Context` holds no state of its own (a new run, e.g. resumed after a
    SuperLink restart, or a restarted SuperNode): the client then goes on where it was, as a
    resumed in-process run does, instead of starting its data over."""
    rec = context.state.config_records.get(STATE_CLIENT)
    if rec is None:  # first round of this node in this run: it holds the base model, i.e. the round-0 state
        synced = _initial_synced(rt.config)
        if carried:
            logger.info("client %d: no state in this run's Context; continuing from the data pointer the "
                        "server last heard of (%s)", rt.client.client_id, carried)
        return ClientState(**(carried or {}), synced_round=synced), (rt.initial if synced == 0 else None)
    fields = {f.name for f in dataclasses.fields(ClientState)}
    values = {k: int(v) for k, v in rec.items() if k in fields}
    if values.get("synced_round") == _NONE_ROUND:
        values["synced_round"] = None
    state = ClientState(**values)
    cache_rec = context.state.array_records.get(STATE_CACHE)
    cache = None
    if cache_rec is not None and "values" in cache_rec:
        cache = torch.from_numpy(np.array(cache_rec["values"].numpy(), dtype=np.float32, copy=True))
    return state, cache


def store_client_state(context: Context, state: ClientState, held: torch.Tensor) -> None:
    d = state.to_dict()
    if d["synced_round"] is None:
        d["synced_round"] = _NONE_ROUND
    context.state[STATE_CLIENT] = ConfigRecord({k: int(v) for k, v in d.items()})
    context.state[STATE_CACHE] = ArrayRecord({"values": Array(held.detach().cpu().numpy().astype(np.float32))})


# -- the app ----------------------------------------------------------------------------------
def build_client_app(config: FederationConfig | None = None, *, app_dir: str | os.PathLike | None = None) -> ClientApp:
    """A Flower `ClientApp` running Meerkat clients.

    `config`: the federation (None: read from the run config, see `run_config`). `app_dir`:
    where a run config's ``config-file`` is resolved.
    """
    return fault_injecting_client_app(config, app_dir=app_dir, hooks=None)


def fault_injecting_client_app(config: FederationConfig | None, *, app_dir: str | os.PathLike | None = None,
                               hooks: Any = None) -> ClientApp:
    """`build_client_app` with an `engine.FederationHooks` whose `before_client` / `tamper_uplink` are applied
    exactly as the in-process driver applies them: fault injection for tests and chaos runs of the simulation
    (`run_flower_simulation(hooks=...)`), kept out of the deployable app's signature."""
    app = ClientApp()

    def setup(message: Message, context: Context) -> tuple[FederationConfig, LoadedClient]:
        cfg = config if config is not None else federation_config_from_run_config(context.run_config, app_dir)
        node = context.node_config
        client_id = node_client_id(node)
        setup_rec = context.state.config_records.get(STATE_SETUP)
        mask_location = str(node.get(NODE_MASK_PATH) or "") or (str(setup_rec["mask-path"]) if setup_rec else None)
        data_files = str(node.get(NODE_DATA_FILES) or "") or None
        device = str(node.get(NODE_DEVICE) or "") or None
        return cfg, load_client(cfg, client_id, mask_location=mask_location, data_files=data_files, device=device)

    @app.query()
    def hello(message: Message, context: Context) -> Message:
        meta = message.content.config_records.get(M.META)
        if meta is not None and meta.get("mask-path"):
            context.state[STATE_SETUP] = ConfigRecord({"mask-path": str(meta["mask-path"])})
        _, rt = setup(message, context)
        return Message(M.hello_content(rt.client.client_id, rt.client.num_examples, rt.mask.checksum), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        cfg, rt = setup(message, context)
        client = rt.client
        carried = M.read_client_state(message.content.config_records.get(M.META))
        client.state, cache = load_client_state(context, rt, carried)
        data, _ = M.read_downlink(message.content)
        try:
            values, round_id, budget = client.receive(data, mask_checksum=rt.mask.checksum,
                                                      fingerprint=rt.mask.fingerprint, params=rt.params, cache=cache,
                                                      k=rt.model.num_selected)
        except MessageError as err:
            logger.warning("client %d: cannot apply the downlink (%s); asking for the dense state", client.client_id, err)
            return Message(M.need_dense_content(err.reason, err.detail), reply_to=message)
        if hooks is not None and getattr(hooks, "before_client", None) is not None:
            hooks.before_client(round_id, client.client_id)
        res = client.train(cfg.local_optimizer, rt.model, values, round_id, budget, rt.params, rt.mask.checksum,
                           eps=cfg.zo_eps, estimator=cfg.zo_estimator, device=rt.device)
        uplinks = [res.uplink]
        if hooks is not None and getattr(hooks, "tamper_uplink", None) is not None:
            uplinks = list(hooks.tamper_uplink(round_id, client.client_id, res.uplink))
        store_client_state(context, res.new_state, values)  # transactional: only once the uplink exists
        content = M.uplink_content(uplinks, mean_loss=res.mean_loss, final_digest=res.final_digest,
                                   client_state=res.new_state)
        return Message(content, reply_to=message)

    return app
