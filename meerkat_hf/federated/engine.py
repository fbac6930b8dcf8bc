"""The round engine: everything a federation does on the server side, whatever moves its messages.

`RoundEngine(config, ...)` sets a run up (output folder, base model, task data, mask, wrapped
model, server, scheduler); `engine.run(transport)` resumes from the newest checkpoint when
asked, writes `run_info.json`, evaluates the zero-shot state, then for every round:

1. plans it: seeded client sampling, step budgets (Meerkat-VP), `server.begin_round`;
2. lets the transport deliver it (`Transport.exchange`): downlinks out, uplinks back, one
   `ClientOutcome` per participant -- the only part that differs between the in-process driver
   (`driver.py`, also under Accelerate) and Flower (`flower/server_app.py`);
3. aggregates: uplinks to the server in ascending client id, replay, FedAvg, GradIP to the
   scheduler;
4. records it: evaluation, the metrics row (built here only), `metrics.jsonl`, the checkpoint;

and at the end writes the plots and `final/` (mask, sparse delta, model card with the training
summary). The same config therefore gives the same files whichever transport ran it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..classification_metrics import paired_auc_gain, paired_gain
from ..privacy import gaussian_epsilon
from ..tasks import get_task
from ..versions import environment, library_versions
from ..zo.spsa import derive_seed
from .checkpoint import check_resumable, clear_checkpoints, load_latest_checkpoint, save_checkpoint
from .protocol.client import ClientState
from .assets import build_scheduler, build_server, client_noise_multiplier, load_base_model, protocol_params, wrap_model
from .federation_config import FederationConfig
from .reporting import MetricsLog, write_plots
from .progress import eta_seconds, format_duration
from .runtime import LocalRuntime
from .protocol.server import Rejection, RoundSummary, gradip_stats
from .task_data import build_federated_data

logger = logging.getLogger(__name__)

_SAMPLING_TAG = 0x53414D50  # "SAMP"


class SimulatedCrash(RuntimeError):
    """Raised by test hooks to stop a run between rounds."""


class DivergedError(FloatingPointError):
    """Every loss of `max_consecutive_skips` ZO steps in a row was NaN/inf: the run cannot learn."""


def encode_predictions(predictions) -> str | list[int]:
    """Per-example class ids, compactly for run_info.json: a digit string when every class id < 10."""
    values = [int(p) for p in predictions]
    return "".join(map(str, values)) if all(0 <= v < 10 for v in values) else values


def decode_predictions(encoded) -> np.ndarray | None:
    if encoded is None:
        return None
    return np.asarray([int(c) for c in encoded] if isinstance(encoded, str) else encoded, dtype=np.int64)


@dataclass
class FederationHooks:
    """Fault injection for tests and chaos runs (all optional).

    * `before_client(round, client_id)`: called after the downlink, before local training;
      raising makes the client drop out of the round.
    * `tamper_uplink(round, client_id, data) -> list[bytes]`: replace the client's uplink by any
      number of messages (corrupted, duplicated, stale...).
    * `after_round(round, row)`: called after the checkpoint; raising stops the run.
    * `delay_uplink(round, client_id) -> int | None`: a straggler. Its messages (after
      `tamper_uplink`) reach the server that many rounds late (0: on time; None: never), after
      its round was aggregated: the round counts the client as missing, the round they reach
      refuses them as stale. The client trained, so its data pointer advances all the same.

    The in-process driver and the Flower `ClientApp` apply the first two the same way;
    `delay_uplink` is the in-process driver's (under Flower a straggler is a real one: `round_timeout`).
    """

    before_client: Callable[[int, int], None] | None = None
    tamper_uplink: Callable[[int, int, bytes], list[bytes]] | None = None
    after_round: Callable[[int, dict], None] | None = None
    delay_uplink: Callable[[int, int], int | None] | None = None


@dataclass
class ClientOutcome:
    """What a transport reports about one participant of a round (picklable: gathered across ranks)."""

    client_id: int
    messages: list[bytes] = field(default_factory=list)  # uplinks for the server, in arrival order
    new_state: ClientState | None = None
    downlink_bytes: int = 0  # codec bytes sent to this client (a dense fallback included)
    downlink_kind: str | None = None  # "records" / "dense"; None: nothing was sent
    fallback: str | None = None  # why the client asked for the dense state
    dropped: str | None = None  # why the client took no part
    trained: bool = False  # ran its local steps and reported
    mean_loss: float = math.nan
    nan_steps: int = 0
    final_digest: bytes = b""
    seconds: float = 0.0
    rank: int = 0
    delay: int | None = 0  # a straggler's lateness in rounds (`FederationHooks.delay_uplink`; None: never arrives)
    delayed: list[bytes] = field(default_factory=list)  # its messages, held back until then


@dataclass
class RoundPlan:
    round: int
    participants: list[int]
    budgets: dict[int, int]
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Delivery:
    """A transport's account of one round."""

    outcomes: list[ClientOutcome]  # one per participant, ascending client id
    rejected: list[Rejection] = field(default_factory=list)  # refused by the transport itself
    late: list[tuple[int, bytes]] = field(default_factory=list)  # (sender, message) of earlier rounds, arriving now
    row: dict = field(default_factory=dict)  # the transport's own metrics for this round


@dataclass
class FederationResult:
    config: FederationConfig
    final_values: torch.Tensor = field(repr=False)
    initial_values: torch.Tensor = field(repr=False)
    mask: object = field(repr=False)
    metrics: list[dict] = field(repr=False)
    output_dir: Path
    final_eval: dict
    limited_clients: list[int]
    total_uplink_bytes: int
    total_downlink_bytes: int
    total_fedavg_full_bytes: int
    state_digest: str
    num_params: int
    k: int
    model: object = field(default=None, repr=False)
    initial_eval: dict = field(default_factory=dict)  # the zero-shot state, before round 0
    training_summary: dict = field(default_factory=dict)  # what final/'s model card reports (and a push)
    gain: dict = field(default_factory=dict)  # balanced-accuracy gain after - before, paired bootstrap interval
    privacy: dict = field(default_factory=dict)  # dp_epsilon / dp_user_epsilon at dp_delta (empty without DP)


class Transport:
    """How a round's messages reach the clients. Subclasses implement `exchange`."""

    plot_title: str | None = None  # None: the algorithm

    def attach(self, engine: RoundEngine) -> None:
        """Called once the engine is set up, before resuming."""

    def restore(self, checkpoint: dict) -> None:
        """Restore the transport's own state from a round checkpoint."""

    def start(self, engine: RoundEngine) -> None:
        """Called before the first round (after resume and run_info.json)."""

    def exchange(self, engine: RoundEngine, plan: RoundPlan) -> Delivery:
        raise NotImplementedError

    def commit(self, engine: RoundEngine, delivery: Delivery, summary: RoundSummary) -> None:
        """Called after aggregation, before the round is recorded and checkpointed."""

    def checkpoint_state(self) -> dict:
        """The transport's part of a round checkpoint (`clients`, `global_states`, ...)."""
        return {}

    def run_info(self) -> dict:
        """Extra keys for run_info.json."""
        return {}

    def report(self, row: dict) -> None:
        """Called with every recorded row on the main process."""


def sample_clients(seed: int, round_id: int, num_clients: int, fraction: float) -> list[int]:
    """Seeded client sampling without replacement; sorted ids."""
    m = max(1, int(round(fraction * num_clients)))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_id, _SAMPLING_TAG))
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


@contextmanager
def torch_threads(n: int | None):
    """`torch.set_num_threads(n)` for the duration of a run (None: leave it)."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _task_hub_dataset(config: FederationConfig) -> str | None:
    """The Hub dataset id of a named task (for the card's `datasets` metadata); None for local data."""
    if config.task.data_files is not None or config.task.prompt is not None or not config.task.name:
        return None
    try:
        return get_task(config.task.name).hub_path
    except (KeyError, ValueError):
        return None


def training_summary(config: FederationConfig, task: str, initial_eval: dict, final_eval: dict, counters: dict,
                     limited: list[int], digest: str, gain: dict | None = None) -> dict:
    """The facts a reader of the delta's model card needs (rendered as its Training table)."""
    summary: dict = {"algorithm": config.algorithm, "task": task, "num_clients": config.num_clients,
                     "partition": f"{config.partition.scheme} (alpha={config.partition.alpha:g}, "
                                  f"{config.partition.num_single_label_clients} single-label clients)",
                     "rounds": config.rounds, "local_steps": config.local_steps, "learning_rate": config.learning_rate,
                     "zo_eps": config.zo_eps, "zo_estimator": config.zo_estimator, "forward_dtype": config.model.dtype}
    if config.task.type == "classification":
        summary["loss"] = "class-balanced candidate cross-entropy" if config.task.loss == "balanced" \
            else "candidate cross-entropy"
    hub_dataset = _task_hub_dataset(config)
    if hub_dataset:
        summary["datasets"] = [hub_dataset]
    for key, value in initial_eval.items():
        summary[f"{key}_before"] = value
    for key, value in final_eval.items():
        summary[f"{key}_after"] = value
    if gain:
        summary["balanced_accuracy_gain"] = gain["gain"]
        summary["balanced_accuracy_gain_ci_low"], summary["balanced_accuracy_gain_ci_high"] = gain["gain_ci"]
        if gain.get("auc"):
            summary["auc_gain"] = gain["auc"]["gain"]
            summary["auc_gain_ci_low"], summary["auc_gain_ci_high"] = gain["auc"]["gain_ci"]
    sent = counters["uplink"] + counters["downlink"]
    summary.update({"uplink_bytes": counters["uplink"], "downlink_bytes": counters["downlink"],
                    "full_model_fedavg_bytes": counters["fedavg_full"],
                    "communication_reduction": f"{counters['fedavg_full'] / max(sent, 1):,.0f}x",
                    "meerkat_vp_limited_clients": ", ".join(map(str, limited)) or "none",
                    "state_digest": digest,
                    "versions": ", ".join(f"{k} {v}" for k, v in library_versions().items())})
    return summary


class PrivacyLedger:
    """Each client's privacy spent so far, computed on the server from public facts only.

    Example-level: Opacus RDP epsilon at `dp.delta` of the client's sampled Gaussian steps (its
    noise multiplier, rate batch_size / n_c, every step of every round it was sampled for,
    whether or not its uplink arrived: an upper bound). User-level (central noise): the Gaussian
    mechanism once per round the client took part in, with no amplification by client sampling
    (the sampler is seeded from the federation seed, which the server knows).
    """

    def __init__(self, config: FederationConfig):
        self.config = config
        self.steps: dict[int, int] = {}
        self.rounds: dict[int, int] = {}

    def observe(self, plan: RoundPlan) -> None:
        for c, budget in plan.budgets.items():
            self.steps[c] = self.steps.get(c, 0) + int(budget)
            self.rounds[c] = self.rounds.get(c, 0) + 1

    def multipliers(self, sizes: dict[int, int]) -> dict[int, float]:
        """Every known client's noise multiplier (solving a target epsilon fails here, before round 1)."""
        return {c: client_noise_multiplier(self.config, n) for c, n in sorted(sizes.items())}

    def row(self, sizes: dict[int, int]) -> dict:
        dp, out = self.config.dp, {}
        if dp.example_level:
            eps = {c: gaussian_epsilon(client_noise_multiplier(self.config, sizes[c]),
                                       min(1.0, self.config.batch_size / sizes[c]), s, dp.delta)
                   for c, s in sorted(self.steps.items()) if c in sizes}
            out.update({"dp_epsilon": max(eps.values(), default=0.0), "dp_delta": dp.delta,
                        "dp_epsilon_clients": {str(c): e for c, e in eps.items()}})
        if dp.central_noise_multiplier is not None:
            out.update({"dp_user_epsilon": gaussian_epsilon(dp.central_noise_multiplier, 1.0,
                                                            max(self.rounds.values(), default=0), dp.delta),
                        "dp_delta": dp.delta})
        return out

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "rounds": dict(self.rounds)}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.steps = {int(c): int(n) for c, n in state.get("steps", {}).items()}
        self.rounds = {int(c): int(n) for c, n in state.get("rounds", {}).items()}


def dp_summary(config: FederationConfig, row: dict, multipliers: dict[int, float]) -> dict:
    """The model card's privacy lines (empty without DP)."""
    dp, out = config.dp, {}
    if dp.example_level:
        sig = sorted(set(round(v, 4) for v in multipliers.values()))
        out.update({"differential_privacy": "example-level (per-example clipped ZO scalars, Poisson sampling, "
                                            "client-private Gaussian noise; Opacus RDP accountant)",
                    "dp_clip": dp.clip, "dp_noise_multiplier": ", ".join(f"{s:g}" for s in sig) or "n/a",
                    "dp_epsilon": row.get("dp_epsilon"), "dp_delta": dp.delta})
    if dp.central_noise_multiplier is not None:
        out.update({"dp_central_noise_multiplier": dp.central_noise_multiplier,
                    "dp_user_epsilon": row.get("dp_user_epsilon"), "dp_delta": dp.delta})
    return out


class RoundEngine:
    """A federation's server side, set up from `config`; `run(transport)` runs (or resumes) it.

    `model`/`tokenizer` may be given instead of loading `config.model` (tests, notebooks).
    `build_data`: load the task's data (needed to evaluate, and for a mask calibrated on the
    task's own text); `evaluate`: evaluate on the main process every `eval_every` rounds.
    """

    def __init__(self, config: FederationConfig, *, runtime: LocalRuntime | None = None, model=None, tokenizer=None,
                 build_data: bool = True, evaluate: bool = True):
        config.validate()
        self.config = config
        self.runtime = runtime or LocalRuntime(config.device)
        self.out = Path(config.output_dir)
        if self.runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.runtime.barrier()
        if model is None:
            model, loaded_tok = load_base_model(config)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("a tokenizer is needed when a model is passed in")
        model.eval()
        model.to(self.runtime.device)
        self.tokenizer = tokenizer
        self.num_params = sum(p.numel() for p in model.parameters())
        self.data = build_federated_data(config, tokenizer) if build_data else None
        self.evaluates = evaluate and self.data is not None
        self.model, self.mask = wrap_model(config, model, tokenizer, self.data, self.runtime, self.out)
        self.k = self.model.num_selected
        self.initial = self.model.values.clone()
        self.params = protocol_params(config, self.initial)
        self.server = build_server(config, self.mask, self.initial)
        self.scheduler = build_scheduler(config, self.mask)
        self.counters: dict[str, int] = {"uplink": 0, "downlink": 0, "fedavg_full": 0, "skipped_steps": 0}
        self.consecutive_skips = 0  # ZO steps in a row (rounds in order) whose every loss was NaN/inf
        self.eval_seconds = 0.0  # the latest evaluation's duration (for the ETA)
        self.start_round = 0
        self.initial_eval: dict = {}
        self.initial_predictions: np.ndarray | None = None  # per-example, for the paired gain
        self.initial_scores: np.ndarray | None = None  # per-example class scores, for the paired AUC gain
        self.last_eval: dict = {}  # the latest evaluation
        self.round_eval: dict = {}  # this round's evaluation (empty when none was due)
        self.log: MetricsLog | None = None
        self.privacy = PrivacyLedger(config)
        self.dp_multipliers: dict[int, float] = {}
        self.dp_row: dict = {}

    # -- before the first round -------------------------------------------------------------
    def _resume(self, transport: Transport) -> None:
        config = self.config
        if config.resume:
            ckpt = load_latest_checkpoint(self.out)
            if ckpt is not None:
                check_resumable(ckpt["config"], config.to_dict(), ckpt["mask_checksum"], self.mask.checksum)
                self.server.load_state_dict(ckpt["server"], source=ckpt.get("path", self.out))
                self.scheduler.load_state_dict(ckpt["scheduler"])
                self.counters.update(ckpt["counters"])
                self.privacy.load_state_dict(ckpt.get("privacy"))
                transport.restore(ckpt)
                self.start_round = self.server.round
                logger.info("resumed from %s at round %d", ckpt["path"], self.start_round)
            else:
                logger.info("resume: no usable checkpoint in %s; starting a fresh run", self.out)
        if self.start_round == 0:  # a fresh run, or resume=True with nothing to resume from: the same start-up
            self.scheduler.start(config.num_clients)
        if self.start_round == 0 and self.runtime.is_main:  # no older run's checkpoints to be resumed later
            clear_checkpoints(self.out)

    def _initial_evaluation(self) -> dict:
        """The zero-shot metrics (main rank); a resumed run reads them back from run_info.json."""
        if not (self.config.eval_before and self.evaluates and self.runtime.is_main):
            return {}
        if self.start_round > 0:
            info_path = self.out / "run_info.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            self.initial_predictions = decode_predictions(info.get("initial_predictions"))
            scores = info.get("initial_scores")
            self.initial_scores = None if scores is None else np.asarray(scores, dtype=np.float32)
            return info.get("initial_eval") or {}
        t0 = time.perf_counter()
        metrics = self.data.evaluate(self.model)
        if self.data.last_eval.get("predictions") is not None:
            self.initial_predictions = np.asarray(self.data.last_eval["predictions"], dtype=np.int64)
        if self.data.last_eval.get("scores") is not None:
            self.initial_scores = np.asarray(self.data.last_eval["scores"], dtype=np.float32)
        logger.info("round 0 (zero-shot, before training): %s (%.1fs)",
                    ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), time.perf_counter() - t0)
        return metrics

    def _write_run_info(self, transport: Transport) -> None:
        config, data, mask = self.config, self.data, self.mask
        info = {"config": config.to_dict(), "k": self.k, "num_params": self.num_params, "mask_checksum": mask.checksum,
                "initial_eval": self.initial_eval,
                "initial_predictions": (None if self.initial_predictions is None
                                        else encode_predictions(self.initial_predictions)),
                "initial_scores": None if self.initial_scores is None else self.initial_scores.tolist(),
                "mask_method": mask.config.method, "has_pretrain_grad": mask.pretrain_grad is not None,
                "versions": library_versions(), "environment": environment()}
        if data is not None:
            info.update({"data": data.description, "client_sizes": [len(e) for e in data.client_examples]})
        info.update(transport.run_info())
        (self.out / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        if data is not None:
            (self.out / "partition.txt").write_text(data.partition_table() + "\n")
            logger.info("federation: %s, k=%d of %d parameters, %d clients\n%s", config.algorithm, self.k,
                        self.num_params, config.num_clients, data.partition_table())

    # -- one round ----------------------------------------------------------------------------
    def plan_round(self, r: int) -> RoundPlan:
        config, started = self.config, time.perf_counter()
        participants = sample_clients(config.seed, r, config.num_clients, config.client_fraction)
        budgets = self.scheduler.budgets(participants)
        self.server.begin_round(r, budgets)
        return RoundPlan(r, participants, budgets, started)

    def aggregate(self, plan: RoundPlan, delivery: Delivery) -> tuple[RoundSummary, dict, list[int]]:
        """Uplinks to the server (late ones first, then ascending client id), replay + FedAvg, GradIP
        to the scheduler."""
        for sender, m in delivery.late:  # stragglers' messages of earlier rounds: the server refuses them
            self.server.receive(m, sender=sender)
        for o in delivery.outcomes:
            for m in o.messages:
                self.server.receive(m, sender=o.client_id)  # the transport knows whose channel it was
        summary = self.server.finish_round()
        gradips = {p.client_id: p.gradips for p in summary.paths}
        vp_info = self.scheduler.observe_round(plan.round, gradips)
        by_id = {o.client_id: o for o in delivery.outcomes}
        mismatches = [p.client_id for p in summary.paths
                      if by_id[p.client_id].final_digest and by_id[p.client_id].final_digest != p.final_digest]
        if mismatches:
            logger.warning("round %d: replayed state differs from the client's own for %s "
                           "(uplink altered in transit, or non-deterministic local arithmetic)", plan.round, mismatches)
        return summary, vp_info, mismatches

    def record(self, plan: RoundPlan, delivery: Delivery, summary: RoundSummary, vp_info: dict,
               mismatches: list[int]) -> dict:
        """Count bytes, evaluate when due, and build the round's metrics row (the only place it is built)."""
        config, r, outcomes = self.config, plan.round, delivery.outcomes
        up = summary.uplink_bytes
        down = sum(o.downlink_bytes for o in outcomes)
        full = 2 * 4 * self.num_params * len(plan.participants)
        self.counters["uplink"] += up
        self.counters["downlink"] += down
        self.counters["fedavg_full"] += full

        evaluated = self.round_eval = {}
        if self.evaluates and self.runtime.is_main and ((r + 1) % config.eval_every == 0 or r + 1 == config.rounds):
            self.model.set_values(self.server.values)
            t0 = time.perf_counter()
            evaluated = self.round_eval = self.last_eval = self.data.evaluate(self.model)
            self.eval_seconds = time.perf_counter() - t0
        gradips = {p.client_id: p.gradips for p in summary.paths}
        skipped = sum(summary.nan_steps.values())  # ZO perturbations whose loss was NaN/inf (g sent as 0)
        perturbations = sum(plan.budgets.get(c, 0) for c in summary.accepted) * self.params.q
        self.counters["skipped_steps"] = self.counters.get("skipped_steps", 0) + skipped
        if config.local_optimizer == "zo" and perturbations:
            self.consecutive_skips = self.consecutive_skips + skipped if skipped >= perturbations else 0
        return {
            "round": r + 1,  # rounds done: 0 is the zero-shot state (run_info.json), r + 1 after this one
            "lr": self.params.schedule(r),
            "participants": plan.participants,
            "budgets": {str(c): b for c, b in plan.budgets.items()},
            "accepted": summary.accepted,
            "rejected": [rej.to_dict() for rej in summary.rejected] + [rej.to_dict() for rej in delivery.rejected],
            "dropped": {str(o.client_id): o.dropped for o in outcomes if o.dropped},
            "missing": summary.missing,
            "limited_clients": sorted(self.scheduler.limited),
            "newly_limited": vp_info["newly_limited"],
            "vp_decisions": vp_info["decided"],
            **evaluated,
            "uplink_bytes": up,
            "downlink_bytes": down,
            "round_bytes": up + down,
            "cumulative_uplink_bytes": self.counters["uplink"],
            "cumulative_downlink_bytes": self.counters["downlink"],
            "cumulative_bytes": self.counters["uplink"] + self.counters["downlink"],
            "fedavg_full_bytes": full,
            "cumulative_fedavg_full_bytes": self.counters["fedavg_full"],
            "downlink_kinds": {str(o.client_id): o.downlink_kind for o in outcomes if o.downlink_kind is not None},
            "downlink_fallbacks": {str(o.client_id): o.fallback for o in outcomes if o.fallback},
            "gradip": {str(c): gradip_stats(g) for c, g in gradips.items()},
            "gradip_steps": {str(c): g for c, g in gradips.items()},
            "train_loss": {str(o.client_id): o.mean_loss for o in outcomes if o.trained and not o.dropped},
            "nan_steps": {str(c): n for c, n in summary.nan_steps.items() if n},
            "skipped_steps": skipped,
            "cumulative_skipped_steps": self.counters["skipped_steps"],
            "replay_mismatches": mismatches,
            "clipped": {str(c): f for c, f in summary.clipped.items()}, "refused": summary.refused,
            "weight_capped": {str(c): list(v) for c, v in summary.weight_capped.items()},
            **delivery.row,
            **self._privacy_row(),
            "state_digest": summary.state_digest.hex(),
            "seconds": round(time.perf_counter() - plan.started, 3),
        }

    def _client_sizes(self) -> dict[int, int]:
        """Each client's example count as the server knows it (what its sample rate is computed from)."""
        sizes = dict(self.server.example_caps)
        if self.data is not None:
            for c, examples in enumerate(self.data.client_examples):
                sizes.setdefault(c, len(examples))
        return sizes

    def _privacy_row(self) -> dict:
        if not self.config.dp.enabled:
            return {}
        self.dp_row = self.privacy.row(self._client_sizes())
        return self.dp_row

    def checkpoint(self, r: int, transport: Transport) -> None:
        extra = dict(transport.checkpoint_state())
        save_checkpoint(self.out, r + 1, {  # named by rounds done, like the metrics rows
            "config": self.config.to_dict(), "mask_checksum": self.mask.checksum, "server": self.server.state_dict(),
            "clients": extra.pop("clients", []), "scheduler": self.scheduler.state_dict(),
            "global_states": extra.pop("global_states", {}), "counters": dict(self.counters),
            "privacy": self.privacy.state_dict(), **extra,
        }, keep=self.config.keep_checkpoints)

    # -- the run ---------------------------------------------------------------------------------
    def run(self, transport: Transport, *, after_round: Callable[[int, dict], None] | None = None) -> FederationResult:
        config, runtime = self.config, self.runtime
        transport.attach(self)
        if config.dp.example_level:  # solve every known client's multiplier now: an unreachable target fails here
            self.dp_multipliers = self.privacy.multipliers(self._client_sizes())
            logger.info("example-level DP: clip %g, noise multiplier per client %s, delta %g", config.dp.clip,
                        {c: round(s, 4) for c, s in self.dp_multipliers.items()}, config.dp.delta)
        self._resume(transport)
        self.log = MetricsLog(self.out, self.start_round) if runtime.is_main else None
        self.initial_eval = self._initial_evaluation()
        if runtime.is_main and self.start_round == 0:
            self._write_run_info(transport)
        transport.start(self)

        bar = tqdm(range(self.start_round, config.rounds), desc=f"{config.algorithm} rounds", initial=self.start_round,
                   total=config.rounds, disable=not (config.progress and runtime.is_main))
        for r in bar:
            plan = self.plan_round(r)
            self.privacy.observe(plan)
            delivery = transport.exchange(self, plan)
            summary, vp_info, mismatches = self.aggregate(plan, delivery)
            transport.commit(self, delivery, summary)
            row = self.record(plan, delivery, summary, vp_info, mismatches)
            if runtime.is_main:
                self.log.append(row)
                if (r + 1) % config.checkpoint_every == 0 or r + 1 == config.rounds:
                    self.checkpoint(r, transport)
                postfix = {"up": self.counters["uplink"], "down": self.counters["downlink"]}
                postfix.update({k: round(v, 4) for k in ("accuracy", "balanced_accuracy", "eval_loss")
                                if (v := self.round_eval.get(k)) is not None})
                postfix.update({k: round(row[k], 3) for k in ("dp_epsilon", "dp_user_epsilon") if k in row})
                if config.progress:
                    eta = self._eta(plan, row)
                    postfix["eta"] = format_duration(eta)
                    logger.info("round %d/%d done in %s; about %s left", r + 1, config.rounds,
                                format_duration(row["seconds"]), format_duration(eta))
                bar.set_postfix(postfix)
                transport.report(row)
            self._check_diverged(r)
            runtime.barrier()
            if after_round is not None:
                after_round(r, row)
        return self.finish(transport)

    def _eta(self, plan: RoundPlan, row: dict) -> float:
        """Seconds left: the local steps still planned (seeded sampling, VP limits) at this round's
        measured seconds per step, plus the evaluations still due at the last one's duration."""
        config, r = self.config, plan.round
        train = max(row["seconds"] - (self.eval_seconds if self.round_eval else 0.0), 0.0)
        per_step = train / max(1, sum(plan.budgets.values()))
        limited, short = self.scheduler.limited, (config.vp.limited_steps if config.scheduler_mode != "none" else None)
        future = [sum(short if short is not None and c in limited else config.local_steps
                      for c in sample_clients(config.seed, rr, config.num_clients, config.client_fraction))
                  for rr in range(r + 1, config.rounds)]
        evals = sum(1 for rr in range(r + 1, config.rounds) if (rr + 1) % config.eval_every == 0 or rr + 1 == config.rounds)
        return eta_seconds(per_step, future, evals if self.evaluates else 0, self.eval_seconds)

    def _check_diverged(self, r: int) -> None:
        """Stop (on every rank: they all replay the same uplinks) once every loss of
        `max_consecutive_skips` ZO steps in a row was NaN/inf; the counts are in metrics.jsonl."""
        config = self.config
        if config.max_consecutive_skips and self.consecutive_skips >= config.max_consecutive_skips:
            raise DivergedError(
                f"{self.consecutive_skips} ZO steps in a row (every client's, up to round {r + 1}) had a NaN/inf loss "
                f"with learning_rate={config.learning_rate:g}, zo_eps={config.zo_eps:g}, "
                f"zo_num_perturbations={config.zo_num_perturbations}, weight_decay={config.weight_decay:g}: "
                f"the model diverged or eps is too large; lower them (--set learning_rate=... --set zo_eps=...); "
                f"skipped steps per round are in {self.out / 'metrics.jsonl'}")

    def _gain(self) -> dict:
        """Balanced-accuracy gain of the final state over the zero-shot one on the same eval examples
        (paired bootstrap, 95%); {} when either side's per-example predictions are missing."""
        before, last = self.initial_predictions, self.data.last_eval if self.data is not None else {}
        after, labels = last.get("predictions"), last.get("labels")
        if before is None or after is None or labels is None or len(before) != len(after) or not self.last_eval:
            return {}
        gain = paired_gain(before, after, labels, last.get("num_classes"))
        out = {"metric": "balanced_accuracy", **gain, "n": int(len(labels)), "num_classes": last.get("num_classes"),
               "method": "paired bootstrap over the same eval examples, 1000 resamples, 95%"}
        scores = last.get("scores")
        if self.initial_scores is not None and scores is not None and self.initial_scores.shape == np.shape(scores):
            out["auc"] = paired_auc_gain(self.initial_scores, scores, labels)
        return out

    def _client_groups(self) -> dict[str, list[int]] | None:
        """Single-label vs mixed-label clients (the plots' groups); None without labels."""
        data = self.data
        if data is None or data.labels is None or not data.parts:
            return None
        single = [c for c, part in enumerate(data.parts) if len(set(data.labels[part].tolist())) == 1]
        return {"single-label clients": single,
                "mixed-label clients": [c for c in range(len(data.parts)) if c not in single]}

    def finish(self, transport: Transport) -> FederationResult:
        """Plots, the final evaluation's summary and `final/` (mask + sparse delta + model card)."""
        config, runtime = self.config, self.runtime
        self.model.set_values(self.server.values)
        rows = self.log.rows if self.log is not None else []
        if runtime.is_main and config.plots and rows:
            write_plots(rows, self.out / "plots", title=transport.plot_title or config.algorithm,
                        initial=self.initial_eval, groups=self._client_groups())
        last_eval = self.last_eval
        if not last_eval and rows:
            last_eval = {k: rows[-1][k] for k in ("accuracy", "eval_loss") if rows[-1].get(k) is not None}
        limited = sorted(self.scheduler.limited)
        digest = self.server.digest.hex()
        task = self.data.description if self.data is not None else str(config.task.name)
        gain = self._gain() if runtime.is_main else {}
        summary = training_summary(config, task, self.initial_eval, last_eval, self.counters, limited, digest, gain)
        if config.dp.enabled:
            summary.update(dp_summary(config, self.dp_row or self._privacy_row(), self.dp_multipliers))
        if runtime.is_main and config.save_final:
            self.model.save_pretrained(self.out / "final", model_card=True, training_summary=summary)
        runtime.barrier()
        return FederationResult(
            config=config, final_values=self.server.values.clone(), initial_values=self.initial, mask=self.mask,
            metrics=rows, output_dir=self.out, final_eval=last_eval, initial_eval=self.initial_eval,
            limited_clients=limited, total_uplink_bytes=self.counters["uplink"],
            total_downlink_bytes=self.counters["downlink"], total_fedavg_full_bytes=self.counters["fedavg_full"],
            state_digest=digest, num_params=self.num_params, k=self.k, model=self.model, training_summary=summary,
            gain=gain, privacy=dict(self.dp_row),
        )


def result_fields(result: FederationResult) -> dict:
    """A result's fields, to build a transport's richer result from it."""
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(FederationResult)}
