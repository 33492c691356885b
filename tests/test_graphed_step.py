"""The whole SGD step replayed as one CUDA graph (``train.cuda_graph``): the same training."""

import copy

import pytest
import torch
from conftest import AtenCalls
from torch import nn

from deepcontrol.config import compose
from deepcontrol.engine import eager_step, sgd_step
from deepcontrol.graphed_step import GraphedSGDStep, training_step_fn
from deepcontrol.losses import build_loss
from deepcontrol.models import MODELS
from deepcontrol.nn import ConvNormReLU
from deepcontrol.train import check_cuda_graph, compile_model, sgd

# Batches of 2, then of 1 (an epoch's smaller last batch), then of 2 again: each shape's
# first 3 steps run eagerly, its 4th is recorded and replayed, and later ones replay.
BATCHES = [2] * 6 + [1] * 5 + [2] * 2


def loss_fn():
    return build_loss(compose().loss, class_weights=None)


def batches(sizes: list[int], height: int, width: int, device: str) -> list[tuple]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        images = torch.randn(n, 3, height, width, generator=generator)
        labels = torch.randint(0, 19, (n, height, width), generator=generator)
        labels[:, :2] = 255  # some ignored pixels, as Cityscapes has
        out.append((images.to(device).contiguous(memory_format=torch.channels_last),
                    labels.to(device), None))  # fmt: skip
    return out


def trained(model: nn.Module, step_of, data: list[tuple]) -> tuple[list[float], nn.Module]:
    """The losses of ``data``'s steps, taken by ``step_of(model, optimizer)``, and the model."""
    optimizer = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = step_of(model, optimizer)
    return [float(step(*batch)) for batch in data], model


def test_it_needs_a_cuda_model_and_a_warmup():
    with pytest.raises(ValueError, match="needs the model on a CUDA device, not cpu"):
        GraphedSGDStep(nn.Conv2d(3, 4, 1), None, loss_fn(), "fp32")
    with pytest.raises(ValueError, match="warmup must be 1 or more steps, got 0"):
        GraphedSGDStep(nn.Conv2d(3, 4, 1), None, loss_fn(), "fp32", warmup=0)


def test_training_takes_the_graphed_step_only_with_cuda_graphs():
    model = nn.Conv2d(3, 4, 1)
    assert training_step_fn(model, None, loss_fn(), "fp32", cuda_graph=False).func is sgd_step
    with pytest.raises(ValueError, match="needs the model on a CUDA device, not cpu"):
        training_step_fn(model, None, loss_fn(), "fp32", cuda_graph=True)  # GraphedSGDStep's


# What a CUDA graph cannot record: a read of a value on the host, and an op whose result's
# size depends on values; on a GPU both wait for the device, and a capture fails on them.
UNRECORDABLE = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2"}


@pytest.mark.parametrize(
    "network, norm", [("segnet", "none"), ("segnet", "bn"), ("segnet", "agc"), ("classnet", "agc")]
)
def test_the_step_holds_nothing_a_cuda_graph_cannot_record(network, norm):
    """On the CPU, the ops of the step that GraphedSGDStep records: with class weights,
    ignored pixels, and for ClassNet its contour loss."""
    torch.manual_seed(0)
    model = MODELS[network](num_classes=19, norm=norm, width=8)
    optimizer = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    weighted = build_loss(compose().loss, class_weights=torch.rand(19) + 0.5)
    [(images, labels, _)] = batches([2], 32, 64, "cpu")
    contours = (torch.rand(2, 32, 64) < 0.1).float()
    step = eager_step(model, optimizer, weighted, "fp32")
    step(images, labels, contours)  # the momenta, as the warm-up makes them
    with AtenCalls() as ops:
        step(images, labels, contours)
    names = {name.split(".")[0] for name, _, _ in ops.calls}  # without the overload
    assert {"convolution_backward", "_fused_sgd_"} <= names  # it saw the whole step
    assert not names & UNRECORDABLE
    if network == "classnet":  # and the contour loss
        assert "max_pool2d_with_indices" in names


@pytest.mark.parametrize(
    "overrides, message",
    [(["train.cuda_graph=yes"], "train.cuda_graph must be true or false, got 'yes'"),
     (["train.cuda_graph=true", "train.compile=reduce-overhead"],
      "train.compile=reduce-overhead would record graphs of its own inside it")],
)  # fmt: skip
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_cuda_graph(compose(overrides))


def test_it_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="runs in one process, not under torchrun"):
        check_cuda_graph(compose(["train.cuda_graph=true"]))
    assert check_cuda_graph(compose(["train.cuda_graph=false"])) is False


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["none", "bn", "agc"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_graphed_step_trains_as_the_eager_step_does(norm, precision, monkeypatch):
    """SegNet at a quarter width: each step's loss, and the weights and BN's running
    statistics after all of them, as the eager step leaves them. cuDNN's algorithms are
    deterministic, so that the two differ only if the graph trains otherwise; a bug of that
    kind (a gradient added to the last step's, a batch not copied in) is far larger than
    the tolerances, which leave room for rounding (bf16's, that of the issue's 1e-2)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    model = MODELS["segnet"](num_classes=19, norm=norm, width=16).cuda()
    model = model.to(memory_format=torch.channels_last)
    data = batches(BATCHES, 32, 64, "cuda")
    eager_losses, eager = trained(copy.deepcopy(model), lambda m, o: eager_step(
        m, o, loss_fn(), precision), data)  # fmt: skip
    graph_losses, graphed = trained(copy.deepcopy(model), lambda m, o: GraphedSGDStep(
        m, o, loss_fn(), precision), data)  # fmt: skip
    tolerance = {"fp32": 1e-4, "bf16": 1e-2}[precision]
    assert graph_losses == pytest.approx(eager_losses, rel=tolerance)
    for (name, a), (_, b) in zip(eager.state_dict().items(), graphed.state_dict().items(),
                                 strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance, msg=name)
    # and so that the comparison can fail: the steps trained the network
    before = model.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in graphed.state_dict().items())


@pytest.mark.cuda
def test_the_graphed_step_takes_torch_compiles_kernels():
    """``train.compile=default`` with ``train.cuda_graph``: what the benchmark's "graphed"
    mode runs, on a small AGC network, against the same compiled network stepped eagerly."""
    torch.manual_seed(0)
    model = nn.Sequential(ConvNormReLU(3, 16, "agc"), nn.Conv2d(16, 19, 1)).cuda()
    data = batches(BATCHES, 16, 32, "cuda")
    eager_losses, eager = trained(copy.deepcopy(model), lambda m, o: eager_step(
        compile_model(m, "default"), o, loss_fn(), "fp32"), data)  # fmt: skip
    graph_losses, graphed = trained(copy.deepcopy(model), lambda m, o: GraphedSGDStep(
        compile_model(m, "default"), o, loss_fn(), "fp32"), data)  # fmt: skip
    torch._dynamo.reset()
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_a_changed_learning_rate_is_refused_not_ignored():
    model = nn.Sequential(nn.Conv2d(3, 19, 1)).cuda()
    optimizer = sgd(model, lr=0.05, momentum=0.9)
    step = GraphedSGDStep(model, optimizer, loss_fn(), "fp32", warmup=1)
    data = batches([2, 2, 2], 8, 8, "cuda")
    step(*data[0])
    step(*data[1])  # recorded, with lr 0.05
    optimizer.param_groups[0]["lr"] = 0.01
    with pytest.raises(ValueError, match="settings changed after its step was recorded"):
        step(*data[2])
    with pytest.raises(ValueError, match="does not run under DDP"):
        step(*data[2], scale=torch.ones((), device="cuda"))
