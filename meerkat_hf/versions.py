"""The exact versions behind a run's numbers (run_info.json, the model card, `meerkat-hf --version`)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

# distribution names; flwr only where installed
DISTRIBUTIONS = ("torch", "transformers", "datasets", "huggingface-hub", "peft", "accelerate", "safetensors", "numpy",
                 "flwr")


def library_versions() -> dict[str, str]:
    """{"python": ..., "meerkat-hf": ..., "torch": ..., ...}: the installed versions (missing ones left out)."""
    from . import __version__

    out = {"python": platform.python_version(), "meerkat-hf": __version__}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def environment() -> dict:
    """What else decides the bits of a run on a CPU: torch's thread count, the platform, the CPU."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def versions_line(versions: dict[str, str] | None = None) -> str:
    """`meerkat-hf 0.x | Python 3.11.9 | torch 2.13.0 | ...`."""
    v = dict(versions or library_versions())
    parts = [f"meerkat-hf {v.pop('meerkat-hf')}", f"Python {v.pop('python')}"]
    return " | ".join(parts + [f"{k} {x}" for k, x in v.items()])
