"""The protocol core: what a Meerkat server and its clients compute, exchange and check.

* `codec`        wire messages as bytes (uplink: T float32 scalars + a small header; downlinks)
* `virtual_path` the shared arithmetic: step seeds, lr schedule, replay, exact FedAvg
* `client`       local ZO (or first-order baseline) steps with a persistent data pointer
* `server`       validation, virtual-path replay, aggregation, downlink choice
* `gradip`       Meerkat-VP: the GradIP detector and the local-step scheduler

Nothing here knows about configs, data sets, files or transports (`federated/` around it).
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
from .gradip import GradIPDetector, StepScheduler, VPConfig, evaluate_trajectories
from .server import FederatedServer, Rejection, RoundSummary, ValidationConfig
from .virtual_path import FedAvg, LRSchedule, ProtocolParams, aggregate_zo_round, replay_client, step_seed

__all__ = [
    "ClientState",
    "DenseUplink",
    "Downlink",
    "FedAvg",
    "FederatedClient",
    "FederatedServer",
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
    "state_digest",
    "step_seed",
    "uplink_size",
]
