"""Balanced accuracy, macro-F1, AUC, intervals and prior correction against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from meerkat_hf.classification_metrics import (
    ClassifierScores,
    balanced_accuracy,
    classification_report,
    fit_prior_offsets,
    macro_f1,
    paired_gain,
    roc_auc,
    wilson_interval,
)


def test_constant_guess_is_chance_under_balanced_metrics():
    refs = np.array([0] * 69 + [1] * 31)
    preds = np.zeros(100, dtype=int)  # always the majority class
    rep = classification_report(preds, refs, 2)
    assert rep["accuracy"] == pytest.approx(0.69)
    assert rep["balanced_accuracy"] == pytest.approx(0.5)
    assert rep["macro_f1"] == pytest.approx((2 * 69 / (2 * 69 + 31)) / 2)
    assert rep["majority_rate"] == pytest.approx(0.69)
    assert rep["predicted_rate"] == [1.0, 0.0]


def test_hand_computed_values():
    refs = [0, 0, 0, 1, 1, 2]
    preds = [0, 1, 0, 1, 0, 2]
    assert balanced_accuracy(preds, refs) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    f1_0 = 2 * 2 / (2 * 2 + 1 + 1)
    f1_1 = 2 * 1 / (2 * 1 + 1 + 1)
    assert macro_f1(preds, refs) == pytest.approx((f1_0 + f1_1 + 1.0) / 3)


def test_auc_rank_statistic_with_ties():
    assert roc_auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert roc_auc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    # brute force over all pairs on random data
    rng = np.random.default_rng(0)
    m, y = rng.integers(0, 5, 60).astype(float), rng.integers(0, 2, 60)
    pos, neg = m[y == 1], m[y == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(m, y) == pytest.approx(brute)


def test_wilson_interval_known_value_and_edges():
    lo, hi = wilson_interval(80, 100)
    assert lo == pytest.approx(0.7111, abs=1e-3) and hi == pytest.approx(0.8666, abs=1e-3)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)


def test_intervals_contain_estimate_and_are_seeded():
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 2, 500)
    preds = np.where(rng.random(500) < 0.8, refs, 1 - refs)
    a = classification_report(preds, refs, 2, seed=3)
    b = classification_report(preds, refs, 2, seed=3)
    assert a == b
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        lo, hi = a[f"{key}_ci"]
        assert lo < a[key] < hi and hi - lo < 0.1


def test_paired_gain_detects_a_real_gain_and_not_a_null_one():
    rng = np.random.default_rng(2)
    refs = rng.integers(0, 2, 2000)
    a = np.where(rng.random(2000) < 0.70, refs, 1 - refs)
    better = np.where(rng.random(2000) < 0.5, refs, a)  # fixes about half of A's errors
    g = paired_gain(a, better, refs)
    assert g["gain"] > 0.1 and g["excludes_zero"]
    same = paired_gain(a, a.copy(), refs)
    assert same["gain"] == 0.0 and not same["excludes_zero"]


def test_prior_offsets_fix_a_shifted_binary_classifier():
    rng = np.random.default_rng(3)
    y = (rng.random(3000) < 0.3).astype(int)
    margin = 2.0 * (y - 0.5) + rng.normal(0, 1, 3000) - 3.0  # good ranking, threshold far off
    scores = np.stack([np.zeros(3000), margin], axis=1)
    cs = ClassifierScores(scores, y)
    before = cs.report()["balanced_accuracy"]
    offsets = fit_prior_offsets(scores, y)
    after = cs.report(offsets)["balanced_accuracy"]
    assert before < 0.6 < 0.8 < after
    # offsets never change the ranking: AUC is the same
    assert cs.report(offsets)["auc"] == pytest.approx(cs.report()["auc"])


def test_prior_offsets_three_classes_never_worse():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 900)
    scores = rng.normal(0, 1, (900, 3))
    scores[np.arange(900), y] += 1.0
    scores[:, 0] += 1.5  # a prior pushed towards class 0
    offsets = fit_prior_offsets(scores, y)
    assert offsets[0] == 0.0
    assert balanced_accuracy((scores + offsets).argmax(1), y) > balanced_accuracy(scores.argmax(1), y) + 0.05


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [])
    with pytest.raises(ValueError, match="3 predictions but 2"):
        balanced_accuracy([0, 1, 0], [0, 1])
    with pytest.raises(ValueError, match="scores must be"):
        fit_prior_offsets(np.zeros(4), [0, 1, 0, 1])


def test_macro_auc_is_prior_free_and_equals_the_binary_auc_for_two_classes():
    from meerkat_hf.classification_metrics import macro_auc, roc_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    scores = rng.normal(size=(300, 3))
    scores[np.arange(300), y] += 1.0  # informative
    auc = macro_auc(scores, y)
    assert 0.7 < auc < 1.0
    shifted = scores + np.array([5.0, -3.0, 0.0])  # a prior move: every prediction may change, no ranking does
    assert macro_auc(shifted, y) == pytest.approx(auc, abs=1e-12)
    assert macro_auc(rng.normal(size=(300, 3)), y) == pytest.approx(0.5, abs=0.06)
    binary = rng.integers(0, 2, 200)
    two = rng.normal(size=(200, 2))
    assert macro_auc(two, binary) == pytest.approx(roc_auc(two[:, 1] - two[:, 0], binary), abs=1e-12)
