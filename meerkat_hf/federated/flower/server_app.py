"""Meerkat as a Flower `ServerApp` (a ``main(grid, context)`` function on the Message API).

Why a custom main and not a `flwr.serverapp.strategy.Strategy`: a Flower strategy moves an
`ArrayRecord` of model weights down and up every round and averages what comes back; Meerkat
moves neither weights nor gradients. Its downlink is per client (records that a client replays,
or the dense k-vector when that is smaller or the client is out of sync), its uplink is T
scalars, and aggregation is a replay of seeded virtual paths. A ``main`` on the `Grid` sends
exactly those messages; the Meerkat objects do the rest, unchanged:

* `driver.sample_clients`, `vp.StepScheduler` (Meerkat-VP): who takes part, with how many steps;
* `server.FederatedServer`: the downlink bytes, validation of every uplink (a bad one is
  rejected with a logged reason and the round goes on), virtual-path replay, exact FedAvg;
* `checkpoint.save_checkpoint` / `reporting.MetricsLog`: round checkpoints and metrics.jsonl,
  in the same format as `run_federation`, plus the bytes of the Flower messages per round.

One round: map Flower node ids to Meerkat client ids (a ``query`` "hello" to nodes not seen
yet), sample, send each participant its downlink in a ``train`` message, collect the replies
(a client that cannot rebuild the state from records asks for the dense state: a second
exchange), feed the uplinks to the server in ascending client-id order, aggregate, let
Meerkat-VP observe the replayed GradIP, evaluate, log, checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import check_resumable, clear_checkpoints, load_latest_checkpoint, save_checkpoint
from ..codec import KIND_DENSE, MessageError, decode_any_uplink
from ..config import FederationConfig
from ..driver import load_base_model, sample_clients, wrap_model
from ..reporting import MetricsLog, write_plots
from ..runtime import LocalRuntime
from ..server import Rejection, gradip_stats
from . import messages as M
from .client_app import default_mask_location
from ..protocol import build_scheduler, build_server, protocol_params
from .run_config import FlowerOptions, federation_config_from_run_config, options_from_run_config

logger = logging.getLogger(__name__)


@dataclass
class FlowerFederationResult:
    """What a Flower run produced (also on disk in `output_dir`)."""

    config: FederationConfig
    final_values: torch.Tensor = field(repr=False)
    initial_values: torch.Tensor = field(repr=False)
    metrics: list[dict] = field(repr=False)
    output_dir: Path
    final_eval: dict
    limited_clients: list[int]
    state_digest: str
    k: int
    clients: dict[int, int]  # Meerkat client id -> Flower node id
    total_uplink_bytes: int  # codec bytes, as `run_federation` counts them
    total_downlink_bytes: int
    total_message_bytes: dict[str, int]  # serialized Flower messages (see messages.message_nbytes)


@dataclass
class _Sent:
    client_id: int
    node_id: int
    kind: str
    payload: int  # codec bytes
    message: Message


class MeerkatFlowerServer:
    """The server side of a Flower run: set-up as in `run_federation`, then `run(grid)`."""

    def __init__(self, config: FederationConfig, options: FlowerOptions | None = None, *, model=None, tokenizer=None):
        from ..task_data import build_federated_data

        config.validate()
        self.config = config
        self.options = options or FlowerOptions()
        self.runtime = LocalRuntime(config.device)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if model is None:
            model, loaded_tok = load_base_model(config)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("MeerkatFlowerServer needs a tokenizer when a model is passed in")
        model.eval()
        model.to(self.runtime.device)
        self.num_params = sum(p.numel() for p in model.parameters())
        # The server needs data only to evaluate or to calibrate a mask on the task's own text.
        needs_data = self.options.server_eval or (config.mask.path is None and config.mask.calibration == "task"
                                                   and config.mask_method == "sensitivity" and not config.uses_lora)
        self.data = build_federated_data(config, tokenizer) if needs_data else None
        self.model, self.mask = wrap_model(config, model, tokenizer, self.data, self.runtime, self.out)
        self.k = self.model.num_selected
        self.initial = self.model.values.clone()
        self.params = protocol_params(config)
        self.server = build_server(config, self.mask, self.initial)
        self.scheduler = build_scheduler(config, self.mask)
        self.zo = config.local_optimizer == "zo"
        self.client_mask_path = self.options.client_mask_path or default_mask_location(config)
        self.node_of: dict[int, int] = {}  # Meerkat client id -> Flower node id
        self.client_of: dict[int, int] = {}  # Flower node id -> Meerkat client id
        self.refused: dict[int, str] = {}  # Flower node id -> why it takes no part
        self.counters = {"uplink": 0, "downlink": 0, "fedavg_full": 0, "uplink_messages": 0,
                         "downlink_messages": 0, "hello_messages": 0}
        self.start_round = 0
        if config.resume:
            ckpt = load_latest_checkpoint(self.out)
            if ckpt is not None:
                check_resumable(ckpt["config"], config.to_dict(), ckpt["mask_checksum"], self.mask.checksum)
                self.server.load_state_dict(ckpt["server"])
                self.scheduler.load_state_dict(ckpt["scheduler"])
                self.counters.update(ckpt["counters"])
                self.start_round = self.server.round
                logger.info("resumed from %s at round %d", ckpt["path"], self.start_round)
        else:
            self.scheduler.start(config.num_clients)
        if self.start_round == 0:  # a fresh run leaves no older run's checkpoints to be resumed later
            clear_checkpoints(self.out)

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
        for rep in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = rep.metadata.src_node_id
            if rep.has_error():  # e.g. the node could not load its data yet: ask again next round
                logger.warning("node %d could not say hello (will ask again next round): %s", node, rep.error.reason)
                continue
            else:
                try:
                    cid, n_examples, checksum = M.read_hello(rep.content)
                except (KeyError, TypeError, ValueError) as err:
                    self.refused[node] = f"malformed hello reply: {err}"
                else:
                    if not 0 <= cid < self.config.num_clients:
                        self.refused[node] = f"client id {cid} outside 0..{self.config.num_clients - 1}"
                    elif cid in self.node_of and self.node_of[cid] != node:
                        self.refused[node] = f"client id {cid} is already node {self.node_of[cid]}"
                    elif checksum != self.mask.checksum:
                        self.refused[node] = f"mask checksum {checksum} != {self.mask.checksum}"
                    else:
                        self.node_of[cid], self.client_of[node] = node, cid
                        logger.info("node %d is Meerkat client %d (%d examples)", node, cid, n_examples)
                        continue
            logger.warning("node %d takes no part: %s", node, self.refused[node])
        for node in set(new) - {r.metadata.src_node_id for r in replies}:
            logger.warning("node %d did not answer the hello; will ask again next round", node)
        self.counters["hello_messages"] += nbytes
        return nbytes

    # -- one round --------------------------------------------------------------------------------
    def _message(self, cid: int, data: bytes, round_id: int, kind: str) -> _Sent:
        node = self.node_of[cid]
        msg = Message(M.downlink_content(data, round_id), dst_node_id=node, message_type=MessageType.TRAIN,
                      group_id=str(round_id))
        return _Sent(cid, node, kind, len(data), msg)

    def _exchange(self, grid: Grid, sent: list[_Sent]) -> tuple[dict[int, Message], int, int]:
        down = sum(M.message_nbytes(s.message) for s in sent)
        replies = list(grid.send_and_receive([s.message for s in sent], timeout=self.options.round_timeout)) if sent else []
        by_node = {}
        for rep in replies:
            by_node.setdefault(rep.metadata.src_node_id, rep)
        up = sum(M.message_nbytes(r) for r in replies)
        return by_node, down, up

    def run_round(self, grid: Grid, r: int) -> dict:
        t0 = time.perf_counter()
        config, server = self.config, self.server
        hello = self.discover(grid)
        participants = sample_clients(config.seed, r, config.num_clients, config.client_fraction)
        budgets = self.scheduler.budgets(participants)
        server.begin_round(r, budgets)

        dropped: dict[int, str] = {}
        flower_rejected: list[Rejection] = []
        fallbacks: dict[int, str] = {}
        kinds: dict[int, str] = {}
        replies_ok: dict[int, M.Reply] = {}
        encoded: dict[tuple, bytes] = {}
        sent: list[_Sent] = []
        for cid in participants:
            if cid not in self.node_of:
                dropped[cid] = "no connected SuperNode is this client"
                continue
            plan = server.downlink_plan(cid)
            if plan not in encoded:
                encoded[plan] = server.downlink(*plan)
            kinds[cid] = "dense" if plan[0] == KIND_DENSE else "records"
            sent.append(self._message(cid, encoded[plan], r, kinds[cid]))
        payload_down = sum(s.payload for s in sent)
        by_node, msg_down, msg_up = self._exchange(grid, sent)

        def handle(batch: list[_Sent], replies: dict[int, Message], allow_fallback: bool) -> list[_Sent]:
            retry: list[_Sent] = []
            for s in batch:
                rep = replies.get(s.node_id)
                if rep is None:
                    dropped[s.client_id] = "no reply" + (f" within {self.options.round_timeout:g} s"
                                                         if self.options.round_timeout else "")
                elif rep.has_error():
                    dropped[s.client_id] = f"ClientApp error: {rep.error.reason}"
                else:
                    reply = M.read_reply(rep.content)
                    if reply.status == M.STATUS_NEED_DENSE and allow_fallback:
                        fallbacks[s.client_id] = reply.reason
                        retry.append(s)
                    elif reply.status == M.STATUS_NEED_DENSE:
                        dropped[s.client_id] = f"cannot apply the dense downlink either: {reply.reason} {reply.detail}"
                    elif reply.status == M.STATUS_OK:
                        replies_ok[s.client_id] = reply
                    else:
                        rej = Rejection(r, s.client_id, reply.reason or "malformed-reply",
                                        reply.detail or f"status {reply.status!r}", M.records_nbytes(rep.content))
                        flower_rejected.append(rej)
                        logger.warning("round %d: rejected reply from client %d: %s (%s)", r, s.client_id,
                                       rej.reason, rej.detail)
                if s.client_id in dropped:
                    logger.warning("round %d: client %d dropped out: %s", r, s.client_id, dropped[s.client_id])
            return retry

        retry = handle(sent, by_node, allow_fallback=True)
        if retry:
            dense = server.downlink_for(retry[0].client_id, force_dense=True)
            batch = [self._message(s.client_id, dense, r, "dense") for s in retry]
            for s in batch:
                kinds[s.client_id] = "dense"
            payload_down += sum(s.payload for s in batch)
            by_node2, d2, u2 = self._exchange(grid, batch)
            msg_down, msg_up = msg_down + d2, msg_up + u2
            handle(batch, by_node2, allow_fallback=False)

        for cid in sorted(replies_ok):  # ascending client id, as the driver feeds the server
            for data in replies_ok[cid].uplinks:
                claimed = self._claimed_sender(data)
                if claimed is not None and claimed != cid:
                    rej = Rejection(r, cid, "sender-mismatch",
                                    f"node of client {cid} sent an uplink signed as client {claimed}", len(data))
                    flower_rejected.append(rej)
                    logger.warning("round %d: rejected uplink from client %d: %s (%s)", r, cid, rej.reason, rej.detail)
                    continue
                server.receive(data)
        summary = server.finish_round()
        gradips = {p.client_id: p.gradips for p in summary.paths}
        vp_info = self.scheduler.observe_round(r, gradips)
        mismatches = [p.client_id for p in summary.paths
                      if replies_ok.get(p.client_id) and replies_ok[p.client_id].final_digest
                      and replies_ok[p.client_id].final_digest != p.final_digest]
        if mismatches:
            logger.warning("round %d: replayed state differs from the client's own for %s", r, mismatches)

        up = summary.uplink_bytes
        full = 2 * 4 * self.num_params * len(participants)
        self.counters["uplink"] += up
        self.counters["downlink"] += payload_down
        self.counters["fedavg_full"] += full
        self.counters["uplink_messages"] += msg_up
        self.counters["downlink_messages"] += msg_down

        evaluated: dict = {}
        if self.options.server_eval and self.data is not None and (
                (r + 1) % config.eval_every == 0 or r + 1 == config.rounds):
            self.model.set_values(server.values)
            evaluated = self.data.evaluate(self.model)
        rejected = [rej.to_dict() for rej in summary.rejected] + [rej.to_dict() for rej in flower_rejected]
        return {
            "round": r,
            "lr": self.params.schedule(r),
            "participants": participants,
            "budgets": {str(c): b for c, b in budgets.items()},
            "accepted": summary.accepted,
            "rejected": rejected,
            "dropped": {str(c): why for c, why in sorted(dropped.items())},
            "missing": summary.missing,
            "limited_clients": sorted(self.scheduler.limited),
            "newly_limited": vp_info["newly_limited"],
            "vp_decisions": vp_info["decided"],
            **evaluated,
            "uplink_bytes": up,
            "downlink_bytes": payload_down,
            "round_bytes": up + payload_down,
            "cumulative_uplink_bytes": self.counters["uplink"],
            "cumulative_downlink_bytes": self.counters["downlink"],
            "cumulative_bytes": self.counters["uplink"] + self.counters["downlink"],
            "fedavg_full_bytes": full,
            "cumulative_fedavg_full_bytes": self.counters["fedavg_full"],
            "flower_message_bytes": {"downlink": msg_down, "uplink": msg_up, "hello": hello},
            "cumulative_flower_message_bytes": self.counters["uplink_messages"] + self.counters["downlink_messages"]
            + self.counters["hello_messages"],
            "nodes": {str(c): n for c, n in sorted(self.node_of.items())},
            "downlink_kinds": {str(c): k for c, k in sorted(kinds.items())},
            "downlink_fallbacks": {str(c): why for c, why in sorted(fallbacks.items())},
            "gradip": {str(c): gradip_stats(g) for c, g in gradips.items()},
            "gradip_steps": {str(c): g for c, g in gradips.items()},
            "train_loss": {str(c): rep.mean_loss for c, rep in sorted(replies_ok.items())},
            "nan_steps": {str(c): n for c, n in summary.nan_steps.items() if n},
            "replay_mismatches": mismatches,
            "state_digest": summary.state_digest.hex(),
            "seconds": round(time.perf_counter() - t0, 3),
        }

    @staticmethod
    def _claimed_sender(data: bytes) -> int | None:
        try:
            return decode_any_uplink(data).client_id
        except (MessageError, TypeError, ValueError):
            return None  # undecodable: the server rejects it with the codec's reason

    # -- the run ----------------------------------------------------------------------------------
    def run(self, grid: Grid) -> FlowerFederationResult:
        config = self.config
        log = MetricsLog(self.out, self.start_round)
        if self.start_round == 0:
            info = {"config": config.to_dict(), "k": self.k, "num_params": self.num_params,
                    "mask_checksum": self.mask.checksum, "mask_method": self.mask.config.method,
                    "has_pretrain_grad": self.mask.pretrain_grad is not None, "runtime": "flower",
                    "client_mask_path": self.client_mask_path}
            (self.out / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        self.wait_for_nodes(grid)
        last_eval: dict = {}
        for r in range(self.start_round, config.rounds):
            row = self.run_round(grid, r)
            log.append(row)
            last_eval = {k: row[k] for k in ("accuracy", "eval_loss") if k in row} or last_eval
            if (r + 1) % config.checkpoint_every == 0 or r + 1 == config.rounds:
                save_checkpoint(self.out, r, {
                    "config": config.to_dict(), "mask_checksum": self.mask.checksum,
                    "server": self.server.state_dict(), "clients": [],  # client state lives on the SuperNodes
                    "scheduler": self.scheduler.state_dict(), "global_states": {}, "counters": dict(self.counters),
                    "flower_nodes": dict(self.node_of),
                }, keep=config.keep_checkpoints)
            logger.info("round %d: accepted %s, rejected %s, dropped %s, %d uplink / %d downlink bytes "
                        "(Flower messages: %d up / %d down)%s", r, row["accepted"],
                        [(x["client_id"], x["reason"]) for x in row["rejected"]], row["dropped"], row["uplink_bytes"],
                        row["downlink_bytes"], row["flower_message_bytes"]["uplink"],
                        row["flower_message_bytes"]["downlink"],
                        "".join(f", {k}={row[k]:.4f}" for k in ("accuracy", "eval_loss") if k in row))
        self.model.set_values(self.server.values)
        if config.plots and log.rows:
            write_plots(log.rows, self.out / "plots", title=f"{config.algorithm} (Flower)")
        if config.save_final:
            self.model.save_pretrained(self.out / "final", model_card=False, training_summary={
                "algorithm": config.algorithm, "rounds": config.rounds, "num_clients": config.num_clients,
                "final_eval": last_eval, "state_digest": self.server.digest.hex(), "runtime": "flower"})
        return FlowerFederationResult(
            config=config, final_values=self.server.values.clone(), initial_values=self.initial, metrics=log.rows,
            output_dir=self.out, final_eval=last_eval, limited_clients=sorted(self.scheduler.limited),
            state_digest=self.server.digest.hex(), k=self.k, clients=dict(self.node_of),
            total_uplink_bytes=self.counters["uplink"], total_downlink_bytes=self.counters["downlink"],
            total_message_bytes={"uplink": self.counters["uplink_messages"],
                                 "downlink": self.counters["downlink_messages"],
                                 "hello": self.counters["hello_messages"]},
        )


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
        previous_threads = torch.get_num_threads()  # config.torch_threads is set for the run only
        try:
            result = MeerkatFlowerServer(cfg, opts, model=model, tokenizer=tokenizer).run(grid)
        finally:
            torch.set_num_threads(previous_threads)
        if on_result is not None:
            on_result(result)

    return app
