"""`run_federation(config)`: the round loop of a simulated federation, single-process or Accelerate.

One round: sample clients (seeded), set step budgets (Meerkat-VP), send each participant the
smaller downlink, run its local steps, collect uplink bytes (from every rank), let the server
validate/replay/aggregate, feed GradIP to the detector, evaluate every `eval_every` rounds,
log a JSONL row, checkpoint. Everything random is derived from `config.seed`, so a resumed run
reproduces the uninterrupted one bit for bit.

Simulation details (documented, not protocol): simulated clients keep their cached global
state by reference to the driver's table of past global states (`max_cached_states` of them);
a client whose cache is gone, or who holds another round than the server believes, gets a
records downlink it cannot apply and asks for the dense state (counted as an extra downlink).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..zo import derive_seed
from .protocol import build_scheduler, build_server, protocol_params
from .checkpoint import check_resumable, clear_checkpoints, load_latest_checkpoint, save_checkpoint
from .client import ClientState, FederatedClient
from .codec import KIND_DENSE, MessageError
from .config import FederationConfig
from .reporting import MetricsLog, write_plots
from .runtime import LocalRuntime, make_runtime
from .server import gradip_stats

logger = logging.getLogger(__name__)

_SAMPLING_TAG = 0x53414D50  # "SAMP"


class SimulatedCrash(RuntimeError):
    """Raised by test hooks to stop a run between rounds."""


@dataclass
class FederationHooks:
    """Fault injection for tests and chaos runs (all optional).

    * `before_client(round, client_id)`: called after the downlink, before local training;
      raising makes the client drop out of the round.
    * `tamper_uplink(round, client_id, data) -> list[bytes]`: replace the client's uplink by any
      number of messages (corrupted, duplicated, stale...).
    * `after_round(round, row)`: called after the checkpoint; raising stops the run.
    """

    before_client: Callable[[int, int], None] | None = None
    tamper_uplink: Callable[[int, int, bytes], list[bytes]] | None = None
    after_round: Callable[[int, dict], None] | None = None


@dataclass
class ClientOutcome:
    """What a rank reports about one client (picklable, gathered across ranks)."""

    client_id: int
    messages: list[bytes] = field(default_factory=list)
    new_state: ClientState | None = None
    downlink_bytes: int = 0
    downlink_kind: str = ""
    fallback: str | None = None
    dropped: str | None = None
    mean_loss: float = math.nan
    nan_steps: int = 0
    final_digest: bytes = b""
    seconds: float = 0.0
    rank: int = 0


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


def sample_clients(seed: int, round_id: int, num_clients: int, fraction: float) -> list[int]:
    """Seeded client sampling without replacement; sorted ids."""
    m = max(1, int(round(fraction * num_clients)))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_id, _SAMPLING_TAG))
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


# -- set-up ---------------------------------------------------------------------------------
def load_base_model(config: FederationConfig):
    from ..loading import load_model_and_tokenizer

    m = config.model
    return load_model_and_tokenizer(m.model_name_or_path, m.gguf_file, m.dtype, m.revision)


def _calibration_source(config: FederationConfig, data):
    """The configured calibration source; "task" means the task's own prompts (not pre-training-like)."""
    from ..calibration import SelfGenerated

    src = config.mask.calibration
    if src == "self":
        return SelfGenerated()
    if src == "task":
        return list(data.calibration_texts or [])
    return src  # None, "python_docs" or a path: calibration.py resolves them


def _calibration_id(config: FederationConfig) -> str | None:
    """What the calibration text is, for the mask cache key (None: do not cache)."""
    from ..calibration import source_identity

    if config.mask.calibration == "task":
        t = config.task
        return f"task:{t.name}:{t.data_files}:{t.max_train_examples}:{config.seed}"
    return source_identity(config.mask.calibration)


def build_mask(config: FederationConfig, model, tokenizer, data, runtime, output_dir: Path):
    """Load `mask.path`, or compute the configured mask once (main rank) and share it via disk.

    Computed masks are cached (`mask.cache`, see `meerkat_hf.mask_cache`), so the calibration
    backprop runs once per model and spec, not once per run.
    """
    from ..compute import compute_mask
    from ..config import CONFIG_NAME, DEFAULT_EXCLUDE, SparseMaskConfig
    from ..mask import SparseMask
    from ..mask_cache import load_cached_mask, mask_cache_key, store_cached_mask

    if config.mask.path is not None:
        return SparseMask.from_pretrained(config.mask.path)
    mask_dir = output_dir / "mask"
    if not (config.resume and (mask_dir / CONFIG_NAME).is_file()):
        if runtime.is_main:
            m = config.mask
            method = config.mask_method
            spec = SparseMaskConfig(
                density=1.0 if method == "full" else m.density, method=method, scope=m.scope, seed=m.seed,
                include_patterns=m.include_patterns,
                exclude_patterns=list(DEFAULT_EXCLUDE) if m.exclude_patterns is None else m.exclude_patterns,
                calibration_num_sequences=m.calibration_num_sequences, calibration_seq_len=m.calibration_seq_len,
                calibration_batch_size=m.calibration_batch_size,
            )
            cal_id = None if method == "full" else _calibration_id(config)
            key = mask_cache_key(model, spec, cal_id) if (m.cache and cal_id is not None) else None
            mask = load_cached_mask(key) if key else None
            if mask is None:
                calibration = None if method == "full" else _calibration_source(config, data)
                mask = compute_mask(model, spec, calibration, tokenizer, progress=config.progress)
                if key:
                    store_cached_mask(key, mask)
            mask.save_pretrained(mask_dir, model_card=False)
        runtime.barrier()
    return SparseMask.from_pretrained(mask_dir)


def wrap_model(config: FederationConfig, model, tokenizer, data, runtime, output_dir: Path):
    """(MeerkatModel, mask): LoRA for lora-fedzo, else the configured/computed mask."""
    from ..model import get_meerkat_model

    if config.uses_lora:
        from peft import LoraConfig, get_peft_model

        from ..baselines import lora_mask

        torch.manual_seed(config.seed)  # every rank/run initializes the same adapter
        lc = config.lora
        peft_model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                      target_modules=lc.target_modules or ["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))
        peft_model.eval()
        mask = lora_mask(peft_model)
        return get_meerkat_model(peft_model, mask), mask
    mask = build_mask(config, model, tokenizer, data, runtime, output_dir)
    return get_meerkat_model(model, mask), mask


def _initial_evaluation(config: FederationConfig, data, wrapped, runtime, out: Path, start_round: int) -> dict:
    """The zero-shot metrics (main rank); a resumed run reads them back from run_info.json."""
    if not (config.eval_before and runtime.is_main):
        return {}
    if start_round > 0:
        info_path = out / "run_info.json"
        return json.loads(info_path.read_text()).get("initial_eval") or {} if info_path.is_file() else {}
    t0 = time.perf_counter()
    metrics = data.evaluate(wrapped)
    logger.info("before round 0 (zero-shot): %s (%.1fs)",
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), time.perf_counter() - t0)
    return metrics


def _task_hub_dataset(config: FederationConfig) -> str | None:
    """The Hub dataset id of a named task (for the card's `datasets` metadata); None for local data."""
    if config.task.data_files is not None or config.task.prompt is not None or not config.task.name:
        return None
    from ..tasks import get_task

    try:
        return get_task(config.task.name).hub_path
    except (KeyError, ValueError):
        return None


def _training_summary(config: FederationConfig, data, initial_eval: dict, final_eval: dict, counters: dict,
                      limited: list[int], digest: str) -> dict:
    """The facts a reader of the delta's model card needs (rendered as its Training table)."""
    summary: dict = {"algorithm": config.algorithm, "task": data.description, "num_clients": config.num_clients,
                     "partition": f"{config.partition.scheme} (alpha={config.partition.alpha:g}, "
                                  f"{config.partition.num_single_label_clients} single-label clients)",
                     "rounds": config.rounds, "local_steps": config.local_steps, "learning_rate": config.lr,
                     "zo_eps": config.eps}
    hub_dataset = _task_hub_dataset(config)
    if hub_dataset:
        summary["datasets"] = [hub_dataset]
    for key, value in initial_eval.items():
        summary[f"{key}_before"] = value
    for key, value in final_eval.items():
        summary[f"{key}_after"] = value
    sent = counters["uplink"] + counters["downlink"]
    summary.update({"uplink_bytes": counters["uplink"], "downlink_bytes": counters["downlink"],
                    "full_model_fedavg_bytes": counters["fedavg_full"],
                    "communication_reduction": f"{counters['fedavg_full'] / max(sent, 1):,.0f}x",
                    "meerkat_vp_limited_clients": ", ".join(map(str, limited)) or "none",
                    "state_digest": digest})
    return summary


# -- the loop ---------------------------------------------------------------------------------
def run_federation(config: FederationConfig, *, model=None, tokenizer=None, runtime: LocalRuntime | None = None,
                   hooks: FederationHooks | None = None) -> FederationResult:
    """Run (or resume) a federation; see the module docstring. `model`/`tokenizer` may be given
    instead of loading `config.model` (tests, notebooks)."""
    config.validate()
    previous_threads = torch.get_num_threads()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        return _run(config, model, tokenizer, runtime or make_runtime(config.device), hooks or FederationHooks())
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: FederationConfig, model, tokenizer, runtime: LocalRuntime, hooks: FederationHooks) -> FederationResult:
    out = Path(config.output_dir)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    runtime.barrier()

    if model is None:
        model, loaded_tok = load_base_model(config)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError("run_federation needs a tokenizer when a model is passed in")
    model.eval()
    model.to(runtime.device)
    num_params = sum(p.numel() for p in model.parameters())

    from .task_data import build_federated_data

    data = build_federated_data(config, tokenizer)
    wrapped, mask = wrap_model(config, model, tokenizer, data, runtime, out)
    k = wrapped.num_selected
    initial = wrapped.values.clone()

    params = protocol_params(config)
    zo = config.local_optimizer == "zo"
    server = build_server(config, mask, initial)
    clients = [FederatedClient(c, data.client_examples[c], data.collate, batch_size=config.batch_size,
                               data_seed=config.seed, loss_fn=data.loss_fn) for c in range(config.num_clients)]
    if config.uses_lora:
        for cl in clients:
            cl.state.synced_round = None
    scheduler = build_scheduler(config, mask)

    global_states: dict[int, torch.Tensor] = {0: server.values}
    counters = {"uplink": 0, "downlink": 0, "fedavg_full": 0}
    start_round = 0
    if config.resume:
        ckpt = load_latest_checkpoint(out)
        if ckpt is not None:
            check_resumable(ckpt["config"], config.to_dict(), ckpt["mask_checksum"], mask.checksum)
            server.load_state_dict(ckpt["server"])
            for c, st in enumerate(ckpt["clients"]):
                clients[c].state = ClientState(**st)
            scheduler.load_state_dict(ckpt["scheduler"])
            global_states = {int(r): v for r, v in ckpt["global_states"].items()}
            counters = dict(ckpt["counters"])
            start_round = server.round
            logger.info("resumed from %s at round %d", ckpt["path"], start_round)
    else:
        scheduler.start(config.num_clients)
    if start_round == 0 and runtime.is_main:
        clear_checkpoints(out)

    log = MetricsLog(out, start_round) if runtime.is_main else None
    initial_eval = _initial_evaluation(config, data, wrapped, runtime, out, start_round)
    if runtime.is_main and start_round == 0:
        info = {"config": config.to_dict(), "k": k, "num_params": num_params, "mask_checksum": mask.checksum,
                "initial_eval": initial_eval,
                "mask_method": mask.config.method, "has_pretrain_grad": mask.pretrain_grad is not None,
                "data": data.description, "client_sizes": [len(e) for e in data.client_examples],
                "num_processes": runtime.num_processes}
        (out / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        (out / "partition.txt").write_text(data.partition_table() + "\n")
        logger.info("federation: %s, k=%d of %d parameters, %d clients\n%s", config.algorithm, k, num_params,
                    config.num_clients, data.partition_table())

    from tqdm.auto import tqdm

    bar = tqdm(range(start_round, config.rounds), desc=f"{config.algorithm} rounds", initial=start_round,
               total=config.rounds, disable=not (config.progress and runtime.is_main))
    last_eval: dict = {}
    for r in bar:
        t0 = time.perf_counter()
        participants = sample_clients(config.seed, r, config.num_clients, config.client_fraction)
        budgets = scheduler.budgets(participants)
        server.begin_round(r, budgets)
        encoded: dict[tuple, bytes] = {}
        memo: dict = {}

        def run_client(cid: int) -> ClientOutcome:
            client = clients[cid]
            outcome = ClientOutcome(cid, rank=runtime.process_index)
            start = time.perf_counter()
            try:
                if config.simulate_downlink:
                    plan = server.downlink_plan(cid)
                    if plan not in encoded:
                        encoded[plan] = server.downlink(*plan)
                    msg = encoded[plan]
                    outcome.downlink_bytes += len(msg)
                    outcome.downlink_kind = "dense" if plan[0] == KIND_DENSE else "records"
                    receive = dict(mask_checksum=mask.checksum, fingerprint=mask.fingerprint, params=params)
                    try:
                        values, _, budget = client.receive(msg, cache=global_states.get(client.state.synced_round),
                                                           memo=memo, **receive)
                    except MessageError as err:
                        logger.warning("round %d client %d: cannot apply downlink (%s); requesting the dense state", r, cid, err)
                        outcome.fallback = err.reason
                        dense = server.downlink_for(cid, force_dense=True)
                        outcome.downlink_bytes += len(dense)
                        values, _, budget = client.receive(dense, cache=None, memo=None, **receive)
                else:
                    values, budget = server.values, budgets[cid]
                    outcome.downlink_bytes = server.downlink_nbytes(cid)
                    outcome.downlink_kind = "dense" if server.downlink_plan(cid)[0] == KIND_DENSE else "records"
                if hooks.before_client is not None:
                    hooks.before_client(r, cid)
                if zo:
                    res = client.train_zo(wrapped, values, r, budget, params, mask.checksum, config.eps, runtime.device)
                else:
                    res = client.train_first_order(wrapped, values, r, budget, params, mask.checksum, runtime.device)
                outcome.messages = [res.uplink]
                if hooks.tamper_uplink is not None:
                    outcome.messages = list(hooks.tamper_uplink(r, cid, res.uplink))
                outcome.new_state = res.new_state
                outcome.mean_loss, outcome.nan_steps, outcome.final_digest = res.mean_loss, res.nan_steps, res.final_digest
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # a client that fails mid-round drops out of it
                logger.warning("round %d: client %d dropped out: %s: %s", r, cid, type(err).__name__, err)
                outcome.dropped = f"{type(err).__name__}: {err}"
                outcome.messages, outcome.new_state = [], None
            outcome.seconds = time.perf_counter() - start
            return outcome

        mine = runtime.split(participants)
        outcomes = sorted(runtime.gather([run_client(c) for c in mine]), key=lambda o: o.client_id)
        for o in outcomes:
            for m in o.messages:
                server.receive(m)
        summary = server.finish_round()
        for o in outcomes:
            if o.new_state is not None:  # transactional: dropped clients keep their old pointer
                clients[o.client_id].state = o.new_state
        gradips = {p.client_id: p.gradips for p in summary.paths}
        vp_info = scheduler.observe_round(r, gradips)
        by_id = {o.client_id: o for o in outcomes}
        mismatches = [p.client_id for p in summary.paths
                      if by_id[p.client_id].final_digest and by_id[p.client_id].final_digest != p.final_digest]
        if mismatches:
            logger.warning("round %d: replayed state differs from the client's own for %s "
                           "(uplink altered in transit, or non-deterministic local arithmetic)", r, mismatches)

        # Global states still held by simulated clients (their caches).
        global_states[server.round] = server.values
        held = {cl.state.synced_round for cl in clients} | {server.round}
        for rr in sorted(global_states):  # oldest first
            over_budget = len(global_states) > config.max_cached_states
            if rr != server.round and (rr not in held or over_budget):
                global_states.pop(rr)

        up = summary.uplink_bytes
        down = sum(o.downlink_bytes for o in outcomes)
        full = 2 * 4 * num_params * len(participants)
        counters["uplink"] += up
        counters["downlink"] += down
        counters["fedavg_full"] += full

        evaluated: dict = {}
        if runtime.is_main and ((r + 1) % config.eval_every == 0 or r + 1 == config.rounds):
            wrapped.set_values(server.values)
            evaluated = data.evaluate(wrapped)
            last_eval = evaluated
        row = {
            "round": r,
            "lr": params.schedule(r),
            "participants": participants,
            "budgets": {str(c): b for c, b in budgets.items()},
            "accepted": summary.accepted,
            "rejected": [rej.to_dict() for rej in summary.rejected],
            "dropped": {str(o.client_id): o.dropped for o in outcomes if o.dropped},
            "missing": summary.missing,
            "limited_clients": sorted(scheduler.limited),
            "newly_limited": vp_info["newly_limited"],
            "vp_decisions": vp_info["decided"],
            **evaluated,
            "uplink_bytes": up,
            "downlink_bytes": down,
            "round_bytes": up + down,
            "cumulative_uplink_bytes": counters["uplink"],
            "cumulative_downlink_bytes": counters["downlink"],
            "cumulative_bytes": counters["uplink"] + counters["downlink"],
            "fedavg_full_bytes": full,
            "cumulative_fedavg_full_bytes": counters["fedavg_full"],
            "downlink_kinds": {str(o.client_id): o.downlink_kind for o in outcomes},
            "downlink_fallbacks": {str(o.client_id): o.fallback for o in outcomes if o.fallback},
            "gradip": {str(c): gradip_stats(g) for c, g in gradips.items()},
            "gradip_steps": {str(c): g for c, g in gradips.items()},
            "train_loss": {str(o.client_id): o.mean_loss for o in outcomes if not o.dropped},
            "nan_steps": {str(c): n for c, n in summary.nan_steps.items() if n},
            "replay_mismatches": mismatches,
            "client_ranks": {str(o.client_id): o.rank for o in outcomes},
            "state_digest": summary.state_digest.hex(),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if runtime.is_main:
            log.append(row)
            if (r + 1) % config.checkpoint_every == 0 or r + 1 == config.rounds:
                save_checkpoint(out, r, {
                    "config": config.to_dict(), "mask_checksum": mask.checksum, "server": server.state_dict(),
                    "clients": [cl.state.to_dict() for cl in clients], "scheduler": scheduler.state_dict(),
                    "global_states": dict(global_states), "counters": dict(counters),
                }, keep=config.keep_checkpoints)
            postfix = {"up": counters["uplink"], "down": counters["downlink"]}
            if evaluated:
                postfix.update({k2: round(v, 4) for k2, v in evaluated.items()})
            bar.set_postfix(postfix)
        runtime.barrier()
        if hooks.after_round is not None:
            hooks.after_round(r, row)

    wrapped.set_values(server.values)
    rows = log.rows if log is not None else []
    if runtime.is_main:
        if config.plots and rows:
            write_plots(rows, out / "plots", title=config.algorithm, initial=initial_eval)
    if not last_eval and rows:
        last_eval = {k2: rows[-1][k2] for k2 in ("accuracy", "eval_loss") if rows[-1].get(k2) is not None}
    summary = _training_summary(config, data, initial_eval, last_eval, counters, sorted(scheduler.limited),
                                server.digest.hex())
    if runtime.is_main and config.save_final:
        wrapped.save_pretrained(out / "final", model_card=True, training_summary=summary)
    runtime.barrier()
    return FederationResult(
        config=config, final_values=server.values.clone(), initial_values=initial, mask=mask, metrics=rows,
        output_dir=out, final_eval=last_eval, initial_eval=initial_eval, limited_clients=sorted(scheduler.limited),
        total_uplink_bytes=counters["uplink"], total_downlink_bytes=counters["downlink"],
        total_fedavg_full_bytes=counters["fedavg_full"], state_digest=server.digest.hex(), num_params=num_params,
        k=k, model=wrapped, training_summary=summary,
    )
