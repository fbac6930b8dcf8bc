"""`run_federation(config)`: a simulated federation in this process, or across Accelerate ranks.

The in-process transport of the round engine (`engine.py`): for each round it hands every
participant its downlink, runs the client's local steps here (or on the rank that owns it:
`runtime.split` / `runtime.gather`), and returns the uplink bytes. Planning, aggregation, the
metrics row, checkpoints and `final/` are the engine's. Everything random is derived from
`config.seed`, so a resumed run reproduces the uninterrupted one bit for bit.

Simulation details (documented, not protocol): simulated clients keep their cached global
state by reference to the driver's table of past global states (`max_cached_states` of them,
and none older than the server's records history, from which no records downlink can start);
a client whose cache is gone, or who holds another round than the server believes, gets a
records downlink it cannot apply and asks for the dense state (counted as an extra downlink).
A straggler (`FederationHooks.delay_uplink`) trains and commits its state, but its messages are
held back here and handed to the server in a later round (`Delivery.late`), on every rank.
"""

from __future__ import annotations

import logging
import time

import torch

from .assets import client_privacy
from .checkpoint import pack_client_states, unpack_client_states
from .protocol.client import FederatedClient
from .protocol.codec import KIND_DENSE, MessageError
from .federation_config import FederationConfig
from .engine import (  # noqa: F401  (FederationResult, SimulatedCrash, sample_clients: re-exported)
    ClientOutcome,
    Delivery,
    FederationHooks,
    FederationResult,
    RoundEngine,
    RoundPlan,
    SimulatedCrash,
    Transport,
    sample_clients,
    torch_threads,
)
from .progress import RoundProgress
from .runtime import LocalRuntime, make_runtime
from .protocol.server import RoundSummary

logger = logging.getLogger(__name__)


class InProcessTransport(Transport):
    """Clients simulated in this process (one after another), or split across Accelerate ranks."""

    def __init__(self, hooks: FederationHooks | None = None):
        self.hooks = hooks or FederationHooks()

    def attach(self, engine: RoundEngine) -> None:
        config, data = engine.config, engine.data
        self.clients = [FederatedClient(c, data.client_examples[c], data.collate, batch_size=config.batch_size,
                                        data_seed=config.seed, loss_fn=data.loss_fn,
                                        per_example_loss_fn=data.per_example_loss_fn,
                                        privacy=client_privacy(config, len(data.client_examples[c]), c))
                        for c in range(config.num_clients)]
        if config.uses_lora:
            for cl in self.clients:
                cl.state.synced_round = None
        self.global_states: dict[int, torch.Tensor] = {0: engine.server.values}
        self.late: dict[int, list[tuple[int, bytes]]] = {}  # round they reach the server -> (sender, message)
        # the server assigned the partition: a client may not claim more examples (FedAvg weight) than it got
        engine.server.example_caps = {c: cl.num_examples for c, cl in enumerate(self.clients)}
        self.num_processes = engine.runtime.num_processes

    def restore(self, checkpoint: dict) -> None:
        states = unpack_client_states(checkpoint["clients"])
        if len(states) != len(self.clients):
            raise ValueError(f"cannot resume: the checkpoint holds {len(states)} client states for "
                             f"{len(self.clients)} clients")
        for client, st in zip(self.clients, states):
            client.state = st
        self.global_states = {int(r): v for r, v in checkpoint["global_states"].items()}
        self.late = {int(r): [(int(c), bytes(m)) for c, m in msgs]
                     for r, msgs in checkpoint.get("late_uplinks", {}).items()}

    def run_info(self) -> dict:
        return {"num_processes": self.num_processes}

    def exchange(self, engine: RoundEngine, plan: RoundPlan) -> Delivery:
        runtime = engine.runtime
        encoded: dict[tuple, bytes] = {}
        memo: dict = {}
        mine = runtime.split(plan.participants)
        progress = RoundProgress(engine.config.progress and runtime.is_main, plan.round + 1, engine.config.rounds,
                                 plan.budgets, list(mine))
        try:
            local = [self._run_client(engine, plan, cid, encoded, memo, progress.client(i, cid))
                     for i, cid in enumerate(mine)]
        finally:
            progress.close()
        outcomes = runtime.gather(local)
        outcomes = sorted(outcomes, key=lambda o: o.client_id)
        for o in outcomes:  # every rank holds the stragglers' messages back the same way
            if o.delay:
                self.late.setdefault(plan.round + o.delay, []).extend((o.client_id, m) for m in o.delayed)
        row = {"client_ranks": {str(o.client_id): o.rank for o in outcomes},
               "late_uplinks": {str(o.client_id): o.delay for o in outcomes if o.delay != 0}}
        return Delivery(outcomes, late=self.late.pop(plan.round, []), row=row)

    def _run_client(self, engine: RoundEngine, plan: RoundPlan, cid: int, encoded: dict, memo: dict,
                    progress=None) -> ClientOutcome:
        config, server, mask, params, r = engine.config, engine.server, engine.mask, engine.params, plan.round
        client = self.clients[cid]
        outcome = ClientOutcome(cid, rank=engine.runtime.process_index)
        start = time.perf_counter()
        try:
            if config.simulate_downlink:
                plan_ = server.downlink_plan(cid)
                if plan_ not in encoded:
                    encoded[plan_] = server.downlink(*plan_)
                msg = encoded[plan_]
                outcome.downlink_bytes += len(msg)
                outcome.downlink_kind = "dense" if plan_[0] == KIND_DENSE else "records"
                receive = dict(mask_checksum=mask.checksum, fingerprint=mask.fingerprint, params=params,
                               k=engine.model.num_selected)
                try:
                    values, _, budget = client.receive(msg, cache=self.global_states.get(client.state.synced_round),
                                                       memo=memo, **receive)
                except MessageError as err:
                    logger.warning("round %d client %d: cannot apply downlink (%s); requesting the dense state", r, cid, err)
                    outcome.fallback = err.reason
                    dense = server.downlink_for(cid, force_dense=True)
                    outcome.downlink_bytes += len(dense)
                    values, _, budget = client.receive(dense, cache=None, memo=None, **receive)
            else:
                values, budget = server.values, plan.budgets[cid]
                outcome.downlink_bytes = server.downlink_nbytes(cid)
                outcome.downlink_kind = "dense" if server.downlink_plan(cid)[0] == KIND_DENSE else "records"
            if self.hooks.before_client is not None:
                self.hooks.before_client(r, cid)
            res = client.train(config.local_optimizer, engine.model, values, r, budget, params, mask.checksum,
                               eps=config.zo_eps, estimator=config.zo_estimator, device=engine.runtime.device,
                               progress=progress)
            outcome.messages = [res.uplink]
            if self.hooks.tamper_uplink is not None:
                outcome.messages = list(self.hooks.tamper_uplink(r, cid, res.uplink))
            outcome.new_state, outcome.trained = res.new_state, True
            outcome.mean_loss, outcome.nan_steps, outcome.final_digest = res.mean_loss, res.nan_steps, res.final_digest
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # a client that fails mid-round drops out of it
            logger.warning("round %d: client %d dropped out: %s: %s", r, cid, type(err).__name__, err)
            outcome.dropped = f"{type(err).__name__}: {err}"
            outcome.messages, outcome.new_state = [], None
        if outcome.trained and self.hooks.delay_uplink is not None:
            self._delay(outcome, self.hooks.delay_uplink(r, cid))
        outcome.seconds = time.perf_counter() - start
        return outcome

    @staticmethod
    def _delay(outcome: ClientOutcome, delay: int | None) -> None:
        """Make a client a straggler: its messages leave the round (see `FederationHooks.delay_uplink`)."""
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
            raise ValueError(f"delay_uplink must return an integer >= 0 or None, got {delay!r}")
        outcome.delay = delay
        if delay != 0:
            outcome.delayed, outcome.messages = outcome.messages, []

    def commit(self, engine: RoundEngine, delivery: Delivery, summary: RoundSummary) -> None:
        server = engine.server
        for o in delivery.outcomes:
            if o.new_state is not None:  # transactional: dropped clients keep their old pointer
                self.clients[o.client_id].state = o.new_state
        # Global states still held by simulated clients (their caches), none older than the server's
        # records history: a records downlink starts within it (it only moves forward), so an older
        # state is never replayed from again (dense mode keeps no history: only the current state).
        self.global_states[server.round] = server.values
        first = server.history[0].round if server.history else server.round
        held = {cl.state.synced_round for cl in self.clients} | {server.round}
        for rr in sorted(self.global_states):  # oldest first
            over_budget = len(self.global_states) > engine.config.max_cached_states
            if rr != server.round and (rr not in held or rr < first or over_budget):
                self.global_states.pop(rr)

    def checkpoint_state(self) -> dict:
        return {"clients": pack_client_states([cl.state for cl in self.clients]),
                "global_states": dict(self.global_states),
                "late_uplinks": {r: list(msgs) for r, msgs in sorted(self.late.items())}}


def run_federation(config: FederationConfig, *, model=None, tokenizer=None, runtime: LocalRuntime | None = None,
                   hooks: FederationHooks | None = None) -> FederationResult:
    """Run (or resume) a federation; see the module docstring. `model`/`tokenizer` may be given
    instead of loading `config.model` (tests, notebooks)."""
    config.validate()
    hooks = hooks or FederationHooks()
    with torch_threads(config.torch_threads):
        engine = RoundEngine(config, runtime=runtime or make_runtime(config.device), model=model, tokenizer=tokenizer)
        return engine.run(InProcessTransport(hooks), after_round=hooks.after_round)
