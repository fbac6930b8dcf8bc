"""Federated Meerkat: seed-replay protocol, a round engine, and its transports.

* `protocol/`    the protocol core: codec (wire bytes), virtual_path (seeds, replay, exact
                 FedAvg), client, server, gradip (Meerkat-VP); it imports nothing from the run
* `engine`       the round engine: set-up, resume, round planning, aggregation, the metrics
                 row, checkpoints, final/ with its model card
* `driver`       the in-process transport (`run_federation`), also across Accelerate ranks
                 (`runtime`); `flower/` is the Flower transport (optional extra)
* `assets`       base model, mask (computed or cached), wrapped model and protocol objects from a config
* `federation_config`, `task_data`, `partition`, `checkpoint`, `reporting`: the YAML config, client data and
                 its split, round checkpoints, metrics and plots
"""

from .federation_config import ALGORITHMS, ConfigError, FederationConfig
from .driver import run_federation
from .engine import FederationHooks, FederationResult, RoundEngine, Transport, sample_clients
from . import protocol
from .protocol import (  # the protocol core's public API (protocol/__init__.py); fault-injection types stay in engine
    FederatedClient,
    FederatedServer,
    GradIPDetector,
    LRSchedule,
    MessageError,
    ProtocolParams,
    Rejection,
    RoundSummary,
    StepScheduler,
    Uplink,
    ValidationConfig,
    VPConfig,
    aggregate_zo_round,
    decode_downlink,
    decode_uplink,
    evaluate_trajectories,
    replay_client,
    state_digest,
)

__all__ = [
    "ALGORITHMS",
    "ConfigError",
    "FederatedClient",
    "FederatedServer",
    "FederationConfig",
    "FederationHooks",
    "FederationResult",
    "GradIPDetector",
    "LRSchedule",
    "MessageError",
    "ProtocolParams",
    "Rejection",
    "RoundEngine",
    "RoundSummary",
    "StepScheduler",
    "Transport",
    "Uplink",
    "VPConfig",
    "ValidationConfig",
    "aggregate_zo_round",
    "decode_downlink",
    "decode_uplink",
    "evaluate_trajectories",
    "protocol",
    "replay_client",
    "run_federation",
    "sample_clients",
    "state_digest",
]
