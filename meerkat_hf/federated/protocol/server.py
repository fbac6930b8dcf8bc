"""The Meerkat server: validates uplinks, replays virtual paths, aggregates, writes downlinks.

It needs no data and no model: only the initial k-vector (the base model's values at the
masked coordinates), the mask's checksum/fingerprint, optionally g_p (for GradIP) and the
scalars. Every rank of an Accelerate job runs one replica; fed the same uplinks in the same
order, replicas reach the same bits (see `virtual_path` for the arithmetic).

Validation: every uplink is checked (decodable, right type, round, known participant, not a
duplicate, mask checksum, start-state digest, q and number of scalars, finite, magnitude,
learning rates, example count, not a replay of the client's last accepted scalars). A bad one becomes a `Rejection` with a reason, is logged, and
the round goes on with the others; if every uplink is rejected the global state is unchanged.

Bounded influence (the server decides, clients report): the learning rate is the federation's
(an uplink may echo it; any other value is rejected), a client's example count (its FedAvg
weight) may not exceed what the server knows of it (`example_caps`: the partition size it
assigned, or the size declared at enrolment) nor `max_examples`; the replayed update of one
client in one round is bounded in L2 norm, by the smaller of `max_update_median_ratio` x the
round's median replayed update norm (robust aggregation, on by default: the honest clients calibrate
the bound, so one hostile client cannot move the model much further than an honest one does) and
`max_update_ratio` x the norm of the round-0 w_S (an absolute ceiling, the DP sensitivity): a longer
update is scaled down by scaling that client's scalars, identically on every replica and in the
records clients replay (reported in `RoundSummary.clipped`); no client's FedAvg share
exceeds `max_client_weight` (its count is lowered in the records, the excess goes to the others:
`virtual_path.cap_example_counts`, reported in `RoundSummary.weight_capped`); a client whose replayed
path is not finite is rejected, and a round whose new state would not be finite is refused
(the previous state is kept, `RoundSummary.refused` says why).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ...hub.integrity import check_finite
from ...zo.spsa import all_finite
from .codec import (
    KIND_DENSE,
    KIND_RECORDS,
    DenseUplink,
    Downlink,
    MessageError,
    Record,
    RoundRecords,
    Uplink,
    checksum_bytes,
    decode_any_uplink,
    downlink_size,
    fingerprint_bytes,
    state_digest,
)
from .virtual_path import (
    ClientPath,
    FedAvg,
    ProtocolParams,
    add_central_noise,
    aggregate_dense_round,
    aggregate_zo_round,
    cap_example_counts,
    client_steps,
    exact_norm,
    fp32,
    update_bound,
    replay_client,
)

logger = logging.getLogger(__name__)

MODES = ("zo", "dense")
MIN_CLIENTS_FOR_MEDIAN = 3  # the median bound needs an honest majority to exist: 2 clients give none


@dataclass
class ValidationConfig:
    """Bounds beyond which an uplink is rejected as absurd."""

    max_abs_grad: float = 1e4  # an uplink scalar |g| beyond this is refused
    max_abs_delta: float = 1e3  # a dense (fo-fedavg) delta value beyond this is refused
    max_lr: float = 10.0  # a step's learning rate beyond this is refused
    max_examples: int = 2**31 - 1  # the largest example count (FedAvg weight) a client may declare
    # bound on one client's replayed update ||w_c - w||_2 in one round, as a multiple of ||w_S|| at round 0
    # (None: unbounded); a longer update is scaled down to it. 10: far above any honest round (a client moving w_S
    # by 10x its whole pre-trained norm in one round has diverged), far below what |g| <= max_abs_grad allows
    max_update_ratio: float | None = 10.0
    # robust aggregation: one client's replayed update is also bounded by this multiple of the round's median
    # client update norm (the lower median over the round's accepted finite clients, applied from 3 of them: with
    # fewer no majority says what honest is; None: off). The honest clients set the scale, so a hostile one moves
    # the model at most this many honest updates per round; 3 leaves a typical honest ZO update (whose norm follows
    # its few |g| draws) unclipped, but not an honest client holding mostly a rare class under the class-balanced
    # loss, whose update is up to w_rare / w_common larger (3x on the tweets: research/RESULTS.md, "The balanced
    # loss under label skew"). Not applied under central DP, whose sensitivity argument needs a bound that does
    # not depend on the other clients.
    max_update_median_ratio: float | None = 3.0
    # the largest FedAvg share one client may hold in a round (1: no cap); a larger one is lowered to it and the
    # excess shared among the others (water-filling on the example counts the records carry)
    max_client_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_abs_grad", "max_abs_delta", "max_lr", "max_examples", "max_update_ratio",
                     "max_update_median_ratio"):
            v = getattr(self, name)
            if v is None and name in ("max_update_ratio", "max_update_median_ratio"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"validation bound {name} must be a finite number > 0 (got {v!r})")
        if self.max_update_median_ratio is not None and self.max_update_median_ratio < 1:
            raise ValueError(f"validation bound max_update_median_ratio must be >= 1 (below 1 it would shrink the median "
                             f"client's honest update too; null turns it off), got {self.max_update_median_ratio!r}")
        v = self.max_client_weight
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"validation bound max_client_weight must be a finite number in (0, 1] (got {v!r})")
        if not isinstance(self.max_examples, int) or self.max_examples > 2**32 - 1:
            raise ValueError(f"validation bound max_examples must be an integer <= 2**32-1 (got {self.max_examples!r})")


@dataclass
class Rejection:
    """A refused uplink: who sent it (if decodable), why, and its size."""

    round: int
    client_id: int | None
    reason: str
    detail: str
    nbytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RoundSummary:
    round: int
    accepted: list[int]
    rejected: list[Rejection]
    missing: list[int]
    paths: list[ClientPath] = field(default_factory=list)
    nan_steps: dict[int, int] = field(default_factory=dict)
    uplink_bytes: int = 0
    state_digest: bytes = b""
    finals: dict[int, torch.Tensor] = field(default_factory=dict)
    clipped: dict[int, float] = field(default_factory=dict)  # client id -> factor its scalars were scaled by
    refused: str | None = None  # why the round's new state was not committed (the previous one is kept)
    weight_capped: dict[int, tuple[int, int]] = field(default_factory=dict)  # client id -> (claimed, counted) examples


class FederatedServer:
    """Server state: global w_S, round counter, what each client holds, recent round records."""

    def __init__(self, initial_values: torch.Tensor, mask_checksum: str | bytes, fingerprint: str | bytes,
                 params: ProtocolParams, *, num_clients: int, pretrain_grad: torch.Tensor | None = None,
                 validation: ValidationConfig | None = None, mode: str = "zo", max_history_rounds: int = 100_000,
                 keep_client_finals: bool = False, max_catchup_directions: int | None = None):
        if mode not in MODES:
            raise ValueError(f"server mode must be one of {MODES}, got {mode!r}")
        self.values = initial_values.detach().to("cpu", torch.float32).clone()
        self.k = self.values.numel()
        self.checksum = checksum_bytes(mask_checksum)
        self.fingerprint = fingerprint_bytes(fingerprint)
        self.params = params
        self.num_clients = num_clients
        self.mode = mode
        self.validation = validation or ValidationConfig()
        self.max_history_rounds = max_history_rounds
        # a records chain needing more directions than this is sent dense (see downlink_plan)
        self.max_catchup_directions = max_catchup_directions
        self.keep_client_finals = keep_client_finals
        # the most examples each client may claim (FedAvg weight): what the server assigned or was told at enrolment
        self.example_caps: dict[int, int] = {}
        ratio = self.validation.max_update_ratio
        self.max_update_norm = None if ratio is None else update_bound(self.values, ratio)
        self.gp64 = None if pretrain_grad is None else pretrain_grad.detach().double().cpu().numpy()
        if self.gp64 is not None and self.gp64.size != self.k:
            raise ValueError(f"pretrain_grad has {self.gp64.size} values for k={self.k}")
        self.round = 0
        self.digest = state_digest(self.values)
        # Every client holds the base model, hence the round-0 state; None = holds nothing usable.
        self.synced: dict[int, int | None] = {c: 0 for c in range(num_clients)}
        self.history: list[RoundRecords] = []
        # per client: the scalars of its last accepted uplink, so a replay re-stamped with a later round is refused
        self.last_scalars: dict[int, tuple[float, ...]] = {}
        self.budgets: dict[int, int] = {}
        self._accepted: dict[int, Uplink | DenseUplink] = {}
        self._rejected: list[Rejection] = []
        self._uplink_bytes = 0
        self._open = False

    # -- round life cycle ------------------------------------------------------------------
    def begin_round(self, round_id: int, budgets: dict[int, int]) -> None:
        if round_id != self.round:
            raise ValueError(f"server is at round {self.round}, cannot begin round {round_id}")
        for c, b in budgets.items():
            if not 0 <= c < self.num_clients:
                raise ValueError(f"participant {c} is not a client of this federation (0..{self.num_clients - 1})")
            if not 1 <= b <= 0xFFFF:
                raise ValueError(f"local step budget {b} of client {c} is outside 1..65535")
        self.budgets = dict(sorted(budgets.items()))
        self._accepted, self._rejected, self._uplink_bytes, self._open = {}, [], 0, True

    def _reject(self, client_id: int | None, reason: str, detail: str, nbytes: int) -> Rejection:
        rej = Rejection(self.round, client_id, reason, detail, nbytes)
        self._rejected.append(rej)
        who = "unknown sender" if client_id is None else f"client {client_id}"
        logger.warning("round %d: rejected uplink from %s: %s (%s)", self.round, who, reason, detail)
        return rej

    def receive(self, data: bytes, sender: int | None = None) -> Rejection | None:
        """Validate and store one uplink; returns the `Rejection` if refused, else None.

        `sender`: the client the transport knows it got this message from (the slot it called, the
        Flower node bound to that client); a message claiming another client id is refused.
        """
        if not self._open:
            raise RuntimeError("receive() outside a round: call begin_round() first")
        nbytes = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
        self._uplink_bytes += nbytes
        try:
            msg = decode_any_uplink(data)
        except MessageError as err:
            return self._reject(None, err.reason, err.detail, nbytes)
        cid = msg.client_id
        if sender is not None and cid != sender:
            return self._reject(sender, "sender-mismatch", f"client {sender}'s channel carried an uplink signed as "
                                f"client {cid}", nbytes)
        want = DenseUplink if self.mode == "dense" else Uplink
        if not isinstance(msg, want):
            return self._reject(cid, "wrong-message-type", f"this federation expects {want.__name__}", nbytes)
        if msg.round < self.round:
            return self._reject(cid, "stale-round", f"message for round {msg.round}, server is at {self.round}", nbytes)
        if msg.round > self.round:
            return self._reject(cid, "future-round", f"message for round {msg.round}, server is at {self.round}", nbytes)
        if not 0 <= cid < self.num_clients:
            return self._reject(cid, "unknown-client", f"client id {cid} not in 0..{self.num_clients - 1}", nbytes)
        if cid not in self.budgets:
            return self._reject(cid, "not-a-participant", f"client {cid} was not sampled in round {self.round}", nbytes)
        if cid in self._accepted:
            return self._reject(cid, "duplicate", f"client {cid} already reported in round {self.round}", nbytes)
        if msg.mask_checksum != self.checksum:
            return self._reject(cid, "wrong-mask", f"mask checksum {msg.mask_checksum.hex()} != {self.checksum.hex()}", nbytes)
        if msg.state_digest != self.digest:
            return self._reject(cid, "wrong-start-state",
                                f"client trained from state {msg.state_digest.hex()}, round {self.round} is {self.digest.hex()}", nbytes)
        # From here on the client provably holds this round's state.
        self.synced[cid] = self.round
        if not 1 <= msg.num_examples <= self.validation.max_examples:
            return self._reject(cid, "bad-example-count", f"{msg.num_examples} examples", nbytes)
        cap = self.example_caps.get(cid)
        if cap is not None and msg.num_examples > cap:
            return self._reject(cid, "bad-example-count",
                                f"{msg.num_examples} examples, more than the {cap} the server knows client {cid} has", nbytes)
        problem = self._check_dense(msg) if isinstance(msg, DenseUplink) else self._check_scalars(msg)
        if problem is not None:
            return self._reject(cid, problem[0], problem[1], nbytes)
        self._accepted[cid] = msg
        return None

    def _check_scalars(self, msg: Uplink) -> tuple[str, str] | None:
        budget = self.budgets[msg.client_id]
        if msg.q != self.params.q:
            return "wrong-q", f"q={msg.q}, the federation uses q={self.params.q}"
        if len(msg.grads) != budget * msg.q:
            return "wrong-number-of-scalars", f"{len(msg.grads)} scalars, expected T={budget} x q={msg.q}"
        if not all(math.isfinite(g) for g in msg.grads):
            return "non-finite", "NaN or inf among the projected gradients"
        nan_steps = getattr(msg, "nan_steps", 0)
        zeros = sum(1 for g in msg.grads if g == 0.0)
        if not 0 <= nan_steps <= zeros:  # a skipped (NaN/inf) step is sent as g = 0: it cannot claim more
            return "bad-counter", (f"nan_steps={nan_steps}, but only {zeros} of the {len(msg.grads)} scalars are the "
                                   "g = 0 a skipped step sends")
        if any(msg.grads) and self.last_scalars.get(msg.client_id) == tuple(msg.grads):
            # fresh directions every round give fresh scalars: an exact repeat is a replayed message
            return "replayed-scalars", (f"the {len(msg.grads)} scalars repeat client {msg.client_id}'s last accepted "
                                        "uplink bit for bit (a replay re-stamped with this round)")
        worst = max((abs(g) for g in msg.grads), default=0.0)
        if worst > self.validation.max_abs_grad:
            return "absurd-magnitude", f"|g| = {worst:.3g} > max_abs_grad={self.validation.max_abs_grad:g}"
        if msg.lrs and not all(math.isfinite(x) and 0 < x <= self.validation.max_lr for x in msg.lrs):
            return "bad-lr", f"learning rates must be in (0, {self.validation.max_lr:g}]"
        lr = self.params.schedule(self.round)
        if any(x != lr for x in msg.lrs):  # the server's schedule decides; an uplink may only echo it
            return "wrong-lr", f"learning rate(s) {sorted(set(msg.lrs))[:3]} != the federation's {lr:g} for round {self.round}"
        return None

    def _check_dense(self, msg: DenseUplink) -> tuple[str, str] | None:
        if msg.delta.numel() != self.k:
            return "wrong-number-of-scalars", f"{msg.delta.numel()} values, k={self.k}"
        if not all_finite(msg.delta):
            return "non-finite", "NaN or inf in the dense delta"
        worst = float(msg.delta.abs().max()) if self.k else 0.0
        if worst > self.validation.max_abs_delta:
            return "absurd-magnitude", f"|delta| = {worst:.3g} > max_abs_delta={self.validation.max_abs_delta:g}"
        return None

    def finish_round(self) -> RoundSummary:
        """Replay and aggregate every accepted uplink (ascending client id); advance the round."""
        if not self._open:
            raise RuntimeError("finish_round() without begin_round()")
        paths: list[ClientPath] = []
        finals: dict[int, torch.Tensor] = {}
        clipped: dict[int, float] = {}
        refused = None
        if self.mode == "dense":
            norms = {c: exact_norm(self._accepted[c].delta.double()) for c in sorted(self._accepted)}
            bound = self._round_bound(list(norms.values()))
            for c in sorted(self._accepted):
                scale = self._clip_factor(norms[c], bound)
                if scale is not None:
                    u = self._accepted[c]
                    self._accepted[c] = DenseUplink(**{**u.__dict__, "delta": (u.delta.double() * scale).float()})
                    clipped[c] = scale
            accepted = [self._accepted[c] for c in sorted(self._accepted)]
            counted, weight_capped = self._cap_weights(accepted)
            new_values = aggregate_dense_round(self.values, [replace(u, num_examples=counted[u.client_id])
                                                             for u in accepted], self.params, self.round)
        else:
            records, paths, finals, clipped, new_values, weight_capped = self._replay_accepted(sorted(self._accepted))
            accepted = [self._accepted[c] for c in sorted(self._accepted)]
        if accepted and not all_finite(new_values):
            refused = "the aggregated state is not finite"
            for u in accepted:
                self._reject(u.client_id, "round-refused", refused + "; the previous state is kept", 0)
            self._accepted, accepted, paths, finals = {}, [], [], {}
            logger.error("round %d refused: %s; the previous global state is kept", self.round, refused)
        if self.mode != "dense":
            self.history.append(RoundRecords(self.round, tuple(records) if accepted else ()))
            self._prune_history()
        summary = RoundSummary(
            round=self.round,
            accepted=sorted(self._accepted),
            rejected=list(self._rejected),
            missing=[c for c in self.budgets if c not in self._accepted],
            paths=paths,
            nan_steps={u.client_id: getattr(u, "nan_steps", 0) for u in accepted},
            uplink_bytes=self._uplink_bytes,
            finals=finals,
            clipped=clipped if accepted else {},
            refused=refused,
            weight_capped=weight_capped if accepted else {},
        )
        if accepted:
            self.values = new_values
            self.digest = state_digest(self.values)
            for u in accepted:
                if isinstance(u, Uplink):
                    self.last_scalars[u.client_id] = tuple(u.grads)
        self.round += 1
        self._open = False
        summary.state_digest = self.digest
        return summary

    def _cap_weights(self, updates) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
        """The example counts FedAvg uses (`max_client_weight` applied) and the clients whose count was lowered."""
        claimed = {u.client_id: u.num_examples for u in updates}
        counted = cap_example_counts(claimed, self.validation.max_client_weight)
        lowered = {c: (claimed[c], counted[c]) for c in claimed if counted[c] != claimed[c]}
        if lowered:
            logger.warning("round %d: FedAvg weight capped at %g (max_client_weight): %s", self.round,
                           self.validation.max_client_weight,
                           ", ".join(f"client {c} {a} -> {b} examples" for c, (a, b) in lowered.items()))
        return counted, lowered

    def _round_bound(self, norms: list[float]) -> float | None:
        """This round's bound on one client's update norm: the smaller of `max_update_median_ratio` x the
        lower median of the round's update norms and the absolute `max_update_ratio` bound (None: unbounded).

        The lower median (not the mean of the middle two) is one of the honest-side values whenever fewer than
        half the clients are hostile, and the same float on every replica: exact norms, a sort, an index."""
        bound = self.max_update_norm
        ratio = self.validation.max_update_median_ratio
        if ratio is not None and len(norms) >= MIN_CLIENTS_FOR_MEDIAN and not self.params.central_noise:
            median = sorted(norms)[(len(norms) - 1) // 2]
            robust = float(ratio) * median
            bound = robust if bound is None else min(bound, robust)
        return bound

    @staticmethod
    def _clip_factor(norm: float, bound: float | None) -> float | None:
        """The factor bringing an update of this norm down to `bound`; None if within it."""
        if bound is None or not norm > bound:
            return None
        return bound / norm

    def _replay_accepted(self, ids: list[int]):
        """Replay each accepted client's path; reject non-finite ones, scale over-long ones down; FedAvg.

        Returns the records to aggregate (and to send clients: a scaled client's record carries
        its scaled scalars, so a replica or a client replaying it reaches the same bits), the
        paths (digest of the path the client itself computed, GradIP), the finals (only with
        `keep_client_finals`), the factors, and the new global state.

        One pass in the honest case: each path is replayed once for its digest, GradIP and exact update
        norm and streamed into FedAvg, so memory stays a few k-vectors whatever the number of clients. The
        round's bound is a multiple of the median norm, so it is known only after the pass; if a client
        exceeds it (or a non-finite path removed one), the round is aggregated again from the records as
        aggregated (`aggregate_zo_round`: the scaled client's scalars, the survivors' weights). Either way the
        bits are those of `aggregate_zo_round` over the returned records, which replicas and clients compute.
        """
        paths: list[ClientPath] = []
        finals: dict[int, torch.Tensor] = {}
        clipped: dict[int, float] = {}
        work = None if self.keep_client_finals else torch.empty_like(self.values)  # reused replay target
        buffers: list[torch.Tensor] = []  # reused directions
        # FedAvg's counts with max_client_weight applied; the records carry them, so replicas and
        # replaying clients weight exactly as the server does
        counted, weight_capped = self._cap_weights([self._accepted[c] for c in ids])
        avg = FedAvg(self.values, counted)
        streaming = True
        # One pass: replay each path for its digest, GradIP and exact update norm, streaming it into FedAvg
        norms: dict[int, float] = {}
        for c in ids:
            rec = self._accepted[c].record
            final, gips = replay_client(self.values, client_steps(self.params, self.round, c, rec.grads, rec.q, rec.lrs),
                                        self.gp64, out=work, buffers=buffers)
            if not all_finite(final):
                self._accepted.pop(c)
                self._reject(c, "non-finite-path", "the replayed virtual path leaves finite values", 0)
                streaming = False
                continue
            paths.append(ClientPath(c, rec.num_examples, gips, state_digest(final)))
            delta = avg.delta(final)
            norms[c] = exact_norm(delta)
            if self.keep_client_finals:
                finals[c] = final
            if streaming:
                avg.add(c, delta, consume=True)
        # The round's bound needs every norm; a client over it has its scalars scaled (the records carry them)
        bound = self._round_bound(list(norms.values()))
        records: list[Record] = []
        for c in norms:
            rec = self._accepted[c].record
            scale = self._clip_factor(norms[c], bound)
            if scale is not None:
                rec = Record(c, rec.num_examples, rec.q, tuple(fp32(g * scale) for g in rec.grads), rec.lrs)
                clipped[c] = scale
                logger.warning("round %d: client %d's update (norm %.3g) scaled by %.3g to the round's bound %.3g",
                               self.round, c, norms[c], scale, bound)
            records.append(rec)
        if not streaming:  # a client was removed: the caps are over the survivors
            counted, weight_capped = self._cap_weights([self._accepted[c] for c in norms])
        records = [replace(r, num_examples=counted[r.client_id]) for r in records]
        if streaming and not clipped:  # the honest case: one replay per client (user-level DP noise as replicas add it)
            new_values = add_central_noise(avg.result(), self.params, self.round, avg.counts)
        else:  # a scaled client or other weights: FedAvg the records as aggregated (the bits replicas compute)
            new_values, _, scaled_finals = aggregate_zo_round(self.values, records, self.params, self.round,
                                                              keep_final=self.keep_client_finals, with_paths=False)
            if self.keep_client_finals:
                finals.update({c: scaled_finals[c] for c in clipped})
        return records, paths, finals, clipped, new_values, weight_capped

    def _prune_history(self) -> None:
        dense = downlink_size(KIND_DENSE, 0, k=self.k)
        while self.history and (len(self.history) > self.max_history_rounds
                                or downlink_size(KIND_RECORDS, 0, history=tuple(self.history)) > dense):
            self.history.pop(0)

    # -- downlinks ---------------------------------------------------------------------------
    def downlink_plan(self, client_id: int) -> tuple[int, int | None]:
        """(kind, from_round) of the smaller encoding for this client (dense if it holds nothing usable).

        Records are small but the client replays them: one k-value draw per direction of the chain.
        With `max_catchup_directions`, a chain of more directions is sent dense even when it is the
        smaller message (the same state either way; the digest proves it)."""
        s = self.synced.get(client_id)
        if self.mode == "zo" and s is not None:
            first = self.history[0].round if self.history else self.round
            if first <= s <= self.round:
                chain = tuple(self.history[s - first:]) if s < self.round else ()
                n = len(self.budgets)
                cap = self.max_catchup_directions
                if (downlink_size(KIND_RECORDS, n, history=chain) < downlink_size(KIND_DENSE, n, k=self.k)
                        and (cap is None or sum(len(r.grads) for rr in chain for r in rr.records) <= cap)):
                    return KIND_RECORDS, s
        return KIND_DENSE, None

    def downlink_nbytes(self, client_id: int, force_dense: bool = False) -> int:
        kind, s = (KIND_DENSE, None) if force_dense else self.downlink_plan(client_id)
        n = len(self.budgets)
        if kind == KIND_DENSE:
            return downlink_size(KIND_DENSE, n, k=self.k)
        first = self.history[0].round if self.history else self.round
        return downlink_size(KIND_RECORDS, n, history=tuple(self.history[s - first:]) if s < self.round else ())

    def downlink(self, kind: int, from_round: int | None = None) -> bytes:
        budgets = tuple(self.budgets.items())
        if kind == KIND_DENSE:
            msg = Downlink(self.round, KIND_DENSE, self.checksum, self.fingerprint, self.digest, budgets, dense=self.values)
        else:
            first = self.history[0].round if self.history else self.round
            chain = tuple(self.history[from_round - first:]) if from_round < self.round else ()
            msg = Downlink(self.round, KIND_RECORDS, self.checksum, self.fingerprint, self.digest, budgets,
                           from_round=from_round, history=chain)
        return msg.encode()

    def downlink_for(self, client_id: int, force_dense: bool = False) -> bytes:
        """The message that brings `client_id` to this round's global state (smaller encoding)."""
        kind, s = (KIND_DENSE, None) if force_dense else self.downlink_plan(client_id)
        return self.downlink(kind, s)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "values": self.values.clone(),
            "round": self.round,
            "synced": dict(self.synced),
            "example_caps": dict(self.example_caps),
            "last_scalars": {c: list(g) for c, g in self.last_scalars.items()},
            "history": [(rr.round, [(r.client_id, r.num_examples, r.q, list(r.grads), list(r.lrs)) for r in rr.records])
                        for rr in self.history],
        }

    def load_state_dict(self, state: dict, source: str | os.PathLike = "checkpoint") -> None:
        values = state["values"].to(torch.float32)
        if values.numel() != self.k:
            raise ValueError(f"{source} holds {values.numel()} values, this mask has k={self.k}")
        # a hash-consistent checkpoint with NaN values would resume, drop every client and save a NaN delta
        check_finite(values, "the server's global state", source)
        self.values = values.clone()
        self.digest = state_digest(self.values)
        self.round = int(state["round"])
        self.synced = {int(c): (None if s is None else int(s)) for c, s in state["synced"].items()}
        if "example_caps" in state:
            self.example_caps = {int(c): int(n) for c, n in state["example_caps"].items()}
        self.last_scalars = {int(c): tuple(float(x) for x in g) for c, g in state.get("last_scalars", {}).items()}
        self.history = [RoundRecords(r, tuple(Record(c, n, q, tuple(g), tuple(lr)) for c, n, q, g, lr in recs))
                        for r, recs in state["history"]]
        self._open = False


def gradip_stats(gradips: list[float]) -> dict:
    """Summary of one client's GradIP trajectory for the metrics."""
    if not gradips:
        return {}
    arr = np.asarray(gradips, dtype=np.float64)
    return {"n": int(arr.size), "mean": float(arr.mean()), "mean_abs": float(np.abs(arr).mean()),
            "first": float(arr[0]), "last": float(arr[-1]), "std": float(arr.std())}
