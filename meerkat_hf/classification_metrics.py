"""Classification metrics that the label prior cannot fool, with 95% intervals.

Why these and not plain accuracy: our tweet data is ~69% negative, so accuracy rewards moving
the label prior. Balanced accuracy (mean per-class recall) and macro-F1 do not, ROC-AUC of the
score margin ignores the prior entirely (it measures discrimination only), and
*prior-corrected zero-shot* (per-class offsets on the label logits fitted on a validation split,
i.e. contextual calibration) is the baseline a real gain must beat: shifting the prior is the
cheapest thing an update can learn.

Our own code and not `evaluate`/scikit-learn: `evaluate.load` needs the network and the metric
scripts import scikit-learn, which the core does not depend on. Everything here is numpy on
arrays of a few thousand rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "macro_auc",
    "roc_auc",
    "wilson_interval",
    "classification_report",
    "paired_gain",
    "paired_auc_gain",
    "fit_prior_offsets",
    "ClassifierScores",
]

Z95 = 1.959963984540054


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


def _arrays(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions).reshape(-1).astype(np.int64)
    refs = np.asarray(references).reshape(-1).astype(np.int64)
    if preds.shape != refs.shape:
        raise ValueError(f"{preds.size} predictions but {refs.size} references")
    if preds.size == 0:
        raise ValueError("metrics of an empty set are undefined")
    return preds, refs


def _classes(refs: np.ndarray, num_classes: int | None) -> int:
    return int(num_classes) if num_classes is not None else int(refs.max()) + 1


def balanced_accuracy(predictions: Any, references: Any, num_classes: int | None = None) -> float:
    """Mean recall over the classes present in `references` (0.5 for any constant binary guess)."""
    preds, refs = _arrays(predictions, references)
    recalls = [float((preds[refs == c] == c).mean()) for c in range(_classes(refs, num_classes)) if (refs == c).any()]
    return float(np.mean(recalls))


def macro_f1(predictions: Any, references: Any, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in predictions or references."""
    preds, refs = _arrays(predictions, references)
    scores = []
    for c in range(max(_classes(refs, num_classes), int(preds.max()) + 1)):
        tp = float(((preds == c) & (refs == c)).sum())
        fp = float(((preds == c) & (refs != c)).sum())
        fn = float(((preds != c) & (refs == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def roc_auc(margins: Any, references: Any) -> float:
    """Binary ROC-AUC of a score margin (class 1 vs 0) via the rank-sum statistic, ties averaged."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    y = np.asarray(references).reshape(-1)
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    # average ranks over ties, vectorised: rank of a value = its first position + (ties - 1) / 2
    values, inverse, counts = np.unique(m, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1
    ranks = (first + (counts - 1) / 2.0)[inverse]
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def macro_auc(scores: Any, references: Any) -> float:
    """Multi-class AUC of class scores ``[n, C]``: the mean over class pairs (i, j) of the AUC of the margin
    s_j - s_i on the examples of classes i and j (Hand & Till's M, with logit margins instead of probabilities).

    Prior-free like the binary AUC: adding a constant to one class's score shifts each margin by a constant,
    which moves a threshold and no ranking (one-vs-rest AUC of softmax probabilities lacks this). For C = 2
    it is `roc_auc` of s_1 - s_0. Pairs with no example of either class are left out.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(references).reshape(-1)
    aucs = []
    for i in range(s.shape[1]):
        for j in range(i + 1, s.shape[1]):
            rows = (y == i) | (y == j)
            auc = roc_auc(s[rows, j] - s[rows, i], (y[rows] == j).astype(np.int64))
            if not math.isnan(auc):
                aucs.append(auc)
    return float(np.mean(aucs)) if aucs else float("nan")


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (well behaved near 0 and 1, unlike the normal one)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _balanced_accuracy_rows(preds: np.ndarray, refs: np.ndarray, idx: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced accuracy of each bootstrap resample (rows of `idx`), vectorised over resamples."""
    hit = (preds == refs)[idx]
    y = refs[idx]
    recalls = []
    for c in range(num_classes):
        in_c = y == c
        count = in_c.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(count > 0, (hit & in_c).sum(axis=1) / np.maximum(count, 1), np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


def _macro_f1_rows(preds: np.ndarray, refs: np.ndarray, idx: np.ndarray, num_classes: int) -> np.ndarray:
    p, y = preds[idx], refs[idx]
    f1s = []
    for c in range(num_classes):
        tp = ((p == c) & (y == c)).sum(axis=1).astype(np.float64)
        fp = ((p == c) & (y != c)).sum(axis=1)
        fn = ((p != c) & (y == c)).sum(axis=1)
        denom = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            f1s.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan))
    return np.nanmean(np.stack(f1s), axis=0)


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def classification_report(
    predictions: Any,
    references: Any,
    num_classes: int | None = None,
    *,
    margins: Any | None = None,
    scores: Any | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy and macro-F1 with 95% intervals, the majority rate, and AUC.

    Accuracy gets a Wilson interval; balanced accuracy and macro-F1 a percentile bootstrap over
    examples (`resamples`, seeded: the same inputs always give the same interval). `margins`
    (binary tasks: score of class 1 minus class 0) adds the prior-free ROC-AUC; `scores` (``[n, C]`` class
    scores, any C) adds the pairwise multi-class AUC (`macro_auc`), the same number for C = 2.
    """
    preds, refs = _arrays(predictions, references)
    c = max(_classes(refs, num_classes), int(preds.max()) + 1)
    n = refs.size
    hits = float((preds == refs).sum())
    idx = _bootstrap_indices(n, resamples, seed)
    counts = np.bincount(refs, minlength=c)
    out: dict[str, Any] = {
        "n": int(n),
        "accuracy": hits / n,
        "accuracy_ci": list(wilson_interval(hits, n)),
        "balanced_accuracy": balanced_accuracy(preds, refs, c),
        "balanced_accuracy_ci": list(_percentile_interval(_balanced_accuracy_rows(preds, refs, idx, c))),
        "macro_f1": macro_f1(preds, refs, c),
        "macro_f1_ci": list(_percentile_interval(_macro_f1_rows(preds, refs, idx, c))),
        "majority_rate": float(counts.max() / n),
        "predicted_rate": [float(x) for x in np.bincount(preds, minlength=c) / n],
    }
    if margins is not None and c == 2:
        out["auc"] = roc_auc(margins, refs)
    elif scores is not None:
        out["auc"] = macro_auc(scores, refs)
    return out


def paired_gain(
    predictions_a: Any, predictions_b: Any, references: Any, num_classes: int | None = None,
    *, resamples: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Balanced-accuracy gain of B over A on the *same* examples, with a paired bootstrap 95% interval.

    Paired (one resample of examples scores both models) because the two models' errors are
    correlated: an unpaired interval would be far too wide and could hide a real gain.
    """
    a, refs = _arrays(predictions_a, references)
    b, _ = _arrays(predictions_b, references)
    c = max(_classes(refs, num_classes), int(a.max()) + 1, int(b.max()) + 1)
    idx = _bootstrap_indices(refs.size, resamples, seed)
    diff = _balanced_accuracy_rows(b, refs, idx, c) - _balanced_accuracy_rows(a, refs, idx, c)
    gain = balanced_accuracy(b, refs, c) - balanced_accuracy(a, refs, c)
    lo, hi = _percentile_interval(diff)
    return {"gain": gain, "gain_ci": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}


def paired_auc_gain(scores_a: Any, scores_b: Any, references: Any, *, resamples: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """AUC (`macro_auc`) of A and of B on the same examples and the gain B - A, each with a 95% percentile
    interval from one paired bootstrap (the same resampled examples score both sides).

    The ranking's counterpart of `paired_gain`: a change of the label prior can raise balanced accuracy
    and leave this at 0.
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    refs = np.asarray(references).reshape(-1)
    if a.shape != b.shape or a.shape[0] != refs.size:
        raise ValueError(f"paired AUC needs two [n, C] score arrays for the same n examples, got {a.shape}, {b.shape}, "
                         f"{refs.size} labels")
    idx = _bootstrap_indices(refs.size, resamples, seed)
    rows = np.array([[macro_auc(a[i], refs[i]), macro_auc(b[i], refs[i])] for i in idx])
    before, after = macro_auc(a, refs), macro_auc(b, refs)
    lo, hi = _percentile_interval(rows[:, 1] - rows[:, 0])
    return {"before": before, "before_ci": list(_percentile_interval(rows[:, 0])),
            "after": after, "after_ci": list(_percentile_interval(rows[:, 1])),
            "gain": after - before, "gain_ci": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}


def fit_prior_offsets(scores: Any, references: Any, *, grid: int = 201) -> np.ndarray:
    """Per-class offsets on label logits that maximise balanced accuracy on (validation) data.

    Contextual calibration as a baseline: `argmax(scores + offsets)` can only re-weigh the classes,
    never learn the task. Binary: the best threshold on the margin, exactly (every midpoint tried).
    More classes: coordinate ascent over a quantile grid of each class's margin to the others.
    Offset of class 0 is fixed at 0 (only differences matter).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(references).reshape(-1).astype(np.int64)
    if s.ndim != 2 or s.shape[0] != y.size or s.shape[1] < 2:
        raise ValueError(f"scores must be [examples, classes>=2] matching the references, got {s.shape}")
    c = s.shape[1]
    offsets = np.zeros(c)

    def score(off: np.ndarray) -> float:
        return balanced_accuracy((s + off).argmax(axis=1), y, c)

    if c == 2:
        margin = np.sort(s[:, 1] - s[:, 0])
        cuts = np.concatenate([[margin[0] - 1.0], (margin[1:] + margin[:-1]) / 2.0, [margin[-1] + 1.0]])
        cuts = np.unique(cuts)
        # predict 1 where margin + b > 0, i.e. b = -cut; vectorised over all cuts
        preds = (s[:, 1] - s[:, 0])[None, :] > cuts[:, None]
        recall1 = (preds & (y == 1)[None, :]).sum(axis=1) / max(1, int((y == 1).sum()))
        recall0 = (~preds & (y == 0)[None, :]).sum(axis=1) / max(1, int((y == 0).sum()))
        best = int(np.argmax((recall0 + recall1) / 2.0))
        offsets[1] = -cuts[best]
        return offsets
    best = score(offsets)
    for _ in range(5):
        improved = False
        for k in range(1, c):
            others = np.delete(s + offsets, k, axis=1).max(axis=1)
            gaps = others - s[:, k]
            for b in np.quantile(gaps, np.linspace(0, 1, grid)):
                trial = offsets.copy()
                trial[k] = b + 1e-9
                value = score(trial)
                if value > best + 1e-12:
                    best, offsets, improved = value, trial, True
        if not improved:
            break
    return offsets


@dataclass
class ClassifierScores:
    """Label-word logits of a model on a split: `[examples, classes]` plus the gold labels."""

    scores: np.ndarray
    labels: np.ndarray

    def predictions(self, offsets: np.ndarray | None = None) -> np.ndarray:
        s = self.scores if offsets is None else self.scores + np.asarray(offsets)[None, :]
        return s.argmax(axis=1)

    def report(self, offsets: np.ndarray | None = None, **kwargs: Any) -> dict[str, Any]:
        margins = self.scores[:, 1] - self.scores[:, 0] if self.scores.shape[1] == 2 else None
        return classification_report(self.predictions(offsets), self.labels, self.scores.shape[1], margins=margins,
                                     scores=self.scores, **kwargs)

    def to_dict(self) -> Mapping[str, list]:
        return {"scores": self.scores.tolist(), "labels": self.labels.tolist()}
