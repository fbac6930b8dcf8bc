"""Zeroth-order arithmetic: seeded directions, the step estimators (`spsa`) and `ZOSGD` (`optimizer`).

`from meerkat_hf import zo; zo.derive_seed(...)` reaches the shared arithmetic; `ZOSGD` is imported
on first use (it needs the modeling package).
"""

from .spsa import (
    DIRECTION_CHUNK,
    ESTIMATORS,
    SparseTarget,
    ZOStep,
    all_finite,
    apply_step,
    check_eps,
    check_estimator,
    derive_seed,
    forwards_per_step,
    gaussian_direction,
    projected_gradient,
    projected_gradients_per_example,
    replay,
    step_scalars,
)

__all__ = ["DIRECTION_CHUNK", "ESTIMATORS", "SparseTarget", "ZOSGD", "ZOStep", "all_finite", "apply_step", "check_eps",
           "check_estimator", "derive_seed", "forwards_per_step", "gaussian_direction", "projected_gradient",
           "projected_gradients_per_example", "replay", "step_scalars"]


def __getattr__(name: str):
    if name == "ZOSGD":
        from .optimizer import ZOSGD

        return ZOSGD
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
