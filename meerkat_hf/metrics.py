"""Accuracy without a network dependency.

``evaluate.load("accuracy")`` downloads a metric script from the Hub (and the script imports
scikit-learn), so on an offline machine it fails -- after ~5 s spent importing ``evaluate`` and,
without ``HF_HUB_OFFLINE``, possibly after network retries. :func:`load_accuracy_metric` checks the
offline switches first and falls back to :class:`LocalAccuracy`, which has the same
``compute(predictions=..., references=...) -> {"accuracy": x}`` interface.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

__all__ = ["accuracy", "LocalAccuracy", "load_accuracy_metric", "hf_offline"]

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")


def hf_offline() -> bool:
    """True when any Hugging Face offline switch is set in the environment."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in _OFFLINE_VARS)


def _to_numpy(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor (possibly on GPU / requiring grad)
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 0:
        raise ValueError(f"{name} must be a sequence, got a scalar")
    return array


def _flat(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one class id per example), got shape {array.shape}")
    return array


def accuracy(predictions: Any, references: Any, sample_weight: Any | None = None) -> float:
    """Fraction of ``predictions`` equal to ``references`` (lists, numpy arrays or torch tensors).

    2-D ``predictions`` against 1-D ``references`` are taken as scores/logits and argmax-ed, so a
    ``Trainer``'s ``compute_metrics`` can pass logits straight in. Raises ``ValueError`` on empty
    inputs or a length mismatch (silently truncating would hide a batching bug).
    """
    preds = _to_numpy(predictions, "predictions")
    refs = _to_numpy(references, "references")
    if preds.ndim == 2 and preds.shape[1] > 1 and refs.ndim == 1:
        preds = preds.argmax(axis=-1)
    preds, refs = _flat(preds, "predictions"), _flat(refs, "references")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if len(preds) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    hits = (preds == refs).astype(np.float64)
    if sample_weight is None:
        return float(hits.mean())
    weights = _to_numpy(sample_weight, "sample_weight").astype(np.float64)
    if len(weights) != len(hits):
        raise ValueError(f"{len(weights)} sample weights for {len(hits)} predictions")
    total = weights.sum()
    if total <= 0:
        raise ValueError("sample weights sum to zero")
    return float((hits * weights).sum() / total)


class LocalAccuracy:
    """Offline stand-in for ``evaluate.load("accuracy")``: ``compute``, ``add``, ``add_batch``."""

    name = "accuracy"

    def __init__(self) -> None:
        self._predictions: list[Any] = []
        self._references: list[Any] = []

    def add(self, *, prediction: Any = None, reference: Any = None) -> None:
        self._predictions.append(prediction)
        self._references.append(reference)

    def add_batch(self, *, predictions: Any = None, references: Any = None) -> None:
        self._predictions.extend(_to_numpy(predictions, "predictions").tolist())
        self._references.extend(_to_numpy(references, "references").tolist())

    def compute(
        self,
        *,
        predictions: Any = None,
        references: Any = None,
        normalize: bool = True,
        sample_weight: Any | None = None,
        **_: Any,
    ) -> dict[str, float]:
        """``{"accuracy": x}`` of the given arrays, or of what was added (then cleared), like evaluate."""
        if predictions is None and references is None:
            predictions, references = self._predictions, self._references
            self._predictions, self._references = [], []
        elif predictions is None or references is None:
            raise ValueError("pass both predictions and references")
        value = accuracy(predictions, references, sample_weight)
        if not normalize:
            n = len(_to_numpy(references, "references"))
            value = float(value * n) if sample_weight is None else float(
                value * _to_numpy(sample_weight, "sample_weight").sum()
            )
        return {"accuracy": value}

    def __repr__(self) -> str:
        return "LocalAccuracy()"


def load_accuracy_metric() -> Any:
    """``evaluate.load("accuracy")`` when it works, else :class:`LocalAccuracy`; never raises.

    The offline switches are read before importing ``evaluate`` so an offline run neither hangs on
    the network nor pays for the import. Which implementation was chosen is logged at INFO.
    """
    if hf_offline():
        logger.info("accuracy metric: local implementation (Hugging Face offline mode is set)")
        return LocalAccuracy()
    try:
        import evaluate

        metric = evaluate.load("accuracy")
    except Exception as exc:  # noqa: BLE001 - any failure (network, missing sklearn, ...) -> fallback
        logger.info("accuracy metric: local implementation (evaluate.load failed: %s: %s)", type(exc).__name__, exc)
        return LocalAccuracy()
    logger.info("accuracy metric: evaluate.load('accuracy')")
    return metric
