"""A Meerkat client: rebuild the global state from a downlink, run T local ZO steps, report scalars.

Local training calls `zo.py` directly (not `Trainer`): a round is a handful of forward pairs
and the protocol needs control over seeds, scalars and the fp32 master.

* Seeds: `derive_seed(federation_seed, round, client_id, step, j)`; nothing random is sent.
* Scalars are rounded to float32 *before* the client applies them, so the server, which only
  sees the float32 wire values, replays the very same update.
* Data pointer (`ClientState`): a per-epoch seeded permutation and a position; each step takes
  the next `batch_size` examples, wrapping into the next epoch. It survives rounds and
  checkpoints, so successive rounds (and one-step early-stopped rounds) walk through all data.
* NaN/inf loss: that perturbation's scalar is reported as g = 0 (a no-op step: the weights stay
  where they were, only weight decay applies) and counted in the uplink's `nan_steps` field.
  We do not send NaN: the server would reject the whole round of the client, throwing away its
  good steps; a logged, counted skip keeps them and keeps client and server in lockstep.
* Example-level DP (`privacy`, an `ExampleDP`): each step's batch is Poisson-sampled and its
  scalar is the clipped mean of per-example scalars plus Gaussian noise, both drawn from a
  generator seeded by `secrets` afresh every round (`meerkat_hf.privacy`); the data pointer
  is not used. The client then reports no clean number: `mean_loss` is NaN and `nan_steps` 0
  (a non-finite per-example scalar counts as 0 in the clipped sum).
* The client state is transactional: the driver commits the new `ClientState` only after the
  round's uplink was produced, so a client that drops out mid-round resumes from where it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ...privacy import ExampleDP, poisson_indices, private_scalar
from ...zo.spsa import (
    ZOStep,
    all_finite,
    apply_step,
    derive_seed,
    forwards_per_step,
    gaussian_direction,
    projected_gradients_per_example,
    step_scalars,
)
from .codec import (
    KIND_DENSE,
    DenseUplink,
    Downlink,
    MessageError,
    Uplink,
    checksum_bytes,
    decode_downlink,
    fingerprint_bytes,
    state_digest,
)
from .virtual_path import ProtocolParams, aggregate_zo_round, fp32, step_seed

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, dict], torch.Tensor]
StepCallback = Callable[[int, int, float], None]  # (step done, steps, loss): progress display only


def default_loss(model, batch: dict) -> torch.Tensor:
    """Causal-LM loss from the model itself (`labels` in the batch)."""
    return model(**batch).loss


@dataclass
class ClientState:
    """What a client carries between rounds (and what checkpoints store for it)."""

    epoch: int = 0
    position: int = 0
    steps_done: int = 0
    examples_seen: int = 0
    rounds_done: int = 0
    nan_steps: int = 0
    synced_round: int | None = 0  # the round whose global state the client holds (0: base model)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LocalResult:
    """One client round: the uplink bytes plus simulation-side diagnostics (never sent)."""

    client_id: int
    round: int
    uplink: bytes
    new_state: ClientState
    final_values: torch.Tensor | None = field(default=None, repr=False)
    mean_loss: float = float("nan")
    num_steps: int = 0
    nan_steps: int = 0
    final_digest: bytes = b""


class FederatedClient:
    """One client's private data, data pointer and local optimizer."""

    def __init__(self, client_id: int, examples: Sequence, collate_fn: Callable[[list], dict], *,
                 batch_size: int, data_seed: int, loss_fn: LossFn | None = None,
                 privacy: ExampleDP | None = None, per_example_loss_fn: LossFn | None = None):
        if len(examples) == 0:
            raise ValueError(f"client {client_id} has no examples")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if privacy is not None and per_example_loss_fn is None:
            raise ValueError("example-level DP needs per_example_loss_fn (one loss per example of the batch)")
        self.privacy = privacy
        self.per_example_loss_fn = per_example_loss_fn
        self.client_id = int(client_id)
        self.examples = examples
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.data_seed = data_seed
        self.loss_fn = loss_fn or default_loss
        self.state = ClientState()

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    # -- data pointer --------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self.data_seed, self.client_id, epoch))
        return rng.permutation(len(self.examples))

    def take(self, state: ClientState, n: int) -> tuple[list[int], ClientState]:
        """The next `n` example indices after `state`, and the advanced state (pure)."""
        idx: list[int] = []
        epoch, pos = state.epoch, state.position
        while len(idx) < n:
            perm = self._permutation(epoch)
            chunk = perm[pos:pos + (n - len(idx))]
            idx += [int(i) for i in chunk]
            pos += len(chunk)
            if pos >= len(perm):
                epoch, pos = epoch + 1, 0
        return idx, replace(state, epoch=epoch, position=pos, examples_seen=state.examples_seen + n)

    def batch(self, state: ClientState, device: torch.device | None) -> tuple[dict, ClientState]:
        idx, state = self.take(state, min(self.batch_size, len(self.examples)))
        return self._collate(idx, device), state

    def _collate(self, idx: list[int], device: torch.device | None) -> dict:
        batch = self.collate_fn([self.examples[i] for i in idx])
        if device is not None:
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return batch

    # -- downlink ------------------------------------------------------------------------
    def receive(self, data: bytes, *, mask_checksum: str | bytes, fingerprint: str | bytes, params: ProtocolParams,
                cache: torch.Tensor | None, memo: dict | None = None, k: int | None = None) -> tuple[torch.Tensor, int, int]:
        """Rebuild the round's global state: returns (values, round, my step budget).

        `cache` is the global state of `self.state.synced_round` (None: nothing held). A records
        downlink from another round, a wrong mask/base model or a reconstruction whose digest
        differs raise `MessageError`; the caller may then ask the server for the dense state.
        The digest only proves the client reached the state the server meant, not that the state
        is sane, so a state or records that would put NaN/inf (or another size than `k`, the
        mask's) into the model are refused too (`check_downlink`): a client never trains on them.
        `memo` (optional, shared by simulated clients holding the same cached round) reuses a
        verified reconstruction of the same records.
        """
        msg = decode_downlink(data)
        check_downlink(msg, params, k if k is not None else (None if cache is None else cache.numel()))
        if msg.mask_checksum != checksum_bytes(mask_checksum):
            raise MessageError("wrong-mask", "the server uses another mask")
        if msg.fingerprint != fingerprint_bytes(fingerprint):
            raise MessageError("wrong-base-model", "the server's base model has other parameter shapes")
        budget = msg.budget_of(self.client_id)
        if budget is None:
            raise MessageError("not-a-participant", f"client {self.client_id} is not in round {msg.round}")
        if msg.kind == KIND_DENSE:
            values = msg.dense
        else:
            if cache is None or self.state.synced_round != msg.from_round:
                raise MessageError("cache-mismatch",
                                   f"records replay from round {msg.from_round}, client holds round {self.state.synced_round}")
            key = (msg.from_round, msg.round, msg.state_digest)
            if memo is not None and key in memo:
                return memo[key], msg.round, budget
            values = cache
            for rr in msg.history:
                values, _, _ = aggregate_zo_round(values, rr.records, params, rr.round, with_paths=False)
                if not all_finite(values):
                    raise MessageError("non-finite", f"replaying the records of round {rr.round} leaves finite values")
        if state_digest(values) != msg.state_digest:
            raise MessageError("digest-mismatch", f"reconstructed state of round {msg.round} differs from the server's")
        if memo is not None and msg.kind != KIND_DENSE:
            memo[key] = values
        return values, msg.round, budget

    # -- local training --------------------------------------------------------------------
    def train(self, optimizer: str, model, start_values: torch.Tensor, round_id: int, budget: int,
              params: ProtocolParams, mask_checksum: str | bytes, *, eps: float, estimator: str = "spsa",
              device: torch.device | None = None, progress: StepCallback | None = None) -> LocalResult:
        """`optimizer` "zo": `train_zo`; "sgd": `train_first_order` (the fo-fedavg baseline).

        `progress(step_done, steps, loss)`, when given, is called after every local step (display only)."""
        if optimizer == "zo":
            return self.train_zo(model, start_values, round_id, budget, params, mask_checksum, eps, device,
                                 progress=progress, estimator=estimator)
        if optimizer == "sgd":
            return self.train_first_order(model, start_values, round_id, budget, params, mask_checksum, device,
                                          progress=progress)
        raise ValueError(f"unknown local optimizer {optimizer!r} (zo or sgd)")

    def train_zo(self, model, start_values: torch.Tensor, round_id: int, budget: int, params: ProtocolParams,
                 mask_checksum: str | bytes, eps: float, device: torch.device | None = None,
                 keep_final: bool = False, progress: StepCallback | None = None,
                 estimator: str = "spsa") -> LocalResult:
        """T = `budget` ZO steps from `start_values` (`zo.step_scalars`' `estimator`); returns the uplink (scalars only)."""
        start_digest = state_digest(start_values)
        model.set_values(start_values)
        values = model.values
        k = values.numel()
        lr = params.schedule(round_id)
        state = self.state
        grads: list[float] = []
        losses: list[float] = []
        nan_steps = 0
        dp = self.privacy
        generator = None if dp is None else dp.generator(self.client_id, round_id)
        for t in range(budget):
            if dp is None:
                batch, state = self.batch(state, device)
            else:  # Poisson sampling from the private generator (what the accountant assumes)
                idx = poisson_indices(self.num_examples, dp.sample_rate, generator)
                batch = self._collate(idx, device) if idx else None
                state = replace(state, examples_seen=state.examples_seen + len(idx))

            def loss_fn(batch=batch) -> float:
                value = float(self.loss_fn(model, batch))
                losses.append(value)
                return value

            def per_example_loss_fn(batch=batch) -> torch.Tensor:
                values = self.per_example_loss_fn(model, batch)
                losses.append(float(values.float().mean()))
                return values

            seeds = [step_seed(params.federation_seed, round_id, self.client_id, t, j) for j in range(params.q)]
            zs = [gaussian_direction(seed, k) for seed in seeds]
            if dp is None:
                # None: a fzoo step whose perturbed losses are all equal has nothing to normalise by;
                # it is sent as g = 0 (no move) and counted with the non-finite steps
                raw = step_scalars(model, loss_fn, zs, eps, estimator) or [float("nan")] * len(zs)
            else:  # an empty batch still releases its noise: the accountant counts every step
                raw = [private_scalar(projected_gradients_per_example(model, per_example_loss_fn, z, eps)
                                      if batch is not None else torch.zeros(0, dtype=torch.float64), dp, generator)[0]
                       for z in zs]
            gs = []
            for g in raw:
                if not math.isfinite(g):
                    g = 0.0
                    nan_steps += 1
                    logger.warning("client %d round %d step %d: non-finite loss (or no fzoo spread), step "
                                   "skipped (g=0)", self.client_id, round_id, t)
                gs.append(fp32(g))
            apply_step(values, ZOStep(tuple(seeds), tuple(gs), lr, params.weight_decay), directions=zs)
            model.sync_weights()
            grads += gs
            if progress is not None:
                step_losses = [x for x in losses[-forwards_per_step(estimator, params.q):] if math.isfinite(x)]
                progress(t + 1, budget, float(np.mean(step_losses)) if step_losses else float("nan"))
        uplink = Uplink(round_id, self.client_id, self.num_examples, checksum_bytes(mask_checksum),
                        start_digest, params.q, tuple(grads), nan_steps=nan_steps)
        new_state = replace(state, steps_done=state.steps_done + budget, rounds_done=state.rounds_done + 1,
                            nan_steps=state.nan_steps + nan_steps, synced_round=round_id)
        finite = [x for x in losses if math.isfinite(x)] if dp is None else []  # DP: no clean loss leaves
        return LocalResult(self.client_id, round_id, uplink.encode(), new_state,
                           values.clone() if keep_final else None,
                           float(np.mean(finite)) if finite else float("nan"), budget, nan_steps, state_digest(values))

    def train_first_order(self, model, start_values: torch.Tensor, round_id: int, budget: int,
                          params: ProtocolParams, mask_checksum: str | bytes, device: torch.device | None = None,
                          keep_final: bool = False, progress: StepCallback | None = None) -> LocalResult:
        """Backprop baseline: SGD on the same masked coordinates; the uplink is the dense fp32 delta."""
        if self.privacy is not None:
            raise ValueError("example-level DP is implemented for ZO clients only (not the fo-fedavg baseline)")
        start = start_values.detach().to("cpu", torch.float32).clone()
        model.set_values(start)
        values = model.values
        lr = params.schedule(round_id)
        slices = model.sparse.slices
        state = self.state
        losses: list[float] = []
        nan_steps = 0
        trainable = {id(s.param): s.param for s in slices}
        for p in trainable.values():
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                for t in range(budget):
                    batch, state = self.batch(state, device)
                    for p in trainable.values():
                        p.grad = None
                    loss = self.loss_fn(model, batch)
                    if not torch.isfinite(loss):
                        nan_steps += 1
                        logger.warning("client %d round %d step %d: non-finite loss, step skipped", self.client_id, round_id, t)
                        continue
                    loss.backward()
                    losses.append(float(loss.detach()))
                    if progress is not None:
                        progress(t + 1, budget, losses[-1])
                    grad = torch.cat([
                        (s.param.grad.reshape(-1) if s.index is None else s.param.grad.reshape(-1).index_select(0, s.index))
                        .detach().float().cpu()
                        for s in slices
                    ])
                    if not all_finite(grad):
                        nan_steps += 1
                        continue
                    with torch.no_grad():
                        if params.weight_decay:
                            values.mul_(1.0 - lr * params.weight_decay)
                        values.add_(grad, alpha=-lr)
                        model.sync_weights()
        finally:
            for p in trainable.values():
                p.grad = None
                p.requires_grad_(False)
        delta = values - start
        uplink = DenseUplink(round_id, self.client_id, self.num_examples, checksum_bytes(mask_checksum),
                             state_digest(start), budget, delta)
        new_state = replace(state, steps_done=state.steps_done + budget, rounds_done=state.rounds_done + 1,
                            nan_steps=state.nan_steps + nan_steps, synced_round=round_id)
        return LocalResult(self.client_id, round_id, uplink.encode(), new_state,
                           values.clone() if keep_final else None,
                           float(np.mean(losses)) if losses else float("nan"), budget, nan_steps, state_digest(values))


def check_downlink(msg: Downlink, params: ProtocolParams, k: int | None = None) -> None:
    """Refuse (`MessageError`) a decoded downlink the client must not train on.

    The codec checks the framing; this checks the content against what the protocol allows: a
    dense state of the mask's size with only finite values; records whose scalars are finite,
    whose q is the federation's, whose learning rates (when echoed) are the federation's for that
    round, whose example counts (FedAvg weights) are >= 1, one record per client per round.
    """
    if msg.kind == KIND_DENSE:
        if k is not None and msg.dense.numel() != k:
            raise MessageError("wrong-size", f"dense state of {msg.dense.numel()} values, the mask has k={k}")
        if not all_finite(msg.dense):
            raise MessageError("non-finite", f"NaN or inf in the dense state of round {msg.round}")
        return
    for rr in msg.history:
        lr = params.schedule(rr.round)
        seen: set[int] = set()
        for rec in rr.records:
            where = f"round {rr.round}, client {rec.client_id}"
            if rec.client_id in seen:
                raise MessageError("duplicate", f"two records of client {rec.client_id} in round {rr.round}")
            seen.add(rec.client_id)
            if rec.num_examples < 1:
                raise MessageError("bad-example-count", f"{where}: {rec.num_examples} examples (FedAvg weight)")
            if rec.q != params.q:
                raise MessageError("wrong-q", f"{where}: q={rec.q}, the federation uses q={params.q}")
            if not all(math.isfinite(g) for g in rec.grads):
                raise MessageError("non-finite", f"{where}: NaN or inf among the projected gradients")
            if not all(math.isfinite(x) for x in rec.lrs):
                raise MessageError("non-finite", f"{where}: NaN or inf learning rate")
            if any(x != lr for x in rec.lrs):
                raise MessageError("wrong-lr", f"{where}: learning rate(s) {sorted(set(rec.lrs))[:3]} != the "
                                   f"federation's {lr:g}")
