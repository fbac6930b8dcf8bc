"""The `ServerApp`: seeds, virtual-path replay, FedAvg, Meerkat-VP, round checkpoints.

All logic lives in `meerkat_hf.federated.flower`; the federation is read from the run config
(`[tool.flwr.app.config]` in pyproject.toml, `config-file`, `flwr run --run-config`).
"""

import logging
from pathlib import Path

from meerkat_hf.federated.flower import build_server_app

_log = logging.getLogger("meerkat_hf")
if not _log.handlers:  # Flower streams the app's output: show Meerkat's round summaries
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s meerkat: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)

app = build_server_app(app_dir=Path(__file__).resolve().parent.parent)
