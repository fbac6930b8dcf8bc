"""Meerkat on Flower: a `ServerApp` and a `ClientApp` over the same server/client/codec objects.

Needs the optional extra: ``pip install "meerkat-hf[flower]"``.

* `build_server_app` / `MeerkatFlowerServer`: seeds, replay, FedAvg, Meerkat-VP, checkpoints
  (`server_app`); `build_client_app`: local ZO steps with `FederatedClient` (`client_app`);
* `messages`: how codec bytes ride in Flower records, and their serialized size;
* `run_config`: ``[tool.flwr.app.config]`` / node config -> `FederationConfig`;
* `run_flower_simulation`: Flower's simulation engine from Python (tests, notebooks).

A ready-made Flower app project is in ``examples/flower``.
"""

from .client_app import build_client_app, load_client
from .run_config import FlowerOptions, federation_config_from_run_config, options_from_run_config
from .server_app import FlowerFederationResult, MeerkatFlowerServer, build_server_app
from .simulation import default_backend_config, run_flower_simulation

__all__ = [
    "FlowerFederationResult",
    "FlowerOptions",
    "MeerkatFlowerServer",
    "build_client_app",
    "build_server_app",
    "load_client",
    "default_backend_config",
    "federation_config_from_run_config",
    "options_from_run_config",
    "run_flower_simulation",
]
