"""The fused AGC+ReLU against the readable reference: values, every gradient, saved memory."""

import pytest
import torch

from deepcontrol.nn import AutoGainControl2d, ConvNormReLU

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def layer(channels: int, fused: bool, seed: int = 0) -> AutoGainControl2d:
    generator = torch.Generator().manual_seed(seed)
    agc = AutoGainControl2d(channels, relu=True, fused=fused)
    with torch.no_grad():  # trained-looking parameters, γ of both signs
        agc.mean_scale.copy_(torch.rand(channels, generator=generator) * 2)
        agc.weight.copy_(torch.randn(channels, generator=generator))
        agc.bias.copy_(torch.randn(channels, generator=generator) * 0.5)
    return agc


def forward_backward(fused: bool, y: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    agc = layer(y.shape[1], fused)
    y = y.clone().requires_grad_(True)
    out = agc(y)
    (out * upstream).sum().backward()
    return [out, y.grad, agc.mean_scale.grad, agc.weight.grad, agc.bias.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (3, 4, 13, 11), (2, 16, 32, 64)])
def test_fused_matches_reference_forward_and_every_gradient(dtype, shape):
    generator = torch.Generator().manual_seed(1)
    y = (torch.randn(shape, generator=generator) + 0.3).to(dtype)
    upstream = torch.randn(shape, generator=generator).to(dtype)
    fused = forward_backward(True, y, upstream)
    reference = forward_backward(False, y, upstream)
    names = ["out", "grad y", "grad λ", "grad γ", "grad β"]
    for name, got, want in zip(names, fused, reference, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert relative_error(got, want) <= TOLERANCE[dtype], (name, relative_error(got, want))


def saved_bytes(module: torch.nn.Module, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward, counting each storage once."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(y)
    return sum(storages.values())


def test_fused_block_keeps_only_what_the_next_conv_keeps():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    activation = 2 * 16 * 32 * 32 * 4  # one float32 (2, 16, 32, 32) map
    blocks = {}
    for fused in (True, False):
        block = ConvNormReLU(8, 16, "agc")
        block[1].fused = fused
        nxt = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        blocks[fused] = saved_bytes(torch.nn.Sequential(block, nxt), x)
    # input of the first conv + its weight + the block output (shared with the next conv)
    inputs = x.numel() * 4 + 16 * 8 * 9 * 4 + 16 * 16 * 9 * 4
    assert blocks[True] - inputs < activation * 1.1  # the output, plus per-channel means
    assert blocks[False] - blocks[True] >= 0.99 * activation  # the reference keeps y - λm too


def test_reference_is_used_off_cuda_and_in_evaluation():
    agc = AutoGainControl2d(4, relu=True)
    y = torch.randn(1, 4, 5, 5, requires_grad=True)
    assert agc(y).grad_fn.name() != "AGCReLUFunctionBackward"
    agc.fused = True
    assert agc(y).grad_fn.name() == "AGCReLUFunctionBackward"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference_on_cuda(dtype):
    generator = torch.Generator().manual_seed(2)
    y = (torch.randn(2, 64, 33, 65, generator=generator) + 0.3).to(dtype).cuda()
    upstream = torch.randn(2, 64, 33, 65, generator=generator).to(dtype).cuda()
    fused = forward_backward(True, y, upstream)
    reference = forward_backward(False, y, upstream)
    for got, want in zip(fused, reference, strict=True):
        assert relative_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.slow
def test_fused_layer_compiles_to_the_same_values():
    from deepcontrol.train import compile_model

    shape = (2, 6, 9, 11)
    generator = torch.Generator().manual_seed(3)
    y, upstream = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    eager = forward_backward(True, y, upstream)
    agc = layer(6, fused=True)
    compiled = compile_model(agc, "default")
    y = y.clone().requires_grad_(True)
    (compiled(y) * upstream).sum().backward()
    got = [y.grad, agc.mean_scale.grad, agc.weight.grad, agc.bias.grad]
    for g, want in zip(got, eager[1:], strict=True):
        assert relative_error(g, want) <= 1e-5
    with pytest.raises(ValueError, match="train.compile must be false or one of"):
        compile_model(agc, "fastest")
