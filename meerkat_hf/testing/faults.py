"""Seeded faults for partial participation at scale, and the audit that accounts for every uplink.

Shared by tests/test_partial_participation.py (a short run in the suite) and
research/partial_participation.py (the few-hundred-round run); injected through `FederationHooks`.

`SeededFaults` decides, for each participation (round, client), at most one fault: a dropout
(`before_client` raises), a straggler whose uplink arrives 1-2 rounds late or never
(`delay_uplink`), a duplicated uplink, or a recorded old uplink replayed before this round's
(`tamper_uplink`): the client's own previous one, or, if it has none yet, the newest of another
client. `audit` then checks every metrics row against what was injected
and recomputes every round's global state from the genuine uplinks it recorded, independently of
the server: each accepted uplink is in its round's aggregate exactly once, nothing else is.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..federated.assets import protocol_params
from ..federated.engine import FederationHooks, SimulatedCrash, sample_clients
from ..federated.federation_config import FederationConfig
from ..federated.protocol.codec import decode_uplink, state_digest
from ..federated.protocol.virtual_path import aggregate_zo_round, fp32

__all__ = ["FaultRates", "SeededFaults", "in_flight", "expected_row", "audit"]

DROPOUT, LATE, NEVER, DUPLICATE, REPLAY = "dropout", "late", "never", "duplicate", "replay"
FAULTS = (DROPOUT, LATE, NEVER, DUPLICATE, REPLAY)
DROPOUT_REASON = "ConnectionError: simulated dropout"
MAX_DELAY = 2  # rounds a late straggler's uplink takes at most


@dataclass(frozen=True)
class FaultRates:
    """Probability of each fault per participation (exclusive)."""

    dropout: float = 0.05
    late: float = 0.04  # straggler: its uplink reaches the server 1 or 2 rounds late
    never: float = 0.02  # straggler: its uplink never arrives
    duplicate: float = 0.03  # the uplink arrives twice
    replay: float = 0.03  # a recorded old uplink is sent, then this round's (see `SeededFaults.replayed`)


class SeededFaults:
    """The faults of a run: a pure function of (seed, round, client), so a crashed and resumed run
    meets the very faults of an uninterrupted one.

    It records every genuine uplink (`sent`): the recording replays draw from and the audit
    recomputes the aggregates from. Share one instance between a crashed run and its resumption,
    as a chaos harness keeps its recording; `changed` lists participations whose redone round gave
    other bytes than the first time (determinism: must stay empty).
    """

    def __init__(self, seed: int, rates: FaultRates | None = None):
        self.seed = seed
        self.rates = rates or FaultRates()
        self.sent: dict[tuple[int, int], bytes] = {}
        self.rounds_of: dict[int, list[int]] = {}  # client -> rounds it sent an uplink in, ascending
        self.changed: list[tuple[int, int]] = []

    def fault(self, round_id: int, client_id: int) -> str | None:
        u = np.random.default_rng([self.seed, round_id, client_id]).random()
        edge = 0.0
        for name in FAULTS:
            edge += getattr(self.rates, name)
            if u < edge:
                return name
        return None

    def delay(self, round_id: int, client_id: int) -> int | None:
        """Rounds a straggler's uplink is late (None: never); 0 for everyone else."""
        fault = self.fault(round_id, client_id)
        if fault == NEVER:
            return None
        if fault == LATE:
            return 1 + int(np.random.default_rng([self.seed, round_id, client_id, 1]).integers(MAX_DELAY))
        return 0

    def replayed(self, round_id: int, client_id: int) -> tuple[int, int] | None:
        """(round, sender) of the recorded uplink a replay sends: the client's last one before
        `round_id` (refused as stale), else the newest of any client before `round_id` (refused as
        another client's); None: nothing recorded yet. Only earlier rounds count, so a resumed run
        picks what the uninterrupted one picked."""
        own = [r for r in self.rounds_of.get(client_id, []) if r < round_id]
        if own:
            return own[-1], client_id
        return max((key for key in self.sent if key[0] < round_id), default=None)

    # -- the hooks ---------------------------------------------------------------------------------
    def before_client(self, round_id: int, client_id: int) -> None:
        if self.fault(round_id, client_id) == DROPOUT:
            raise ConnectionError("simulated dropout")

    def tamper_uplink(self, round_id: int, client_id: int, data: bytes) -> list[bytes]:
        key = (round_id, client_id)
        if key not in self.sent:
            self.sent[key] = data
            self.rounds_of.setdefault(client_id, []).append(round_id)
            self.rounds_of[client_id].sort()
        elif self.sent[key] != data:
            self.changed.append(key)
        fault = self.fault(round_id, client_id)
        if fault == DUPLICATE:
            return [data, data]
        old = self.replayed(round_id, client_id) if fault == REPLAY else None
        return [data] if old is None else [self.sent[old], data]

    def hooks(self, crash_after: int | None = None) -> FederationHooks:
        """The run's hooks; `crash_after`: raise `SimulatedCrash` once that round is recorded."""

        def after_round(round_id: int, row: dict) -> None:
            if round_id == crash_after:
                raise SimulatedCrash(f"simulated crash after round {round_id}")

        return FederationHooks(before_client=self.before_client, tamper_uplink=self.tamper_uplink,
                               delay_uplink=self.delay, after_round=after_round)


def in_flight(faults: SeededFaults, rows: list[dict], rounds_done: int) -> list[tuple[int, int]]:
    """Stragglers' uplinks sent before `rounds_done` rounds were done that arrive after: what a
    checkpoint taken then must carry."""
    return [(r, c) for r, row in enumerate(rows[:rounds_done]) for c in row["participants"]
            if faults.fault(r, c) == LATE and r + faults.delay(r, c) >= rounds_done]


def expected_row(faults: SeededFaults, rows: list[dict], r: int) -> dict:
    """What round `r`'s metrics row must say, from the faults alone."""
    participants = rows[r]["participants"]
    fault = {c: faults.fault(r, c) for c in participants}
    rejected = [(c, "stale-round") for rr in range(max(0, r - MAX_DELAY), r) for c in rows[rr]["participants"]
                if faults.delay(rr, c) == r - rr]  # stragglers' uplinks arriving now
    for c in participants:
        if fault[c] == DUPLICATE:
            rejected.append((c, "duplicate"))
        elif fault[c] == REPLAY and (old := faults.replayed(r, c)) is not None:
            rejected.append((c, "stale-round" if old[1] == c else "sender-mismatch"))
    stragglers = {c: faults.delay(r, c) for c in participants if fault[c] in (LATE, NEVER)}
    return {
        "accepted": [c for c in participants if fault[c] not in (DROPOUT, LATE, NEVER)],
        "dropped": {str(c): DROPOUT_REASON for c in participants if fault[c] == DROPOUT},
        "missing": [c for c in participants if fault[c] in (DROPOUT, LATE, NEVER)],
        "late_uplinks": {str(c): d for c, d in stragglers.items()},
        "rejected": sorted(rejected),
    }


def _scaled(record, factor):
    """A record with its scalars scaled as the server scales a clipped client's (fp32(g * factor))."""
    if factor is None:
        return record
    return dataclasses.replace(record, grads=tuple(fp32(g * factor) for g in record.grads))


def audit(faults: SeededFaults, rows: list[dict], config: FederationConfig,
          initial: torch.Tensor) -> tuple[dict, list[str]]:
    """Check every row against the seeded sampling and the injected faults, and recompute every
    round's state from `initial` and the genuine uplinks; returns (counts, problems). No problem
    means: every accepted uplink is its client's genuine uplink of that round and is in that
    round's aggregate exactly once (the recomputed digest matches), every dropout / straggler /
    duplicate / replay is recorded as such and aggregated nowhere, and every uplink byte the server
    counted is an accepted or a refused one."""
    problems: list[str] = []
    counts: Counter = Counter()
    params = protocol_params(config, initial)
    values = initial.detach().to(torch.float32).clone()
    stragglers_so_far: set[int] = set()
    for r, row in enumerate(rows):
        sampled = sample_clients(config.seed, r, config.num_clients, config.client_fraction)
        if row["participants"] != sampled:
            problems.append(f"round {r}: participants {row['participants']} != the seeded sample {sampled}")
        want = expected_row(faults, rows, r)
        got = {key: row[key] for key in ("accepted", "dropped", "missing", "late_uplinks")}
        got["rejected"] = sorted((x["client_id"], x["reason"]) for x in row["rejected"])
        for key in want:
            if got[key] != want[key]:
                problems.append(f"round {r}: {key} {got[key]} != expected {want[key]}")
        for x in row["rejected"]:
            if x["round"] != r:
                problems.append(f"round {r}: a rejection is dated round {x['round']}")
        if row["refused"] or row["weight_capped"] or row["replay_mismatches"]:
            problems.append(f"round {r}: refused/capped/mismatch: {row['refused']} "
                            f"{row['weight_capped']} {row['replay_mismatches']}")
        unknown = sorted(set(row["clipped"]) - {str(c) for c in row["accepted"]})
        if unknown:
            problems.append(f"round {r}: clipped clients {unknown} were not accepted")
        unexplained = sorted(int(c) for c in row["downlink_fallbacks"] if int(c) not in stragglers_so_far)
        if unexplained:
            problems.append(f"round {r}: dense fallbacks of clients that never straggled: {unexplained}")
        accepted = [decode_uplink(faults.sent[(r, c)]) for c in row["accepted"]]
        nbytes = sum(len(faults.sent[(r, c)]) for c in row["accepted"]) + sum(x["nbytes"] for x in row["rejected"])
        if nbytes != row["uplink_bytes"]:
            problems.append(f"round {r}: uplink_bytes {row['uplink_bytes']} != accepted + refused {nbytes}")
        if accepted:  # the robust bound scales an over-long client's scalars; the row says by how much
            records = [_scaled(u.record, row["clipped"].get(str(u.client_id))) for u in accepted]
            values, _, _ = aggregate_zo_round(values, records, params, r, with_paths=False)
        if state_digest(values).hex() != row["state_digest"]:
            problems.append(f"round {r}: recomputed digest {state_digest(values).hex()} != row {row['state_digest']}")
        stragglers_so_far |= {int(c) for c in want["late_uplinks"]}
        fault = Counter(faults.fault(r, c) for c in row["participants"])
        counts.update({"rounds": 1, "participations": len(row["participants"]), "accepted": len(row["accepted"]),
                       "dropped": len(row["dropped"]), "missing": len(row["missing"]),
                       "late": fault[LATE], "never": fault[NEVER], "duplicated": fault[DUPLICATE],
                       "replayed": sum(1 for c in row["participants"] if faults.fault(r, c) == REPLAY
                                       and faults.replayed(r, c) is not None),
                       "fallbacks": len(row["downlink_fallbacks"]), "uplink_bytes": row["uplink_bytes"]})
        counts.update(f"rejected {x['reason']}" for x in row["rejected"])
    counts["late in flight at the end"] = len(in_flight(faults, rows, len(rows)))
    counts["late arrived"] = counts["late"] - counts["late in flight at the end"]
    if faults.changed:
        problems.append(f"redone rounds gave other uplink bytes for {faults.changed}")
    return dict(counts), problems
