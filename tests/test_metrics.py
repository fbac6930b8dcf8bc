"""Accuracy and the offline-safe metric loader."""

from __future__ import annotations

import logging
import sys
import time
import types

import numpy as np
import pytest
import torch

from meerkat_hf.metrics import LocalAccuracy, accuracy, load_accuracy_metric


@pytest.mark.parametrize(
    "preds, refs",
    [
        ([1, 0, 1, 1], [1, 1, 1, 0]),
        (np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])),
        (torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])),
        (torch.tensor([[1], [0], [1], [1]]), [1, 1, 1, 0]),
    ],
)
def test_accuracy_inputs(preds, refs):
    assert accuracy(preds, refs) == pytest.approx(0.5)
    assert isinstance(accuracy(preds, refs), float)


def test_accuracy_argmaxes_logits_and_weights():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]], requires_grad=True)
    assert accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    assert accuracy([1, 0], [1, 1], sample_weight=[3, 1]) == pytest.approx(0.75)


def test_accuracy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError):
        accuracy(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


def test_local_metric_interface():
    metric = LocalAccuracy()
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], normalize=False) == {"accuracy": 2.0}
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=np.array([0]), references=torch.tensor([0]))
    assert metric.compute() == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        metric.compute()  # accumulated state was consumed


def test_offline_fallback_is_fast_and_logged(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "evaluate", None)  # importing evaluate would now fail loudly
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="meerkat_hf.metrics"):
        metric = load_accuracy_metric()
    assert time.perf_counter() - start < 1.0
    assert isinstance(metric, LocalAccuracy)
    assert "local" in caplog.text and "offline" in caplog.text
    assert metric.compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"])
def test_other_offline_switches(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, "true")
    monkeypatch.setitem(sys.modules, "evaluate", None)
    assert isinstance(load_accuracy_metric(), LocalAccuracy)


def _fake_evaluate(load):
    module = types.ModuleType("evaluate")
    module.load = load
    return module


def test_failed_evaluate_load_falls_back(monkeypatch, caplog):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def load(name):
        raise FileNotFoundError("Couldn't find a module script ... accuracy")

    monkeypatch.setitem(sys.modules, "evaluate", _fake_evaluate(load))
    with caplog.at_level(logging.INFO, logger="meerkat_hf.metrics"):
        assert isinstance(load_accuracy_metric(), LocalAccuracy)
    assert "evaluate.load failed" in caplog.text


def test_uses_evaluate_when_it_works(monkeypatch, caplog):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    sentinel = object()
    monkeypatch.setitem(sys.modules, "evaluate", _fake_evaluate(lambda name: sentinel if name == "accuracy" else None))
    with caplog.at_level(logging.INFO, logger="meerkat_hf.metrics"):
        assert load_accuracy_metric() is sentinel
    assert "evaluate.load('accuracy')" in caplog.text
