"""Meerkat-VP: watch GradIP on the virtual paths, flag extreme Non-IID clients, early-stop them.

Why it works without data: the server replays every client's path from seeds and scalars, so
for each local step it can compute GradIP_t = g_t * <g_p, z_t> (g_p = masked pre-training
gradient shipped with the mask). Its expectation is <grad f_client, g_p>. A client holding a
single label quickly fits it, its projected gradients shrink and GradIP decays toward 0; a
balanced client keeps a gradient and its GradIP keeps oscillating. Flagged clients take one
local step per round (their data pointer still advances, so all their data is still seen).

Decision rule (all thresholds configurable, reported in the metrics): each client is judged
on its first `calibration_participations` accepted rounds, run with `calibration_local_steps`.
Within each of those rounds, `early` = the first ceil(early_fraction*T) steps and `late` = the
last ceil(late_fraction*T) steps, pooled over the calibration rounds;

* ratio = mean|GradIP| over late / mean|GradIP| over early,
* quiet = fraction of late steps with |GradIP| < tau, tau = `quiet_tau` if set, else
  `quiet_rel_tau` * mean|GradIP| over early,

and the client is flagged when `rule` holds: "any" (ratio < ratio_threshold or quiet >=
quiet_fraction), "all" (both), "ratio" or "quiet" (that one only).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ...zo.spsa import derive_seed

logger = logging.getLogger(__name__)

RULES = ("any", "all", "ratio", "quiet")
SCHEDULES = ("none", "vp", "random")
_RANDOM_TAG = 0x52414E44  # "RAND": keeps the control's draws apart from every other seed


@dataclass
class VPConfig:
    """Thresholds of the GradIP detector and the early-stopping budget."""

    calibration_participations: int = 1  # a client is judged on its first this many accepted rounds
    calibration_local_steps: int | None = None  # None: the federation's local_steps
    early_fraction: float = 0.3  # the first ceil(early_fraction * T) steps of a judged round are "early"
    late_fraction: float = 0.3  # the last ceil(late_fraction * T) steps are "late"
    ratio_threshold: float = 0.2  # flag when mean |GradIP| late / early falls below this
    quiet_tau: float | None = None  # absolute |GradIP| under which a late step is quiet (null: quiet_rel_tau x early mean)
    quiet_rel_tau: float = 0.1  # quiet threshold relative to the early mean |GradIP|
    quiet_fraction: float = 0.75  # flag when at least this share of late steps is quiet
    rule: str = "any"  # any (ratio or quiet), all (both), ratio, quiet
    min_steps: int = 4  # a client with fewer judged steps is not judged
    limited_steps: int = 1  # local steps per round of a flagged client
    random_count: int | None = None  # random-early-stop: fixed count instead of mirroring VP

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"vp.rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name in ("early_fraction", "late_fraction", "quiet_fraction"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"vp.{name} must be in (0, 1], got {v}")
        if self.calibration_participations < 1:
            raise ValueError("vp.calibration_participations must be >= 1")
        if self.limited_steps < 1:
            raise ValueError("vp.limited_steps must be >= 1")
        if self.min_steps < 1:
            raise ValueError(f"vp.min_steps must be >= 1, got {self.min_steps}")
        if self.random_count is not None and self.random_count < 0:
            raise ValueError(f"vp.random_count must be >= 0 or null, got {self.random_count}")
        if self.ratio_threshold < 0 or self.quiet_rel_tau < 0 or (self.quiet_tau is not None and self.quiet_tau < 0):
            raise ValueError("vp thresholds must be >= 0")
        if self.calibration_local_steps is not None and self.calibration_local_steps < 2:
            raise ValueError("vp.calibration_local_steps must be >= 2 (early and late windows)")


@dataclass
class Decision:
    """The detector's verdict on one client, with the numbers behind it."""

    client_id: int
    flagged: bool
    ratio: float
    quiet: float
    tau: float
    early_mean_abs: float
    late_mean_abs: float
    num_steps: int
    round: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_trajectories(trajectories: list[list[float]], config: VPConfig, client_id: int = -1, round_id: int = -1) -> Decision:
    """Apply the decision rule to a client's per-round GradIP trajectories."""
    early: list[float] = []
    late: list[float] = []
    for traj in trajectories:
        n = len(traj)
        if n == 0:
            continue
        ne = max(1, math.ceil(config.early_fraction * n))
        nl = max(1, math.ceil(config.late_fraction * n))
        early += [abs(x) for x in traj[:ne]]
        late += [abs(x) for x in traj[n - nl:]]
    total = sum(len(t) for t in trajectories)
    e = float(np.mean(early)) if early else 0.0
    l_ = float(np.mean(late)) if late else 0.0
    tau = config.quiet_tau if config.quiet_tau is not None else config.quiet_rel_tau * e
    if e == 0.0:  # no signal at all (e.g. the mask does not touch the loss): nothing to judge
        return Decision(client_id, False, math.nan, 0.0, float(tau), e, l_, total, round_id,
                        "GradIP is exactly 0 in the early window (no signal): not judged")
    ratio = l_ / e
    quiet = float(np.mean([x < tau for x in late])) if late else 0.0
    by_ratio = ratio < config.ratio_threshold
    by_quiet = quiet >= config.quiet_fraction
    flagged = {"any": by_ratio or by_quiet, "all": by_ratio and by_quiet, "ratio": by_ratio, "quiet": by_quiet}[config.rule]
    reason = (
        f"late/early |GradIP| = {ratio:.3g} ({'<' if by_ratio else '>='} {config.ratio_threshold}), "
        f"quiet {quiet:.2f} of late steps below tau={tau:.3g} ({'>=' if by_quiet else '<'} {config.quiet_fraction}); "
        f"rule {config.rule!r} -> {'extreme Non-IID' if flagged else 'balanced'}"
    )
    return Decision(client_id, bool(flagged), float(ratio), quiet, float(tau), e, l_, total, round_id, reason)


@dataclass
class GradIPDetector:
    """Collects each client's calibration trajectories and decides once the window is complete."""

    config: VPConfig
    trajectories: dict[int, list[list[float]]] = field(default_factory=dict)
    decisions: dict[int, Decision] = field(default_factory=dict)

    def in_calibration(self, client_id: int) -> bool:
        return client_id not in self.decisions

    def observe(self, round_id: int, client_id: int, gradips: list[float]) -> Decision | None:
        """Record one accepted round of a client; returns a decision when its window completes."""
        if client_id in self.decisions:
            return None
        trajs = self.trajectories.setdefault(client_id, [])
        trajs.append([float(x) for x in gradips])
        if len(trajs) < self.config.calibration_participations:
            return None
        if sum(len(t) for t in trajs) < self.config.min_steps:
            # Too few steps to judge (e.g. T=1): not flagged, but say so.
            d = evaluate_trajectories(trajs, self.config, client_id, round_id)
            d.flagged, d.reason = False, f"only {d.num_steps} steps < vp.min_steps={self.config.min_steps}: not judged"
        else:
            d = evaluate_trajectories(trajs, self.config, client_id, round_id)
        self.decisions[client_id] = d
        logger.info("Meerkat-VP round %d client %d: %s", round_id, client_id, d.reason)
        return d

    def state_dict(self) -> dict:
        return {"trajectories": {str(k): v for k, v in self.trajectories.items()},
                "decisions": {str(k): d.to_dict() for k, d in self.decisions.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.trajectories = {int(k): v for k, v in state["trajectories"].items()}
        self.decisions = {int(k): Decision(**d) for k, d in state["decisions"].items()}


@dataclass
class StepScheduler:
    """Local step budgets per round: `none` (everyone T), `vp` (flagged -> limited_steps) or
    `random` (the paper's control: as many clients as VP flags, chosen at random, get the limit)."""

    mode: str
    local_steps: int
    config: VPConfig = field(default_factory=VPConfig)
    seed: int = 0
    limited: set[int] = field(default_factory=set)
    detector: GradIPDetector | None = None

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULES:
            raise ValueError(f"scheduler mode must be one of {', '.join(SCHEDULES)}, got {self.mode!r}")
        if self.detector is None and self.mode != "none":
            self.detector = GradIPDetector(self.config)

    @property
    def needs_gradip(self) -> bool:
        return self.mode == "vp" or (self.mode == "random" and self.config.random_count is None)

    def budget(self, client_id: int) -> int:
        if client_id in self.limited:
            return self.config.limited_steps
        if self.detector is not None and self.detector.in_calibration(client_id) and self.config.calibration_local_steps:
            return self.config.calibration_local_steps
        return self.local_steps

    def budgets(self, participants: list[int]) -> dict[int, int]:
        return {c: self.budget(c) for c in participants}

    def start(self, num_clients: int) -> list[int]:
        """Random control with a fixed count: choose its clients once, before round 0."""
        if self.mode == "random" and self.config.random_count is not None:
            rng = np.random.default_rng(derive_seed(self.seed, _RANDOM_TAG))
            count = min(self.config.random_count, num_clients)
            self.limited = set(int(c) for c in rng.choice(num_clients, size=count, replace=False))
            logger.info("random early stop: clients %s limited to %d step(s)", sorted(self.limited), self.config.limited_steps)
        return sorted(self.limited)

    def observe_round(self, round_id: int, gradips: dict[int, list[float]]) -> dict:
        """Feed the round's replayed GradIPs (accepted clients); returns what was decided."""
        if self.mode == "none" or self.detector is None or not self.needs_gradip:
            return {"decided": [], "newly_limited": []}
        decided: list[Decision] = []
        for cid in sorted(gradips):
            d = self.detector.observe(round_id, cid, gradips[cid])
            if d is not None:
                decided.append(d)
        newly: list[int] = []
        if self.mode == "vp":
            newly = [d.client_id for d in decided if d.flagged]
        elif decided:
            count = sum(d.flagged for d in decided)
            pool = [d.client_id for d in decided]
            rng = np.random.default_rng(derive_seed(self.seed, _RANDOM_TAG, round_id))
            newly = sorted(int(c) for c in rng.choice(pool, size=count, replace=False)) if count else []
        self.limited.update(newly)
        if newly:
            logger.info("round %d: clients %s limited to %d local step(s) (%s)", round_id, newly,
                        self.config.limited_steps, self.mode)
        return {"decided": [d.to_dict() for d in decided], "newly_limited": newly}

    def state_dict(self) -> dict:
        return {"limited": sorted(self.limited), "detector": self.detector.state_dict() if self.detector else None}

    def load_state_dict(self, state: dict) -> None:
        self.limited = set(state["limited"])
        if self.detector is not None and state.get("detector") is not None:
            self.detector.load_state_dict(state["detector"])
