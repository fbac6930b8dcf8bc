"""Progress inside a round: which client is training, its step and loss, and the run's ETA.

`RoundProgress` is a tqdm bar over the local steps this process runs in a round
(`round 2/4 | client 3/10 (id 7)`, postfix `step 1/2, loss 0.693`); `eta_seconds` estimates the
time left from the measured seconds per local step and per evaluation. Both are silent when the
config says `progress: false`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tqdm.auto import tqdm

StepCallback = Callable[[int, int, float], None]  # (step done, steps, loss of that step)


class RoundProgress:
    def __init__(self, enabled: bool, round_done: int, rounds: int, budgets: dict[int, int], clients: list[int]):
        self.enabled = enabled
        self.round_label = f"round {round_done}/{rounds}"
        self.clients = clients
        self.bar = tqdm(total=sum(budgets[c] for c in clients), desc=self.round_label, unit="step", leave=False,
                        disable=not enabled, dynamic_ncols=True)

    def client(self, index: int, cid: int) -> StepCallback | None:
        """The step callback of the `index`-th client this process runs (None when silent)."""
        if not self.enabled:
            return None
        self.bar.set_description(f"{self.round_label} | client {index + 1}/{len(self.clients)} (id {cid})")

        def step(t: int, steps: int, loss: float) -> None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"step {t}/{steps}, loss {loss:.4f}" if math.isfinite(loss)
                                     else f"step {t}/{steps}, loss non-finite")

        return step

    def close(self) -> None:
        self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


def eta_seconds(seconds_per_step: float, future_steps: list[int], evals_left: int, seconds_per_eval: float) -> float:
    """Local steps still planned (one entry per round left) at the measured rate, plus the evaluations left."""
    return seconds_per_step * sum(future_steps) + evals_left * seconds_per_eval
