"""`classification_metrics.accuracy`: inputs a Trainer's compute_metrics passes, and bad ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meerkat_hf.classification_metrics import accuracy


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
