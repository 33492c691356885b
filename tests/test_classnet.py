"""ClassNet: shapes, size, paths, contour targets and loss, and a short training run."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from deepcontrol.data.prepare import contour_target, ensure_cache
from deepcontrol.losses import build_loss, contour_iou_loss
from deepcontrol.models import ClassNet, build_model
from deepcontrol.results import read_metrics
from deepcontrol.train import train


@pytest.mark.parametrize("size", [(256, 512), (100, 150)])  # the paper's, and not multiples of 128
def test_both_heads_have_the_input_size(size):
    model = ClassNet(num_classes=19, norm="agc").eval()
    with torch.no_grad():
        logits, contour = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 19, *size) and contour.shape == (1, 1, *size)


def test_size_widths_and_depths_are_pinned():
    bn, agc = ClassNet(norm="bn"), ClassNet(norm="agc")
    assert sum(p.numel() for p in bn.parameters()) == 6_290_830
    assert sum(p.numel() for p in agc.parameters()) == 6_297_708
    assert bn.path_depths() == (5, 51)  # "from just a few layers to around 50"
    assert bn.decoder_width == 29  # num_classes + 10
    widths = [block.merge[0].out_channels for block in bn.encoder]
    assert widths == [32, 64, 128, 256, 256, 256, 256] and len(bn.decoder) == 7
    # the down-sampled image enters the first layer after each pooling
    first_layers = [block.layers[0][0][0].in_channels for block in bn.encoder]
    assert first_layers == [3, 35, 67, 131, 259, 259, 259]


def conv_path_lengths(output: torch.Tensor, image: torch.Tensor) -> tuple[int, int]:
    """(shortest, longest) count of convolutions on the paths from ``image`` to ``output``,
    read from the backward graph itself (paths that end at a parameter do not count)."""
    memo = {}

    def walk(node) -> tuple[float, float]:
        if node is None:
            return math.inf, -math.inf
        if node not in memo:
            if type(node).__name__ == "AccumulateGrad":  # a leaf: the image or a parameter
                memo[node] = (0, 0) if node.variable is image else (math.inf, -math.inf)
            else:
                own = "Convolution" in type(node).__name__
                paths = [walk(child) for child, _ in node.next_functions]
                memo[node] = (min(p[0] for p in paths) + own, max(p[1] for p in paths) + own)
        return memo[node]

    return walk(output.grad_fn)


def test_path_depths_match_the_backward_graph():
    model = ClassNet(norm="none")
    image = torch.randn(1, 3, 32, 64, requires_grad=True)
    logits, _ = model(image)
    assert conv_path_lengths(logits, image) == model.path_depths() == (5, 51)


def test_identity_init_keeps_projections_pass_through():
    model = ClassNet(norm="none", init="identity")
    projection = model.encoder[1].layers[0][1][0]  # the 1x1 after a 3x3
    assert torch.equal(projection.weight[:, :, 0, 0], torch.eye(64))
    assert not torch.equal(model.encoder[1].merge[0].weight[:, :64, 0, 0], torch.eye(64))


def test_contours_follow_instance_and_class_boundaries():
    labels = np.zeros((6, 8), np.uint8)
    labels[:, 4:] = 1  # a class boundary between columns 3 and 4
    instances = np.zeros((6, 8), np.int64)
    instances[:3, :4] = 7  # two instances of class 0, meeting between rows 2 and 3
    labels[5, 0] = 255  # an ignored pixel makes no boundary
    got = contour_target(labels, instances)
    expected = np.zeros((6, 8), np.uint8)
    expected[:, 3:5] = 1
    expected[2:4, :4] = 1
    expected[5, 0] = 0
    expected[4, 0] = 0  # its only differing neighbour is the ignored one
    assert got.tolist() == expected.tolist()
    only_classes = contour_target(labels)
    assert only_classes[:, 3:5].all() and only_classes.sum() == 12


def test_contour_loss_is_zero_when_perfect_and_grows_with_distance():
    target = torch.zeros(1, 32, 32)
    target[:, :, 15:17] = 1  # a vertical boundary, two pixels wide
    valid = torch.ones_like(target, dtype=torch.bool)
    assert contour_iou_loss(target, target, valid, band=3).item() == 0
    columns = torch.arange(32.0).expand(1, 32, 32)
    losses = []
    for shift in range(6):  # a soft predicted ridge, moved away from the true boundary
        prediction = torch.exp(-((columns - 15.5 - shift) ** 2) / 2)
        losses.append(contour_iou_loss(prediction, target, valid, band=3).item())
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] > 0.99  # beyond the band little overlap is left to count
    assert contour_iou_loss(torch.rand(1, 32, 32), torch.zeros(1, 32, 32), valid).item() == 0
    # predicting boundaries far from any true one costs nothing: only the band counts
    far = target.clone()
    far[:, :, 0] = 1
    assert contour_iou_loss(far, target, valid, band=3).item() == 0


def test_classnet_objective_adds_the_weighted_contour_loss(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "cache", "model=classnet",
                      "loss.contour_weight=2.0")  # fmt: skip
    model = build_model(cfg, 19)
    images, labels = torch.randn(2, 3, 32, 64), torch.randint(0, 19, (2, 32, 64))
    contours = (torch.rand(2, 32, 64) > 0.9).float()
    outputs = model(images)
    total = build_loss(cfg.loss, None)(outputs, labels, contours)
    class_only = build_loss(cfg.loss, None)(outputs[0], labels)
    contour = contour_iou_loss(torch.sigmoid(outputs[1]).squeeze(1), contours,
                               labels != 255, cfg.loss.contour_band)  # fmt: skip
    torch.testing.assert_close(total, class_only + 2.0 * contour)
    with pytest.raises(ValueError, match="needs contour targets"):
        build_loss(cfg.loss, None)(outputs, labels)
    cfg.loss.contour_band = -1  # was a padding error from torch at the first ClassNet step
    with pytest.raises(ValueError, match=r"loss.contour_band must be an integer >= 0 \(pixels\)"):
        build_loss(cfg.loss, None)
    cfg.loss.contour_band, cfg.loss.contour_weight = 3, "heavy"
    with pytest.raises(ValueError, match="loss.contour_weight must be a number >= 0, got 'heavy'"):
        build_loss(cfg.loss, None)


def test_cache_holds_contours_from_instances(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "cache")
    cache_dir, manifest = ensure_cache(cfg.data)
    assert manifest["contours"] == "instance and class boundaries"
    contours = np.load(cache_dir / "train_contours.npy")
    labels = np.load(cache_dir / "train_labels.npy")
    assert contours.shape == labels.shape and set(np.unique(contours)) == {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("norm, lr", [("bn", 0.04), ("agc", 0.04)])
def test_classnet_validation_error_falls(synthetic_root, tmp_path, norm, lr):
    # Batch 2: at 64x128 the seventh pooling leaves a 1x1 map, and BatchNorm needs more
    # than one value per channel (at the paper's 256x512 it is 2x4). The paper's width (32):
    # at tiny_config's 16, BN at batch 2 barely learns in 5 epochs.
    cfg = tiny_config(synthetic_root, tmp_path / "cache", "model=classnet", "model.width=32",
                      f"norm={norm}", "data.height=64", "data.width=128", "data.batch_size=2",
                      f"optim.lr={lr}", "epochs=5")  # fmt: skip
    summary = train(cfg, tmp_path / "run")
    errors = [row["val_pixel_error"] for row in read_metrics(tmp_path / "run")]
    assert summary["status"] == "finished" and summary["num_parameters"] > 6_000_000
    assert errors[-1] < errors[0] - 0.1, errors
