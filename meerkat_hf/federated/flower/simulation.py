"""Run a Meerkat federation in Flower's simulation engine from Python (tests, notebooks).

`flwr run` is the command-line way (see examples/flower); this wraps
`flwr.simulation.run_simulation`, which runs the `ServerApp` in a thread of this process and
the `ClientApp`s in Flower's simulation backend (Ray actors by default), and hands back the
server's `FlowerFederationResult`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from ..federation_config import FederationConfig
from .client_app import fault_injecting_client_app
from .run_config import FlowerOptions
from .server_app import FlowerFederationResult, build_server_app


def default_backend_config(num_cpus_per_client: float = 1.0, num_gpus_per_client: float | None = None,
                           device: str = "auto") -> dict[str, Any]:
    """Ray backend: one CPU per simulated client, the machine's CPUs for Ray, quiet Ray logs.

    Where CUDA is visible and the federation's `device` may use it (auto/cuda), each client gets a GPU share
    (`num_gpus_per_client`, default 0.25: four clients' forwards share one GPU, which inference-level
    memory allows); asking Ray for 0 GPUs would hide the device from the clients altogether."""
    gpus = 0
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    share = 0.0 if gpus == 0 else (0.25 if num_gpus_per_client is None else float(num_gpus_per_client))
    init = {"num_cpus": os.cpu_count() or 1, "logging_level": "ERROR"}
    if gpus:
        init["num_gpus"] = gpus
    return {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": share}, "init_args": init}


def run_flower_simulation(config: FederationConfig, *, num_supernodes: int | None = None,
                          options: FlowerOptions | None = None, backend_name: str = "ray",
                          backend_config: dict[str, Any] | None = None, hooks: Any = None,
                          model=None, tokenizer=None, verbose_logging: bool = False) -> FlowerFederationResult:
    """Simulate `config` with one SuperNode per client (``partition-id`` = Meerkat client id).

    `hooks`: an `engine.FederationHooks` applied on the client side (fault injection), exactly as
    `run_federation` applies it. `model`/`tokenizer`: the server's copy (clients load theirs
    from `config.model`).
    """
    from flwr.simulation import run_simulation

    results: list[FlowerFederationResult] = []
    server_app = build_server_app(config, options=options or FlowerOptions(), model=model, tokenizer=tokenizer,
                                  on_result=results.append)
    client_app = fault_injecting_client_app(config, hooks=hooks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator env-var notice
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=num_supernodes or config.num_clients, backend_name=backend_name,
                       backend_config=backend_config or default_backend_config(device=config.device), verbose_logging=verbose_logging)
    if not results:
        raise RuntimeError("the Flower simulation ended without a result from the ServerApp (see the log above)")
    return results[0]
