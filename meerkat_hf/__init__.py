"""meerkat-hf: zeroth-order federated fine-tuning of causal LMs with transferable sparsity.

The package's folders are its architecture:

* `masks/`     the transferable sparse mask: its config, calibration, selection, cache and files;
* `zo/`        seeded directions, the ZO estimators and `ZOSGD` (the arithmetic every node shares);
* `modeling/`  `MeerkatModel` (a causal LM whose masked coordinates train) and its forward precision;
* `trainer/`   `MeerkatZOTrainer`, a drop-in `transformers.Trainer`, its arguments, and
                `MeerkatSFTTrainer` on TRL's `SFTTrainer` (the [trl] extra);
* `hub/`       atomic saves, Hub upload/download, model cards, base-model loading;
* `tasks/`     prompt classification and LM tasks (templates, data, verbalizers);
* `federated/` the replayed protocol, the in-process engine, Accelerate and Flower.

The trainer is imported lazily: `import meerkat_hf` for masks alone does not pay for
`transformers.Trainer` (and its optional integrations).
"""

from .masks.calibration import SelfGenerated
from .masks.compute import compute_mask
from .masks.config import SparseMaskConfig
from .masks.mask import MaskMismatchError, SparseMask
from .masks.cache import get_or_compute_mask
from .modeling.model import MeerkatModel, get_meerkat_model

__version__ = "0.1.0"

_LAZY = {"MeerkatZOTrainer": "trainer", "MeerkatZOArguments": "trainer", "CandidateAccuracy": "trainer",
         "list_masks": "hub.discovery", "mask_repo_name": "hub.discovery",
         "ZOSGD": "zo.optimizer", "lora_mask": "masks.baselines", "full_mask": "masks.baselines",
         # the [trl] extra: importing them without TRL says how to install it
         "MeerkatSFTTrainer": "trainer.sft_trainer", "MeerkatSFTConfig": "trainer.sft_trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CandidateAccuracy",
    "MaskMismatchError",
    "MeerkatModel",
    "MeerkatSFTConfig",
    "MeerkatSFTTrainer",
    "MeerkatZOArguments",
    "MeerkatZOTrainer",
    "SelfGenerated",
    "SparseMask",
    "SparseMaskConfig",
    "ZOSGD",
    "compute_mask",
    "full_mask",
    "get_meerkat_model",
    "get_or_compute_mask",
    "list_masks",
    "lora_mask",
    "mask_repo_name",
]
