"""The protocol objects a federation is made of, built from a `FederationConfig`.

The set-up that decides bits (the lr schedule, the server's initial state and mode, the
scheduler) lives here once, so the in-process driver and the Flower apps construct exactly the
same objects; `tests/test_flower.py` checks the two runs agree bit for bit.
"""

from __future__ import annotations

from .config import FederationConfig
from .server import FederatedServer
from .virtual_path import LRSchedule, ProtocolParams
from .vp import StepScheduler


def protocol_params(config: FederationConfig) -> ProtocolParams:
    return ProtocolParams(config.seed, LRSchedule(config.lr, config.lr_schedule, config.rounds, config.lr_min_ratio),
                          config.q, config.weight_decay)


def build_server(config: FederationConfig, mask, initial_values) -> FederatedServer:
    zo = config.local_optimizer == "zo"
    server = FederatedServer(initial_values, mask.checksum, mask.fingerprint, protocol_params(config),
                             num_clients=config.num_clients, pretrain_grad=mask.pretrain_grad,
                             validation=config.validation, mode="zo" if zo else "dense")
    if config.uses_lora:  # the adapter's initial values are not part of the base model: download them
        server.synced = {c: None for c in range(config.num_clients)}
    return server


def build_scheduler(config: FederationConfig, mask) -> StepScheduler:
    scheduler = StepScheduler(config.scheduler_mode, config.local_steps, config.vp, config.seed)
    if scheduler.needs_gradip and mask.pretrain_grad is None:
        raise ValueError(f"{config.algorithm} needs the mask's pre-training gradient g_p, and this mask has none")
    return scheduler
