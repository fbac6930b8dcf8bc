"""The protocol's arithmetic: step seeds, the lr schedule, virtual-path replay and FedAvg.

Server and clients import these same functions, so "replaying the records of a round" on a
client and "aggregating the round" on the server are one computation and give one set of bits.
Everything here runs on the CPU on the fp32 master of w_S (see `zo.py`).

Exact aggregation arithmetic (`fedavg`), chosen so every replica computes the same bits:

* clients in ascending client-id order; weights `n_c / N` as IEEE doubles (Python floats),
  `N = sum(n_c)` an exact integer;
* `d_c = float64(w_c) - float64(w)` (exact: both are fp32), `acc += d_c * (n_c / N)` in
  float64 as two separately rounded elementwise ops (no fused multiply-add);
* `w_new = float32(float64(w) + acc)` (round to nearest).

With one client the new global state is exactly that client's state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from ...zo.spsa import ZOStep, apply_step, derive_seed, gaussian_direction
from .codec import state_digest

LR_SCHEDULES = ("constant", "linear", "cosine")


def fp32(x: float) -> float:
    """Round a Python float to the nearest float32 (what the wire carries)."""
    return float(np.float32(x))


def step_seed(federation_seed: int, round_id: int, client_id: int, step: int, j: int = 0) -> int:
    """Seed of perturbation j of local step `step`: derived, never sent."""
    return derive_seed(federation_seed, round_id, client_id, step, j)


@dataclass(frozen=True)
class LRSchedule:
    """Per-round learning rate known to every node; values are rounded to float32 so a value sent
    on the wire (lr_mode 1/2) and a value computed locally are the same number."""

    lr: float
    kind: str = "constant"
    total_rounds: int = 1
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"lr min_ratio must be in [0, 1], got {self.min_ratio}")

    def __call__(self, round_id: int) -> float:
        if self.kind == "constant" or self.total_rounds <= 1:
            factor = 1.0
        else:
            progress = min(max(round_id / (self.total_rounds - 1), 0.0), 1.0)
            if self.kind == "linear":
                factor = 1.0 - (1.0 - self.min_ratio) * progress
            else:
                factor = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return fp32(self.lr * factor)


@dataclass(frozen=True)
class ProtocolParams:
    """What every node must agree on besides the mask: seeds, q, weight decay, lr schedule."""

    federation_seed: int
    schedule: LRSchedule
    q: int = 1
    weight_decay: float = 0.0
    # user-level DP: the std of the Gaussian noise on each round's aggregate is central_noise * max_c(n_c / N)
    # (central_noise = noise multiplier x the server's per-client update bound S); 0: no central noise
    central_noise: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.central_noise) and self.central_noise >= 0):
            raise ValueError(f"central_noise must be a finite number >= 0, got {self.central_noise!r}")
        if not 1 <= self.q <= 255:
            raise ValueError(f"q (perturbations per step) must be in 1..255, got {self.q}")
        wd = self.weight_decay
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and 0 <= wd and self.schedule.lr * wd < 1):
            raise ValueError(f"weight_decay must be >= 0 with lr * weight_decay < 1 (so 1 - lr*wd stays in (0, 1]), "
                             f"got weight_decay={wd!r}, lr={self.schedule.lr!r}")


_CENTRAL_TAG = 0x43454E54  # "CENT"


def exact_norm(values: torch.Tensor) -> float:
    """||values||_2 in exact-order float64 (numpy's single-threaded pairwise sum, not torch's thread-count
    dependent reduction), so every node derives the same float from the same tensor."""
    v64 = values.detach().to("cpu", torch.float64).numpy()
    return math.sqrt(float(np.add.reduce(v64 * v64)))


def update_bound(values: torch.Tensor, ratio: float) -> float:
    """`ratio` x ||values||_2 (`exact_norm`), so every node derives the same bound, hence the same
    central noise scale, from the round-0 state."""
    return float(ratio) * max(exact_norm(values), 1e-12)


def central_noise_std(params: ProtocolParams, counts: dict[int, int]) -> float:
    """Std of a round's central noise: `central_noise` x the largest FedAvg weight (0 with no client).

    With every client's update bounded by S, replacing one client's update by zero moves the
    weighted average by at most max_c(n_c / N) * S: noise of that scale times the multiplier is
    the Gaussian mechanism of DP-FedAvg (zero-out neighbours).
    """
    if not params.central_noise or not counts:
        return 0.0
    return params.central_noise * (max(counts.values()) / sum(counts.values()))


def add_central_noise(values: torch.Tensor, params: ProtocolParams, round_id: int, counts: dict[int, int]) -> torch.Tensor:
    """The aggregate plus the round's central noise, seeded from (federation seed, round): every server
    replica and every client replaying the round's records adds the very same bits. Whoever knows
    the federation seed (server, clients) knows this noise; it protects the released model only."""
    std = central_noise_std(params, counts)
    if std == 0.0:
        return values
    noise = gaussian_direction(derive_seed(params.federation_seed, round_id, _CENTRAL_TAG), values.numel())
    return values.double().add_(noise.double().mul_(std)).float()


def client_steps(params: ProtocolParams, round_id: int, client_id: int, grads: Sequence[float],
                 q: int, lrs: Sequence[float] | None = None) -> list[ZOStep]:
    """The ZO steps a client took, rebuilt from its scalars (`T*q` of them, step-major)."""
    if len(grads) % q:
        raise ValueError(f"{len(grads)} scalars is not a multiple of q={q}")
    num_steps = len(grads) // q
    if lrs is None or len(lrs) == 0:
        lrs = [params.schedule(round_id)] * num_steps
    elif len(lrs) == 1:
        lrs = list(lrs) * num_steps
    steps = []
    for t in range(num_steps):
        seeds = tuple(step_seed(params.federation_seed, round_id, client_id, t, j) for j in range(q))
        steps.append(ZOStep(seeds, tuple(float(g) for g in grads[t * q:(t + 1) * q]), float(lrs[t]), params.weight_decay))
    return steps


_GRADIP_CHUNK = 1 << 20


def gradip(pretrain_grad64: np.ndarray, z: torch.Tensor, g: float) -> float:
    """GradIP = g * <g_p, z>: exact fp64 products, numpy pairwise sums (single-threaded, so every
    rank computes the same number).

    Above 2^20 values the products are formed and summed chunk by chunk in one reused 8 MB buffer
    (partial sums added in order), not as two full-size float64 temporaries: at full-model k
    those were ~1.7 GB and most of a server's replay step."""
    zn = z.numpy()
    k = zn.size
    if k <= _GRADIP_CHUNK:
        return float(g) * float(np.add.reduce(pretrain_grad64 * zn.astype(np.float64)))
    buf = np.empty(_GRADIP_CHUNK, dtype=np.float64)
    total = 0.0
    for start in range(0, k, _GRADIP_CHUNK):
        n = min(_GRADIP_CHUNK, k - start)
        part = buf[:n]
        part[...] = zn[start:start + n]
        np.multiply(pretrain_grad64[start:start + n], part, out=part)
        total += float(np.add.reduce(part))
    return float(g) * total


def replay_client(values: torch.Tensor, steps: Iterable[ZOStep], pretrain_grad64: np.ndarray | None = None, *,
                  out: torch.Tensor | None = None,
                  buffers: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Replay one client's virtual path from `values` (not modified).

    Returns the client's final w_S (bit-identical to what the client computed) and, when the
    masked pre-training gradient is given, GradIP per step (mean over the q perturbations).

    `out` (fp32, k values) receives the path instead of a fresh copy of `values`, and `buffers`
    (a list the caller keeps, grown to q) holds the directions: a caller replaying many clients
    passes the same ones each time, so no k-vector is allocated per client or per step (at
    full-model k each fresh one is ~0.5 GB of page faults, as costly as drawing it).
    """
    out = values.clone() if out is None else out.copy_(values)
    k = out.numel()
    gradips: list[float] = []
    buffers = [] if buffers is None else buffers
    for step in steps:
        while len(buffers) < len(step.seeds):
            buffers.append(torch.empty(k, dtype=torch.float32))
        zs = [gaussian_direction(seed, k, out=buf) for seed, buf in zip(step.seeds, buffers)]
        if pretrain_grad64 is not None:
            gradips.append(sum(gradip(pretrain_grad64, z, g) for z, g in zip(zs, step.grads)) / len(zs))
        apply_step(out, step, directions=zs)
    return out, gradips


def cap_example_counts(counts: dict[int, int], cap: float) -> dict[int, int]:
    """Example counts (FedAvg weights) with no client's share above `cap`, by water-filling.

    Why counts and not float weights: the server writes the capped counts into the records it
    aggregates and sends, so a replica or a client replaying them runs the unchanged FedAvg
    arithmetic and reaches the same bits. Exact rational arithmetic (no float rounding to differ
    between machines): clients whose count exceeds the level x = cap * S_U / (1 - m * cap)
    (S_U: the others' total, m: clients already capped) are capped to floor(x), largest first,
    until no other client is above the level; the others keep their counts, so the excess goes to
    them in proportion. floor(x) >= 1 whenever the cap can be met (len(counts) * cap > 1), and
    every share is then <= cap exactly (n / N <= cap as rationals, so also as a rounded double).
    With too few clients to meet the cap (len(counts) * cap <= 1) every client gets the smallest
    count: equal weights, the nearest to the cap. `cap >= 1` returns the counts unchanged.
    """
    if cap >= 1 or len(counts) <= 1:
        return dict(counts)
    if any(n < 1 for n in counts.values()):
        raise ValueError("every aggregated client needs a positive example count")
    if len(counts) * Fraction(cap) <= 1:
        low = min(counts.values())
        return {c: low for c in counts}
    limit = Fraction(cap)
    order = sorted(counts, key=lambda c: (-counts[c], c))  # largest first (ties: by id, so every node agrees)
    capped, rest = 0, sum(counts.values())  # rest: the total of the clients not capped yet
    while capped < len(order) - 1 and counts[order[capped]] > limit * rest / (1 - capped * limit):
        rest -= counts[order[capped]]
        capped += 1
    if capped == 0:
        return dict(counts)
    level = math.floor(limit * rest / (1 - capped * limit))
    over = set(order[:capped])
    return {c: (level if c in over else n) for c, n in counts.items()}


class FedAvg:
    """Streaming example-weighted FedAvg with the exact arithmetic in the module docstring."""

    def __init__(self, values: torch.Tensor, counts: dict[int, int]):
        if any(n <= 0 for n in counts.values()):
            raise ValueError("every aggregated client needs a positive example count")
        self.base = values
        self.base64 = values.double()
        self.total = sum(counts.values())
        self.counts = counts
        self.acc = torch.zeros_like(self.base64)
        self._scratch: torch.Tensor | None = None
        self._last = -1

    def add(self, client_id: int, delta64: torch.Tensor, *, consume: bool = False) -> None:
        """Add one client's float64 delta; clients must come in ascending id order.

        `consume=True` lets the weighting overwrite `delta64` (same bits, one k-vector less)."""
        if client_id <= self._last:
            raise ValueError("FedAvg needs clients in ascending client-id order")
        self._last = client_id
        weight = self.counts[client_id] / self.total
        self.acc.add_(delta64.mul_(weight) if consume else delta64.mul(weight))

    def delta(self, client_values: torch.Tensor) -> torch.Tensor:
        """float64(w_c) - float64(w): exact, the quantity FedAvg weights and the norm bound measures.

        Written into one reused float64 buffer, valid until the next call (a fresh one per client
        was, at full-model k, a 1 GB allocation and its page faults: ~half of adding a client)."""
        if self._scratch is None:
            self._scratch = torch.empty_like(self.base64)
        return self._scratch.copy_(client_values).sub_(self.base64)

    def add_state(self, client_id: int, client_values: torch.Tensor) -> None:
        self.add(client_id, self.delta(client_values), consume=True)

    def result(self) -> torch.Tensor:
        if not self.counts:
            return self.base.clone()
        return self.base64.add(self.acc).float()


@dataclass
class ClientPath:
    """A replayed client: its final state's digest and its GradIP trajectory."""

    client_id: int
    num_examples: int
    gradips: list[float]
    final_digest: bytes


def aggregate_zo_round(values: torch.Tensor, updates: Sequence, params: ProtocolParams, round_id: int,
                       pretrain_grad64: np.ndarray | None = None, keep_final: bool = False,
                       with_paths: bool = True) -> tuple[torch.Tensor, list[ClientPath], dict[int, torch.Tensor]]:
    """One round of Meerkat: replay each accepted update's virtual path, FedAvg the endpoints.

    `updates` are objects with `client_id`, `num_examples`, `grads`, `q`, `lrs` (uplinks or
    downlink records). Used by the server to aggregate and by clients to apply a records downlink
    (`with_paths=False`: a catching-up client needs neither per-client digests nor GradIP).
    """
    ordered = sorted(updates, key=lambda u: u.client_id)
    avg = FedAvg(values, {u.client_id: u.num_examples for u in ordered})
    paths: list[ClientPath] = []
    finals: dict[int, torch.Tensor] = {}
    work = None if keep_final else torch.empty_like(values)  # one replay target for every client
    buffers: list[torch.Tensor] = []
    for u in ordered:
        steps = client_steps(params, round_id, u.client_id, u.grads, u.q, u.lrs)
        final, gips = replay_client(values, steps, pretrain_grad64, out=work, buffers=buffers)
        if with_paths:
            paths.append(ClientPath(u.client_id, u.num_examples, gips, state_digest(final)))
        if keep_final:
            finals[u.client_id] = final
        avg.add_state(u.client_id, final)
    return add_central_noise(avg.result(), params, round_id, avg.counts), paths, finals


def fedavg_finals(values: torch.Tensor, records: Sequence, finals: dict[int, torch.Tensor],
                  params: ProtocolParams | None = None, round_id: int = 0) -> torch.Tensor:
    """FedAvg of replayed client states: the same arithmetic as `aggregate_zo_round` (the server
    replays each client itself to check and bound it, then aggregates here), central noise included."""
    ordered = sorted(records, key=lambda u: u.client_id)
    avg = FedAvg(values, {u.client_id: u.num_examples for u in ordered})
    for u in ordered:
        avg.add_state(u.client_id, finals[u.client_id])
    return avg.result() if params is None else add_central_noise(avg.result(), params, round_id, avg.counts)


def aggregate_dense_round(values: torch.Tensor, updates: Sequence, params: ProtocolParams | None = None,
                          round_id: int = 0) -> torch.Tensor:
    """First-order FedAvg baseline: the uplinks carry dense fp32 deltas."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    avg = FedAvg(values, {u.client_id: u.num_examples for u in ordered})
    for u in ordered:
        avg.add(u.client_id, u.delta.double())
    return avg.result() if params is None else add_central_noise(avg.result(), params, round_id, avg.counts)
