"""Meerkat as a Flower `ServerApp` (a ``main(grid, context)`` function on the Message API).

Why a custom main and not a `flwr.serverapp.strategy.Strategy`: a Flower strategy moves an
`ArrayRecord` of model weights down and up every round and averages what comes back; Meerkat
moves neither weights nor gradients. Its downlink is per client (records that a client replays,
or the dense k-vector when that is smaller or the client is out of sync), its uplink is T
scalars, and aggregation is a replay of seeded virtual paths. A ``main`` on the `Grid` sends
exactly those messages. `MeerkatFlowerServer` is a transport of the round engine
(`engine.RoundEngine`): the engine plans every round (seeded sampling, Meerkat-VP budgets),
validates, replays and aggregates the uplinks, builds the metrics row, checkpoints and writes
`final/` with its model card, exactly as for `run_federation`; this module only moves messages.

One round here: map Flower node ids to Meerkat client ids (a ``query`` "hello" to nodes not
seen yet), send each participant its downlink in a ``train`` message, collect the replies (a
client that cannot rebuild the state from records asks for the dense state: a second
exchange), refuse uplinks a node signs with another client's id, hand the rest to the engine.
The row gains the bytes of the Flower messages.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..assets import default_mask_location
from ..protocol.codec import KIND_DENSE, MessageError, decode_any_uplink
from ..federation_config import FederationConfig
from ..engine import ClientOutcome, Delivery, FederationResult, RoundEngine, RoundPlan, Transport, result_fields, torch_threads
from ..runtime import LocalRuntime
from ..protocol.server import Rejection
from . import messages as M
from .run_config import FlowerOptions, federation_config_from_run_config, options_from_run_config

logger = logging.getLogger(__name__)


@dataclass
class FlowerFederationResult(FederationResult):
    """What a Flower run produced (also on disk in `output_dir`): a `FederationResult` plus the nodes."""

    clients: dict[int, int] = field(default_factory=dict)  # Meerkat client id -> Flower node id
    # serialized Flower messages (see messages.message_nbytes); total_*_bytes count codec bytes, as the driver does
    total_message_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class _Sent:
    client_id: int
    node_id: int
    kind: str
    payload: int  # codec bytes
    message: Message


class MeerkatFlowerServer(Transport):
    """The Flower transport of the round engine: set-up as in `run_federation`, then `run(grid)`."""

    def __init__(self, config: FederationConfig, options: FlowerOptions | None = None, *, model=None, tokenizer=None):
        config.validate()
        self.config = config
        self.options = options or FlowerOptions()
        if config.torch_threads:  # for the run: build_server_app's main restores the previous setting
            torch.set_num_threads(config.torch_threads)
        # The server needs data only to evaluate or to calibrate a mask on the task's own text.
        needs_data = self.options.server_eval or (config.mask.path is None and config.mask.calibration == "task"
                                                   and config.mask_method == "sensitivity" and not config.uses_lora)
        self.engine = RoundEngine(config, runtime=LocalRuntime(config.device), model=model, tokenizer=tokenizer,
                                  build_data=needs_data, evaluate=self.options.server_eval)
        self.engine.counters.update({"uplink_messages": 0, "downlink_messages": 0, "hello_messages": 0})
        self.plot_title = f"{config.algorithm} (Flower)"
        self.client_mask_path = self.options.client_mask_path or default_mask_location(config)
        self.node_of: dict[int, int] = {}  # Meerkat client id -> Flower node id
        self.client_of: dict[int, int] = {}  # Flower node id -> Meerkat client id
        self.refused: dict[int, str] = {}  # Flower node id -> why it takes no part
        # Meerkat client id -> the Flower node it is bound to for the whole run (kept when the node disconnects,
        # so another node cannot take its place; `options.client_nodes` sets it in advance)
        self.bound: dict[int, int] = dict(self.options.client_nodes or {})
        # Meerkat client id -> its data pointer as it last reported it (`messages.CLIENT_STATE_FIELDS`):
        # sent back with every downlink, for a client whose Flower Context is new (resumed run, restarted node)
        self.client_states: dict[int, dict[str, int]] = {}
        self.grid: Grid | None = None

    # -- nodes ------------------------------------------------------------------------------
    def wait_for_nodes(self, grid: Grid) -> None:
        want = self.config.num_clients if self.options.min_nodes is None else self.options.min_nodes
        deadline = time.monotonic() + self.options.node_wait_timeout
        last = -1
        while (n := len(list(grid.get_node_ids()))) < want and time.monotonic() < deadline:
            if n != last:
                logger.info("waiting for SuperNodes: %d of %d connected", n, want)
                last = n
            time.sleep(0.5)
        if n < want:
            logger.warning("only %d of %d SuperNodes connected after %.0f s; starting anyway", n, want,
                           self.options.node_wait_timeout)

    def discover(self, grid: Grid) -> int:
        """Say hello to nodes not seen yet; map their Meerkat client ids. Returns the hello bytes."""
        alive = set(grid.get_node_ids())
        for node in [n for n in self.client_of if n not in alive]:  # gone: its client id is free again
            cid = self.client_of.pop(node)
            self.node_of.pop(cid, None)
            logger.warning("node %d (Meerkat client %d) is no longer connected", node, cid)
        for node in [n for n in self.refused if n not in alive]:
            self.refused.pop(node)
        new = sorted(n for n in alive if n not in self.client_of and n not in self.refused)
        if not new:
            return 0
        content = RecordDict({M.META: ConfigRecord({"mask-path": self.client_mask_path})})
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        nbytes = sum(M.message_nbytes(m) for m in msgs)
        replies = list(grid.send_and_receive(msgs, timeout=self.options.round_timeout))
        nbytes += sum(M.message_nbytes(r) for r in replies)
        answers = _replies_by_node(msgs, replies)
        for node, rep in sorted(answers.items()):
            if rep.has_error():  # e.g. the node could not load its data yet: ask again next round
                logger.warning("node %d could not say hello (will ask again next round): %s", node, rep.error.reason)
                continue
            else:
                try:
                    cid, n_examples, checksum = M.read_hello(rep.content)
                except (KeyError, TypeError, ValueError) as err:
                    self.refused[node] = f"malformed hello reply: {err}"
                else:
                    assigned = [c for c, n in self.bound.items() if n == node]
                    if not 0 <= cid < self.config.num_clients:
                        self.refused[node] = f"client id {cid} outside 0..{self.config.num_clients - 1}"
                    elif cid in self.bound and self.bound[cid] != node:
                        self.refused[node] = f"client id {cid} is bound to node {self.bound[cid]}"
                    elif assigned and assigned != [cid]:
                        self.refused[node] = f"node {node} is client {assigned[0]}, not {cid}"
                    elif self.options.client_nodes and cid not in self.options.client_nodes:
                        self.refused[node] = f"client id {cid} is assigned to no node (flower.client-nodes)"
                    elif checksum != self.engine.mask.checksum:
                        self.refused[node] = f"mask checksum {checksum} != {self.engine.mask.checksum}"
                    elif not 1 <= n_examples <= self.config.validation.max_examples:
                        self.refused[node] = f"{n_examples} examples outside 1..{self.config.validation.max_examples}"
                    else:
                        self.node_of[cid], self.client_of[node] = node, cid
                        self.bound[cid] = node
                        # A node saying hello is new to this run or was gone: it most likely holds a fresh
                        # Context, i.e. the base model (round 0), so records from round 0 need no dense retry.
                        self.engine.server.synced[cid] = None if self.config.uses_lora else 0
                        # its FedAvg weight can never exceed what it declared when it first enrolled
                        self.engine.server.example_caps.setdefault(cid, n_examples)
                        logger.info("node %d is Meerkat client %d (%d examples)", node, cid, n_examples)
                        continue
            logger.warning("node %d takes no part: %s", node, self.refused[node])
        for node in set(new) - set(answers):
            logger.warning("node %d did not answer the hello; will ask again next round", node)
        self.engine.counters["hello_messages"] += nbytes
        return nbytes

    # -- one round --------------------------------------------------------------------------------
    def _message(self, cid: int, data: bytes, round_id: int, kind: str) -> _Sent:
        node = self.node_of[cid]
        msg = Message(M.downlink_content(data, round_id, self.client_states.get(cid)), dst_node_id=node,
                      message_type=MessageType.TRAIN, group_id=str(round_id))
        return _Sent(cid, node, kind, len(data), msg)

    def _exchange(self, grid: Grid, sent: list[_Sent]) -> tuple[dict[int, Message], int, int]:
        down = sum(M.message_nbytes(s.message) for s in sent)
        replies = list(grid.send_and_receive([s.message for s in sent], timeout=self.options.round_timeout)) if sent else []
        up = sum(M.message_nbytes(r) for r in replies)
        return _replies_by_node([s.message for s in sent], replies), down, up

    def exchange(self, engine: RoundEngine, plan: RoundPlan) -> Delivery:
        """Hello to new nodes, each participant's downlink in a ``train`` message, the replies
        (a client that cannot rebuild the state from records gets the dense state: a second exchange)."""
        grid, server, r = self.grid, engine.server, plan.round
        hello = self.discover(grid)
        outcomes = {cid: ClientOutcome(cid) for cid in plan.participants}
        rejected: list[Rejection] = []
        uplinks: dict[int, list[bytes]] = {}
        encoded: dict[tuple, bytes] = {}
        sent: list[_Sent] = []
        for cid in plan.participants:
            if cid not in self.node_of:
                outcomes[cid].dropped = "no connected SuperNode is this client"
                continue
            downlink = server.downlink_plan(cid)
            if downlink not in encoded:
                encoded[downlink] = server.downlink(*downlink)
            sent.append(self._message(cid, encoded[downlink], r, "dense" if downlink[0] == KIND_DENSE else "records"))
        by_node, msg_down, msg_up = self._exchange(grid, sent)

        retry = self._take_replies(r, sent, by_node, outcomes, uplinks, rejected, allow_fallback=True)
        if retry:
            dense = server.downlink_for(retry[0].client_id, force_dense=True)
            batch = [self._message(s.client_id, dense, r, "dense") for s in retry]
            by_node2, d2, u2 = self._exchange(grid, batch)
            msg_down, msg_up = msg_down + d2, msg_up + u2
            self._take_replies(r, batch, by_node2, outcomes, uplinks, rejected, allow_fallback=False)

        for cid in sorted(uplinks):  # a node may only speak for its own client
            for data in uplinks[cid]:
                claimed = self._claimed_sender(data)
                if claimed is not None and claimed != cid:
                    rej = Rejection(r, cid, "sender-mismatch",
                                    f"node of client {cid} sent an uplink signed as client {claimed}", len(data))
                    rejected.append(rej)
                    logger.warning("round %d: rejected uplink from client %d: %s (%s)", r, cid, rej.reason, rej.detail)
                    continue
                outcomes[cid].messages.append(data)

        counters = engine.counters
        counters["uplink_messages"] += msg_up
        counters["downlink_messages"] += msg_down
        row = {
            "flower_message_bytes": {"downlink": msg_down, "uplink": msg_up, "hello": hello},
            "cumulative_flower_message_bytes": counters["uplink_messages"] + counters["downlink_messages"]
            + counters["hello_messages"],
            "nodes": {str(c): n for c, n in sorted(self.node_of.items())},
        }
        return Delivery([outcomes[c] for c in sorted(outcomes)], rejected=rejected, row=row)

    def _take_replies(self, r: int, batch: list[_Sent], replies: dict[int, Message], outcomes: dict[int, ClientOutcome],
                      uplinks: dict[int, list[bytes]], rejected: list[Rejection], allow_fallback: bool) -> list[_Sent]:
        """Read the replies to `batch` into the outcomes; returns the sends to repeat with the dense state."""
        retry: list[_Sent] = []
        for s in batch:
            o = outcomes[s.client_id]
            o.downlink_kind = s.kind
            o.downlink_bytes += s.payload
            rep = replies.get(s.node_id)
            if rep is None:
                o.dropped = "no reply" + (f" within {self.options.round_timeout:g} s" if self.options.round_timeout else "")
            elif rep.has_error():  # raised by the ClientApp, or the SuperLink's answer for an unreachable node
                who = "ClientApp" if rep.metadata.src_node_id == s.node_id else "SuperLink"
                o.dropped = f"{who} error: {rep.error.reason}"
            else:
                reply = M.read_reply(rep.content)
                if reply.status == M.STATUS_NEED_DENSE and allow_fallback:
                    o.fallback = reply.reason
                    retry.append(s)
                elif reply.status == M.STATUS_NEED_DENSE:
                    o.dropped = f"cannot apply the dense downlink either: {reply.reason} {reply.detail}"
                elif reply.status == M.STATUS_OK:
                    uplinks[s.client_id] = reply.uplinks
                    if reply.client_state is not None:  # it trained: its pointer moved, whatever the server decides
                        self.client_states[s.client_id] = reply.client_state
                    o.trained, o.mean_loss, o.final_digest = True, reply.mean_loss, reply.final_digest
                else:
                    rej = Rejection(r, s.client_id, reply.reason or "malformed-reply",
                                    reply.detail or f"status {reply.status!r}", M.records_nbytes(rep.content))
                    rejected.append(rej)
                    logger.warning("round %d: rejected reply from client %d: %s (%s)", r, s.client_id,
                                   rej.reason, rej.detail)
            if o.dropped:
                logger.warning("round %d: client %d dropped out: %s", r, s.client_id, o.dropped)
        return retry

    @staticmethod
    def _claimed_sender(data: bytes) -> int | None:
        try:
            return decode_any_uplink(data).client_id
        except (MessageError, TypeError, ValueError):
            return None  # undecodable: the server rejects it with the codec's reason

    # -- the engine's hooks ---------------------------------------------------------------------
    def start(self, engine: RoundEngine) -> None:
        self.wait_for_nodes(self.grid)

    def run_info(self) -> dict:
        return {"runtime": "flower", "client_mask_path": self.client_mask_path}

    def checkpoint_state(self) -> dict:  # client state lives on the SuperNodes; the server keeps a copy of the pointers
        return {"clients": [], "global_states": {}, "flower_nodes": dict(self.bound),
                "flower_client_states": {c: dict(s) for c, s in self.client_states.items()}}

    def restore(self, checkpoint: dict) -> None:
        """A resumed run keeps every client bound to its node (an operator's `client_nodes` map
        still decides) and hands each client its checkpointed data pointer."""
        self.bound = {**{int(c): int(n) for c, n in checkpoint.get("flower_nodes", {}).items()},
                      **(self.options.client_nodes or {})}
        self.client_states = {int(c): {k: int(v) for k, v in s.items()}
                              for c, s in checkpoint.get("flower_client_states", {}).items()}

    def report(self, row: dict) -> None:
        logger.info("round %d: accepted %s, rejected %s, dropped %s, %d uplink / %d downlink bytes "
                    "(Flower messages: %d up / %d down)%s", row["round"], row["accepted"],
                    [(x["client_id"], x["reason"]) for x in row["rejected"]], row["dropped"], row["uplink_bytes"],
                    row["downlink_bytes"], row["flower_message_bytes"]["uplink"],
                    row["flower_message_bytes"]["downlink"],
                    "".join(f", {k}={row[k]:.4f}" for k in ("accuracy", "eval_loss") if k in row))

    # -- the run ----------------------------------------------------------------------------------
    def run(self, grid: Grid) -> FlowerFederationResult:
        self.grid = grid
        result = self.engine.run(self)
        counters = self.engine.counters
        return FlowerFederationResult(
            **result_fields(result), clients=dict(self.node_of),
            total_message_bytes={"uplink": counters["uplink_messages"], "downlink": counters["downlink_messages"],
                                 "hello": counters["hello_messages"]})


def _replies_by_node(sent: list[Message], replies: list[Message]) -> dict[int, Message]:
    """Each node's reply to the messages `sent` (the first one; at most one per node is sent).

    Matched by the message replied to, not by the sender: for a node that cannot answer (its
    heartbeats stopped, the message expired) the SuperLink replies itself, with an error and
    its own node id as the sender. A reply from anyone else than the addressee is ignored."""
    addressee = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    out: dict[int, Message] = {}
    for rep in replies:
        node = addressee.get(rep.metadata.reply_to_message_id)
        if node is None or (rep.metadata.src_node_id != node and not rep.has_error()):
            continue
        out.setdefault(node, rep)
    return out


def build_server_app(config: FederationConfig | None = None, *, options: FlowerOptions | None = None,
                     app_dir: str | os.PathLike | None = None, model=None, tokenizer=None,
                     on_result: Callable[[FlowerFederationResult], Any] | None = None) -> ServerApp:
    """A Flower `ServerApp` running a Meerkat federation.

    `config`/`options`: None reads them from the run config (``[tool.flwr.app.config]`` and
    ``flwr run --run-config``; `app_dir` resolves its ``config-file``). `on_result` receives the
    `FlowerFederationResult` (in-process simulations: tests, notebooks).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else federation_config_from_run_config(context.run_config, app_dir)
        opts = options if options is not None else options_from_run_config(context.run_config)
        with torch_threads(None):  # restores the setting config.torch_threads changes for the run
            result = MeerkatFlowerServer(cfg, opts, model=model, tokenizer=tokenizer).run(grid)
        if on_result is not None:
            on_result(result)

    return app
