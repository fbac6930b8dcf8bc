"""Where the round's clients run: this process, or the ranks of an `accelerate launch` job.

Every rank holds its own model copy and a full server replica. Ranks split the round's
clients (`Accelerator.split_between_processes`), run theirs one after another, exchange the
uplink *bytes* with `gather_object`, and each replays the same aggregate: no weights are
broadcast, only the few bytes the protocol sends anyway.
"""

from __future__ import annotations

import os
from typing import Any

import torch


class LocalRuntime:
    """Single process: everything runs here."""

    num_processes = 1
    process_index = 0
    is_main = True

    def __init__(self, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def split(self, items: list) -> list:
        return list(items)

    def gather(self, items: list) -> list:
        return list(items)

    def barrier(self) -> None:
        pass


class AccelerateRuntime(LocalRuntime):
    """Ranks of an Accelerate job (CPU processes, or one GPU each)."""

    def __init__(self, accelerator: Any = None, cpu: bool = False):
        from accelerate import Accelerator  # lazy: ~0.2 s to import, needed only under accelerate launch

        self.accelerator = accelerator or Accelerator(cpu=cpu)
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device

    def split(self, items: list) -> list:
        with self.accelerator.split_between_processes(list(items)) as mine:
            return list(mine)

    def gather(self, items: list) -> list:
        from accelerate.utils import gather_object  # lazy: see __init__

        if self.num_processes == 1:
            return list(items)
        return list(gather_object(list(items)))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def launched_distributed() -> bool:
    """True inside `accelerate launch` / `torch.distributed.run` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_runtime(device: str = "auto") -> LocalRuntime:
    if launched_distributed():
        return AccelerateRuntime(cpu=device == "cpu")
    return LocalRuntime(device)
