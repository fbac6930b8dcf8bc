"""Federated Meerkat: seed-replay protocol, round driver (single process or Accelerate), Meerkat-VP.

* `codec`        wire messages as bytes (uplink: T float32 scalars + 48-byte header)
* `virtual_path` the shared arithmetic: step seeds, lr schedule, replay, exact FedAvg
* `client`       local ZO (or first-order baseline) steps with a persistent data pointer
* `server`       validation, virtual-path replay, aggregation, downlink choice
* `vp`           GradIP detector and local-step scheduler (Meerkat-VP, random early stop)
* `partition`    IID / Dirichlet / shard / single-label client splits
* `protocol`     the protocol objects (server, scheduler, lr schedule) built from a config

The run around them:

* `engine`       the round engine: set-up, resume, round planning, aggregation, the metrics
                 row, checkpoints, final/ with its model card; transports only move messages
* `driver`       the in-process transport (`run_federation`), also across Accelerate ranks
  (`runtime`); `flower/` is the Flower transport (optional extra)
* `assets`       base model, mask (computed or cached), wrapped model from a config
* `config`, `task_data`, `checkpoint`, `reporting`: YAML config, client data, round
  checkpoints, metrics/plots
"""

from .client import ClientState, FederatedClient, LocalResult
from .codec import (
    DenseUplink,
    Downlink,
    MessageError,
    Record,
    RoundRecords,
    Uplink,
    decode_any_uplink,
    decode_dense_uplink,
    decode_downlink,
    decode_uplink,
    state_digest,
    uplink_size,
)
from .config import ALGORITHMS, ConfigError, FederationConfig
from .driver import run_federation
from .engine import FederationHooks, FederationResult, RoundEngine, SimulatedCrash, Transport, sample_clients
from .server import FederatedServer, Rejection, RoundSummary, ValidationConfig
from .virtual_path import FedAvg, LRSchedule, ProtocolParams, aggregate_zo_round, replay_client, step_seed
from .vp import GradIPDetector, StepScheduler, VPConfig, evaluate_trajectories

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
