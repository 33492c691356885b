"""ENet class weights, the pixel-normalised loss, and the confusion-matrix metrics."""

import math

import pytest
import torch
from torch.nn import functional as F

from deepcontrol.data import enet_class_weights
from deepcontrol.losses import pixel_cross_entropy
from deepcontrol.metrics import ConfusionMatrix


def test_enet_weights_hand_computed():
    # p = 0.6, 0.3, 0.1: 1/ln(1.62) = 2.07286, 1/ln(1.32) = 3.60189, 1/ln(1.12) = 8.82389,
    # mean 4.83288, so normalised 0.42891, 0.74529, 1.82580.
    weights = enet_class_weights([600, 300, 100])
    assert weights.tolist() == pytest.approx([0.42891, 0.74529, 1.82580], abs=1e-5)
    assert weights.mean().item() == pytest.approx(1.0)


def test_enet_weights_absent_class_is_neutral():
    # classes 0 and 2 as in a 75/25 split; class 1 never occurs
    weights = enet_class_weights([75, 0, 25])
    assert weights.tolist() == pytest.approx([0.59017, 1.0, 1.40983], abs=1e-5)


def test_enet_weights_reject_bad_counts():
    with pytest.raises(ValueError, match="non-negative per-class counts"):
        enet_class_weights([0, 0])


def test_loss_is_divided_by_valid_pixels_not_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :3] = 255
    weights = torch.tensor([0.5, 1.0, 2.0])
    nll = -F.log_softmax(logits, 1).gather(1, target.clamp(max=2).unsqueeze(1)).squeeze(1)
    valid = target != 255
    expected = (weights[target.clamp(max=2)] * nll)[valid].sum() / valid.sum()
    loss = pixel_cross_entropy(logits, target, weights)
    torch.testing.assert_close(loss, expected)
    # doubling every weight doubles the loss (PyTorch's weighted mean would not change)
    torch.testing.assert_close(pixel_cross_entropy(logits, target, 2 * weights), 2 * loss)
    torch_mean = F.cross_entropy(logits, target, weight=weights, ignore_index=255)
    assert not torch.allclose(loss, torch_mean)


def test_loss_without_weights_is_plain_mean_and_all_ignored_is_zero():
    logits = torch.randn(1, 4, 3, 3)
    target = torch.randint(0, 4, (1, 3, 3))
    torch.testing.assert_close(pixel_cross_entropy(logits, target), F.cross_entropy(logits, target))
    assert pixel_cross_entropy(logits, torch.full_like(target, 255)).item() == 0.0


def test_confusion_matrix_metrics():
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    predicted = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(predicted, target)
    assert cm.counts.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert cm.pixel_error() == pytest.approx(2 / 5)  # the ignored pixel does not count
    # IoU: class 0: 1/(2+2-1) = 1/3, class 1: 2/(2+3-2) = 2/3, class 2: 0/(1+0-0) = 0
    assert cm.iou().tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert cm.mean_iou() == pytest.approx(1 / 3)
    cm.update(predicted, target)  # accumulates
    assert cm.counts.sum().item() == 10


def test_miou_skips_classes_never_seen():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert math.isnan(cm.iou()[3].item())
    assert cm.mean_iou() == pytest.approx(1.0)
