"""Federated Meerkat: seed-replay protocol, a round engine, and its transports.

* `protocol/`    the protocol core: codec (wire bytes), virtual_path (seeds, replay, exact
                 FedAvg), client, server, gradip (Meerkat-VP); it imports nothing from the run
* `engine`       the round engine: set-up, resume, round planning, aggregation, the metrics
                 row, checkpoints, final/ with its model card
* `driver`       the in-process transport (`run_federation`), also across Accelerate ranks
                 (`runtime`); `flower/` is the Flower transport (optional extra)
* `assets`       base model, mask (computed or cached), wrapped model and protocol objects from a config
* `config`, `task_data`, `partition`, `checkpoint`, `reporting`: the YAML config, client data and
                 its split, round checkpoints, metrics and plots
"""

from .config import ALGORITHMS, ConfigError, FederationConfig
from .driver import run_federation
from .engine import FederationHooks, FederationResult, RoundEngine, SimulatedCrash, Transport, sample_clients
from .protocol import (
    ClientState,
    DenseUplink,
    Downlink,
    FedAvg,
    FederatedClient,
    FederatedServer,
    GradIPDetector,
    LocalResult,
    LRSchedule,
    MessageError,
    ProtocolParams,
    Record,
    Rejection,
    RoundRecords,
    RoundSummary,
    StepScheduler,
    Uplink,
    ValidationConfig,
    VPConfig,
    aggregate_zo_round,
    decode_any_uplink,
    decode_dense_uplink,
    decode_downlink,
    decode_uplink,
    evaluate_trajectories,
    replay_client,
    state_digest,
    step_seed,
    uplink_size,
)

__all__ = [
    "ALGORITHMS",
    "ClientState",
    "ConfigError",
    "DenseUplink",
    "Downlink",
    "FedAvg",
    "FederatedClient",
    "FederatedServer",
    "FederationConfig",
    "FederationHooks",
    "FederationResult",
    "GradIPDetector",
    "LRSchedule",
    "LocalResult",
    "MessageError",
    "ProtocolParams",
    "Record",
    "Rejection",
    "RoundRecords",
    "RoundEngine",
    "RoundSummary",
    "SimulatedCrash",
    "StepScheduler",
    "Transport",
    "Uplink",
    "VPConfig",
    "ValidationConfig",
    "aggregate_zo_round",
    "decode_any_uplink",
    "decode_dense_uplink",
    "decode_downlink",
    "decode_uplink",
    "evaluate_trajectories",
    "replay_client",
    "sample_clients",
    "run_federation",
    "state_digest",
    "step_seed",
    "uplink_size",
]
