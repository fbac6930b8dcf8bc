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
from .engine import FederationHooks, FederationResult, RoundEngine, SimulatedCrash, Transport, sample_clients
from . import protocol
from .protocol import *  # noqa: F403  (the protocol core's API: see protocol/__init__.py)

__all__ = [
    "ALGORITHMS",
    "ConfigError",
    "FederationConfig",
    "FederationHooks",
    "FederationResult",
    "RoundEngine",
    "SimulatedCrash",
    "Transport",
    "run_federation",
    "sample_clients",
    *protocol.__all__,
]
