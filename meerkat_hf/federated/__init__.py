"""Federated Meerkat: seed-replay protocol, round driver (single process or Accelerate), Meerkat-VP.

* `codec`        wire messages as bytes (uplink: T float32 scalars + 48-byte header)
* `virtual_path` the shared arithmetic: step seeds, lr schedule, replay, exact FedAvg
* `client`       local ZO (or first-order baseline) steps with a persistent data pointer
* `server`       validation, virtual-path replay, aggregation, downlink choice
* `vp`           GradIP detector and local-step scheduler (Meerkat-VP, random early stop)
* `partition`    IID / Dirichlet / shard / single-label client splits
* `config`, `driver`, `runtime`, `checkpoint`, `reporting`, `task_data`: the simulation around them
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
    "RoundSummary",
    "StepScheduler",
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
    "run_federation",
    "state_digest",
    "step_seed",
    "uplink_size",
]


def __getattr__(name):  # the driver pulls in transformers/datasets: import it lazily
    if name in ("run_federation", "FederationHooks", "FederationResult", "SimulatedCrash", "sample_clients"):
        from . import driver

        return getattr(driver, name)
    raise AttributeError(name)
