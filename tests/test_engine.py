"""The training step under each precision and device, on a tiny network."""

from collections.abc import Callable

import pytest
import torch
from conftest import AtenCalls, tf32_allowed
from torch import nn

from deepcontrol.config import compose
from deepcontrol.data import DeviceBatches
from deepcontrol.engine import (
    autocast,
    eager_step,
    evaluate,
    train_one_epoch,
    use_float32_arithmetic,
)
from deepcontrol.losses import build_loss
from deepcontrol.nn import AutoGainControl2d


def tiny_problem(device: str) -> tuple[nn.Module, DeviceBatches]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), AutoGainControl2d(8), nn.ReLU(),
        nn.Conv2d(8, 3, 1),
    ).to(device)  # fmt: skip
    images = torch.randint(0, 256, (6, 8, 10, 3), dtype=torch.uint8)
    labels = (images[..., 0] // 86).to(torch.uint8)  # class from the red channel: learnable
    labels[:, 0, 0] = 255
    batches = DeviceBatches(
        images, labels, batch_size=4, mean=[128.0] * 3, std=[64.0] * 3, shuffle=True, device=device
    )
    return model, batches


def run(device: str, precision: str) -> list[float]:
    model, batches = tiny_problem(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss_fn = build_loss(compose().loss, class_weights=None)
    losses = []
    for _ in range(15):
        losses.append(train_one_epoch(model, batches, optimizer, loss_fn, precision))
    metrics, iou = evaluate(model, batches, loss_fn, 3, precision)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 0 <= metrics["val_pixel_error"] <= 1 and iou.shape == (3,)
    return [x["train_loss"] for x in losses]


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_training_step_learns_on_cpu(precision):
    losses = run("cpu", precision)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_learns_on_cuda(precision):
    losses = run("cuda", precision)
    assert losses[-1] < 0.5 * losses[0], losses


def test_last_steps_gradients_are_freed_before_the_forward():
    model, batches = tiny_problem("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    held = []
    model.register_forward_pre_hook(
        lambda *_: held.append([p.grad is not None for p in model.parameters()])
    )
    train_one_epoch(model, batches, optimizer, build_loss(compose().loss, class_weights=None))
    assert len(held) == 2 and not any(map(any, held)), held
    assert all(p.grad is not None for p in model.parameters())  # so the check above can fail


def test_the_epoch_takes_its_steps_with_the_step_it_is_given():
    """How ``train.cuda_graph`` takes over the step (``GraphedSGDStep``): the same training
    as the default ``sgd_step``."""
    loss_fn = build_loss(compose().loss, class_weights=None)
    model, batches = tiny_problem("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    default = train_one_epoch(model, batches, optimizer, loss_fn)
    model, batches = tiny_problem("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager, sizes = eager_step(model, optimizer, loss_fn, "fp32"), []

    def step(images, labels, contours, scale=None):
        sizes.append(len(images))
        return eager(images, labels, contours, scale=scale)

    assert train_one_epoch(model, batches, optimizer, loss_fn, step=step) == default
    assert sizes == [4, 2]


def host_reads_by_step(model: nn.Module, work: Callable[[], object]) -> tuple[int, set[int]]:
    """The forwards of ``model`` that ``work`` runs, and after how many of them it reads a
    tensor's value on the host."""
    with AtenCalls() as ops:
        hook = model.register_forward_pre_hook(lambda *_: ops.mark("step"))
        work()
    hook.remove()
    names = [name for name, _, _ in ops.calls]
    return names.count("step"), {names[:i].count("step") for i, name in enumerate(names)
                                 if name.startswith("_local_scalar_dense")}  # fmt: skip


def test_the_loop_reads_values_on_the_host_only_every_ten_steps():
    """On a GPU each such read waits for all the work queued so far, and the GPU then idles
    while the host queues the next: so training reads only every 10th step, the epoch's last
    and at its end; validation only at its end."""
    model, _ = tiny_problem("cpu")
    images = torch.zeros(23, 8, 10, 3, dtype=torch.uint8)
    batches = DeviceBatches(images, images[..., 0], 1, mean=[0.0] * 3, std=[1.0] * 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = build_loss(compose().loss, class_weights=None)
    training = host_reads_by_step(
        model, lambda: train_one_epoch(model, batches, optimizer, loss_fn)
    )
    assert training == (23, {10, 20, 23})
    assert host_reads_by_step(model, lambda: evaluate(model, batches, loss_fn, 3, "fp32")) == (
        23, {23}
    )  # fmt: skip


@pytest.mark.parametrize("norm", ["bn", "agc"])
def test_validation_metrics_do_not_depend_on_the_validation_batch(norm):
    """data.val_batch_size changes the speed of validation only (BN evaluates with its
    running statistics, AGC per sample)."""
    from deepcontrol.models import SegNet

    torch.manual_seed(0)
    model = SegNet(num_classes=3, norm=norm, width=4)
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    labels = (images[..., 0] // 86).to(torch.uint8)
    labels[:, :4] = 255
    loss_fn = build_loss(compose().loss, class_weights=None)
    train = DeviceBatches(images, labels, batch_size=5, mean=[128.0] * 3, std=[64.0] * 3)
    train_one_epoch(model, train, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn)
    results = []
    for batch in (1, 2, 5):
        val = DeviceBatches(images, labels, batch_size=batch, mean=[128.0] * 3, std=[64.0] * 3)
        results.append(evaluate(model, val, loss_fn, 3, "fp32"))
    (metrics, iou), *others = results
    for other_metrics, other_iou in others:
        assert other_metrics == pytest.approx(metrics, rel=1e-5)
        torch.testing.assert_close(other_iou, iou)
    assert 0 < metrics["val_pixel_error"] < 1  # some pixels right and some wrong


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="train.precision must be one of fp32, tf32, bf16"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="got 'float32'"):
        use_float32_arithmetic("float32")


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True), ("bf16", False)])
def test_only_tf32_lets_float32_products_round_to_tf32(float32_flags, precision, tf32):
    float32_flags(not tf32)
    use_float32_arithmetic(precision)
    assert tf32_allowed() == [tf32, tf32]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="TF32 needs a CUDA GPU of compute capability 8.0 or more; none is available here",
)
def test_fp32_convolutions_are_float32_proper_on_the_gpu(float32_flags):
    """After PyTorch's default (TF32: inputs rounded to 10 mantissa bits, float32 keeps
    23), fp32's convolution on the GPU is as close to float64's as float32 allows."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32, 32, dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64)
    exact = torch.nn.functional.conv2d(x, w, padding=1)
    float32_flags(True)  # PyTorch's default for cuDNN
    use_float32_arithmetic("fp32")
    got = torch.nn.functional.conv2d(x.float().cuda(), w.float().cuda(), padding=1)
    assert ((got.double().cpu() - exact).norm() / exact.norm()).item() < 1e-5


def step_each_and_compare_first_two(models, optimizers, x: torch.Tensor, steps: int = 3) -> None:
    """``steps`` SGD steps of each model on one loss; the first two end with equal weights."""
    for _ in range(steps):
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for got, want in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_training_sgd_is_the_papers_update_fused():
    """Momentum 0.9, no weight decay, fixed lr (§3), fused: the parameters after a few steps
    are those of PyTorch's plain SGD loop."""
    from deepcontrol.train import build_optimizer

    torch.manual_seed(0)
    models = [nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)]
    models[1].load_state_dict(models[0].state_dict())
    plain = torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9, foreach=False)
    optimizers = [build_optimizer(compose(["optim.lr=0.1"]).optim, models[0]), plain]
    assert optimizers[0].defaults["fused"] and optimizers[0].defaults["weight_decay"] == 0
    x = torch.randn(2, 3, 8, 8)
    step_each_and_compare_first_two(models, optimizers, x)


def test_lambdas_lr_multiplier_reaches_lambda_alone():
    """``optim.mean_scale_lr_mult`` trains every AGC λ at lr × mult and the rest at lr: the
    step is plain SGD's with those two groups; 0 holds λ at its start; a net without AGC
    refuses it, rather than training as if it were not given."""
    from deepcontrol.nn import AutoGainControl2d
    from deepcontrol.train import build_optimizer

    def net() -> nn.Module:
        torch.manual_seed(0)
        agc = [AutoGainControl2d(4, relu=True), AutoGainControl2d(4, relu=True)]
        # no conv bias: at λ = 1 the mean's subtraction removes it, and its gradient is 0
        convs = [nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 4, 3, bias=False)]
        return nn.Sequential(convs[0], agc[0], convs[1], agc[1])

    x = torch.randn(2, 3, 8, 8)
    models = [net(), net(), net()]
    lambdas = [[p for n, p in m.named_parameters() if n.endswith("mean_scale")] for m in models]
    rest = [[p for n, p in m.named_parameters() if not n.endswith("mean_scale")] for m in models]
    plain = torch.optim.SGD(
        [{"params": rest[1]}, {"params": lambdas[1], "lr": 2.0}], lr=0.1, momentum=0.9
    )
    optimizers = [
        build_optimizer(compose(["optim.lr=0.1", "optim.mean_scale_lr_mult=20"]).optim, models[0]),
        plain,
        build_optimizer(compose(["optim.lr=0.1", "optim.mean_scale_lr_mult=0"]).optim, models[2]),
    ]
    step_each_and_compare_first_two(models, optimizers, x)
    assert all(float((lam.detach() - 1).abs().max()) > 1e-4 for lam in lambdas[0])  # moved
    assert all(torch.equal(lam.detach(), torch.ones(4)) for lam in lambdas[2])
    start = dict(net().named_parameters())
    moved = {name for name, p in models[2].named_parameters() if not torch.equal(p, start[name])}
    assert moved == {name for name in start if not name.endswith("mean_scale")}
    with pytest.raises(ValueError, match=r"mean_scale_lr_mult=20 .* no AGC layer"):
        build_optimizer(compose(["optim.mean_scale_lr_mult=20"]).optim, nn.Conv2d(3, 4, 3))
