"""The fused AGC+ReLU against the readable reference: values, every gradient, saved memory.

Its Triton kernels run on CUDA where there is a GPU, else under Triton's interpreter
(tests/conftest.py)."""

import pytest
import torch

from deepcontrol.nn import AutoGainControl2d, ConvNormReLU, fused_agc, use_agc_kernels
from deepcontrol.train import compile_model

pytestmark = pytest.mark.skipif(fused_agc.triton_agc is None, reason="Triton is not installed")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def layer(channels: int, kernels: str, seed: int = 0) -> AutoGainControl2d:
    generator = torch.Generator().manual_seed(seed)
    agc = AutoGainControl2d(channels, relu=True, kernels=kernels)
    # Trained-looking parameters, γ of both signs. |γ| stays above 1/4: in bf16 the fused
    # γ gradient recovers y - λm as (out - β)/γ, which loses what is below β's rounding when
    # |γ| ≪ |β| (fused_agc's docstring; test_small_gain_bf16_limit measures it).
    with torch.no_grad():
        sign = torch.randint(0, 2, (channels,), generator=generator) * 2 - 1
        agc.mean_scale.copy_(torch.rand(channels, generator=generator) * 2)
        agc.weight.copy_(sign * (0.25 + 1.75 * torch.rand(channels, generator=generator)))
        agc.bias.copy_(torch.randn(channels, generator=generator) * 0.5)
    return agc


def forward_backward(kernels: str, y: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    agc = layer(y.shape[1], kernels).to(y.device)
    y = y.clone().requires_grad_(True)
    out = agc(y)
    (out * upstream).sum().backward()
    return [out, y.grad, agc.mean_scale.grad, agc.weight.grad, agc.bias.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (3, 4, 13, 11), (2, 16, 32, 64), (2, 80, 5, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_matches_reference_forward_and_every_gradient(dtype, shape, layout):
    generator = torch.Generator().manual_seed(1)
    y = (torch.randn(shape, generator=generator) + 0.3).to(DEVICE, dtype)
    upstream = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    fused = forward_backward("triton", y, upstream)
    reference = forward_backward("reference", y, upstream)
    names = ["out", "grad y", "grad λ", "grad γ", "grad β"]
    for name, got, want in zip(names, fused, reference, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert relative_error(got, want) <= TOLERANCE[dtype], (name, relative_error(got, want))
    if dtype == torch.bfloat16:
        assert_same_rounding(fused[0], reference[0])


def assert_same_rounding(fused: torch.Tensor, reference: torch.Tensor) -> None:
    """In bf16 the fused forward rounds after each operation as the reference does, so its
    output is the same to the bit. An output one unit off flips the ReLU of some values near
    0 and with it their gradients: a rounding the GPU compiler dropped made the gradients
    differ from the reference's by 1 to 5% while the outputs stayed within 0.2%."""
    differ = int((fused != reference).sum())
    assert differ == 0, f"{differ} of {fused.numel()} bf16 outputs differ from the reference"


def map_split_into(n: int, c: int, chunks: int, width: int) -> tuple[int, int, int, int]:
    """The smallest (n, c, H, ``width``) shape whose reduction splits each (sample, channel
    block) into more than ``chunks`` chunks under the settings in force, which the tuner
    (scripts/tune_agc_kernels.py) may have changed; a skip where they never split so many."""
    from deepcontrol.nn import triton_agc

    block_hw, _, c_blocks = triton_agc._blocks(c, triton_agc.SUMS_TILE)

    def split(hw: int) -> int:
        return triton_agc._chunks(n, c_blocks, block_hw, hw)[0]

    most = split(1 << 40)  # the caps on chunks, whatever the map
    if most <= chunks:
        pytest.skip(f"the reduction's settings split a map into at most {most} chunks here")
    h = 1
    while split(h * width) <= chunks:
        h += 1
    return n, c, h, width


@pytest.mark.parametrize("loop", ["chunks", "samples"])
def test_last_program_adds_every_chunk_and_sample(loop):
    """A reduction's last program adds the chunks' partial sums FINISH at a time, and the
    backward's last sample adds the samples BLOCK_N at a time: each loop runs more than once
    here."""
    from deepcontrol.nn import triton_agc

    if loop == "chunks":
        shape = map_split_into(1, 64, triton_agc.FINISH, width=81)
    else:
        shape = (triton_agc.BLOCK_N + 2, 3, 5, 7)
    generator = torch.Generator().manual_seed(8)
    y = (torch.randn(shape, generator=generator) + 0.3).to(DEVICE)
    upstream = torch.randn(shape, generator=generator).to(DEVICE)
    y = y.contiguous(memory_format=torch.channels_last)
    fused = forward_backward("triton", y, upstream)
    reference = forward_backward("reference", y, upstream)
    for name, got, want in zip(["out", "y", "λ", "γ", "β"], fused, reference, strict=True):
        assert relative_error(got, want) <= TOLERANCE[torch.float32], name


@pytest.mark.skipif(torch.cuda.is_available(), reason="reorders Triton's interpreter")
def test_results_do_not_depend_on_which_program_finishes_last(monkeypatch):
    """A GPU finishes a kernel's programs in any order; the interpreter runs them first to
    last, so the last to arrive at a counter is always the highest. Run every program in
    reverse: a kernel that took "last" to mean "highest index", or whose sums depended on
    which program adds them up, would give other values (so would a counter the forward
    left set, as the backward reuses it)."""
    from triton.runtime import interpreter

    from deepcontrol.nn import triton_agc

    # two chunks or more per sample, more samples than the backward's last adds per load
    shape = map_split_into(triton_agc.BLOCK_N + 2, 3, 1, width=35)
    generator = torch.Generator().manual_seed(10)
    y = (torch.randn(shape, generator=generator) + 0.3).contiguous(
        memory_format=torch.channels_last
    )
    upstream = torch.randn(shape, generator=generator)
    in_order = forward_backward("triton", y, upstream)

    builder = interpreter.interpreter_builder
    set_grid_idx = builder.set_grid_idx
    first_programs = []

    def reversed_grid_idx(*index: int) -> None:
        reversed_index = [size - 1 - i for size, i in zip(builder.grid_dim, index, strict=True)]
        if not any(index):
            first_programs.append(reversed_index)
        set_grid_idx(*reversed_index)

    monkeypatch.setattr(builder, "set_grid_idx", reversed_grid_idx)
    reversed_order = forward_backward("triton", y, upstream)
    assert len(first_programs) == 4 and all(any(i) for i in first_programs)  # 4 kernels ran
    for name, got, want in zip(["out", "y", "λ", "γ", "β"], reversed_order, in_order, strict=True):
        assert torch.equal(got, want), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares under Triton's interpreter")
def test_fused_segnet_matches_the_reference_segnet():
    """A whole SegNet in channels_last, whose max-unpoolings hand AGC NCHW gradients, with the
    fused AGC against the reference: the logits and every parameter's gradient. Summation
    order makes the forwards drift apart by about 1e-6 per layer, and a ReLU whose input is
    that close to 0 goes different ways (one in 8192 at one layer, in a run with other data),
    sending its gradient on or not. So gradients agree only to a few percent, where a wrong
    layout or a lost chunk is off by their whole size."""
    from deepcontrol.losses import pixel_cross_entropy
    from deepcontrol.models import SegNet

    results = {}
    for kernels in ("triton", "reference"):
        torch.manual_seed(0)
        model = use_agc_kernels(SegNet(19, norm="agc", width=8), kernels)
        model = model.to(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 32, 64, generator=generator)
        labels = torch.randint(0, 19, (2, 32, 64), generator=generator)
        logits = model(x.contiguous(memory_format=torch.channels_last))
        pixel_cross_entropy(logits, labels).backward()
        results[kernels] = [logits.detach()] + [p.grad for p in model.parameters()]
    fused, reference = results["triton"], results["reference"]
    assert relative_error(fused[0], reference[0]) <= 1e-4
    errors = [relative_error(got, want) for got, want in zip(fused[1:], reference[1:], strict=True)]
    assert len(errors) == 26 + 25 * 3 + 1  # convs, AGC's λ, γ, β, the classifier's bias
    assert max(errors) <= 0.1, max(errors)  # measured: 0.023


def test_counters_are_zero_after_each_kernel():
    """The forward's counters must be zero again for the backward, which reuses them."""
    from deepcontrol.nn import triton_agc

    generator = torch.Generator().manual_seed(9)
    y = torch.randn(3, 5, 9, 40, generator=generator).to(DEVICE)
    lam, gamma, beta = (torch.rand(3, 5, generator=generator) + 0.5).to(DEVICE)
    out, sums, counts = triton_agc.forward(y, lam, gamma, beta)
    assert counts.numel() == 3 * 1 + 1 and not counts.any()
    grads = triton_agc.backward(torch.ones_like(out), out, sums, counts, lam, gamma, beta)
    assert not counts.any()
    again = triton_agc.backward(torch.ones_like(out), out, sums, counts, lam, gamma, beta)
    for first, second in zip(grads, again, strict=True):
        assert torch.equal(first, second)


def test_a_channel_with_zero_gain_gets_no_gain_gradient_and_no_nan():
    generator = torch.Generator().manual_seed(6)
    y = torch.randn(2, 3, 6, 5, generator=generator).to(DEVICE)
    upstream = torch.randn(2, 3, 6, 5, generator=generator).to(DEVICE)
    agc = layer(3, "triton").to(DEVICE)
    with torch.no_grad():
        agc.weight[1] = 0.0  # out = relu(β) there, so y - λm cannot be recovered from it
        agc.bias[1] = 0.5
    y.requires_grad_(True)
    (agc(y) * upstream).sum().backward()
    grads = [y.grad, agc.mean_scale.grad, agc.weight.grad, agc.bias.grad]
    assert all(torch.isfinite(g).all() for g in grads) and agc.weight.grad[1] == 0
    assert float(agc.bias.grad[1]) == pytest.approx(float(upstream[:, 1].sum()), rel=1e-5)


def test_a_nan_spreads_as_in_the_reference():
    """A NaN in a map makes its mean NaN, so the whole map's output and gradients are NaN, and
    its channel's parameter gradients; training's divergence check sees it in the loss. The
    fused backward masks the gradient where ``out <= 0``, which a NaN output is not, as
    torch.relu's backward passes it."""
    generator = torch.Generator().manual_seed(9)
    y = (torch.randn(2, 3, 6, 5, generator=generator) + 0.3).to(DEVICE)
    upstream = torch.randn(2, 3, 6, 5, generator=generator).to(DEVICE)
    y[0, 1, 2, 3] = float("nan")
    fused = forward_backward("triton", y, upstream)
    reference = forward_backward("reference", y, upstream)
    assert fused[0][0, 1].isnan().all() and fused[0][1].isfinite().all()
    for name, got, want in zip(["out", "y", "λ", "γ", "β"], fused, reference, strict=True):
        assert torch.equal(got.isnan(), want.isnan()), name
        assert relative_error(got.nan_to_num(), want.nan_to_num()) <= 1e-5, name


def test_small_gain_bf16_limit():
    """In bf16 a channel with |γ| ≪ |β| keeps too few bits of y - λm in ``out`` for its γ
    gradient: the error grows as ulp(β)/|γ|. The other gradients stay within the bar."""
    generator = torch.Generator().manual_seed(7)
    shape = (2, 4, 33, 65)
    y = (torch.randn(shape, generator=generator) + 0.3).to(DEVICE, torch.bfloat16)
    upstream = torch.randn(shape, generator=generator).to(DEVICE, torch.bfloat16)
    errors = {}
    for gain in (1.0, 0.1, 0.001):
        grads = {}
        for name in ("triton", "reference"):
            agc = layer(4, name).to(DEVICE)
            with torch.no_grad():
                agc.weight.fill_(gain)
                agc.bias.fill_(0.6)
            x = y.clone().requires_grad_(True)
            (agc(x) * upstream).sum().backward()
            grads[name] = [x.grad, agc.mean_scale.grad, agc.weight.grad, agc.bias.grad]
        fused, reference = grads["triton"], grads["reference"]
        errors[gain] = relative_error(fused[2], reference[2])
        for got, want in zip(fused[:2] + fused[3:], reference[:2] + reference[3:], strict=True):
            assert relative_error(got, want) <= TOLERANCE[torch.bfloat16], gain
    # measured: 0.4%, 2% and 88% at γ = 1, 0.1 and 0.001 with β = 0.6
    assert errors[1.0] <= TOLERANCE[torch.bfloat16] < errors[0.001], errors
    assert errors[1.0] < errors[0.1] < errors[0.001], errors


def test_triton_backward_takes_any_memory_layout():
    generator = torch.Generator().manual_seed(5)
    out = torch.randn(2, 6, 5, 7, generator=generator).relu().to(DEVICE)
    grad = torch.randn(2, 6, 7, 5, generator=generator).to(DEVICE).transpose(2, 3)  # not NHWC
    sums = torch.randn(2, 6, generator=generator).to(DEVICE) * 35
    lam, gamma, beta = torch.randn(3, 6, generator=generator).to(DEVICE)
    counts = fused_agc.triton_agc._counters(out)
    got, want = (fused_agc.triton_agc.backward(g, out, sums, counts, lam, gamma, beta)
                 for g in (grad, grad.contiguous()))  # fmt: skip
    for name, g, w in zip(["grad y", "grad λ", "grad γ", "grad β"], got, want, strict=True):
        assert relative_error(g, w) <= 1e-6, name


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
    x = torch.randn(2, 8, 32, 32, device=DEVICE, requires_grad=True)
    activation = 2 * 16 * 32 * 32 * 4  # one float32 (2, 16, 32, 32) map
    blocks = {}
    for name in ("triton", "reference"):
        block = ConvNormReLU(8, 16, "agc")
        block[1].kernels = name
        nxt = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        blocks[name] = saved_bytes(torch.nn.Sequential(block, nxt).to(DEVICE), x)
    # input of the first conv + its weight + the block output (shared with the next conv)
    inputs = x.numel() * 4 + 16 * 8 * 9 * 4 + 16 * 16 * 9 * 4
    assert blocks["triton"] - inputs < activation * 1.1  # the output, plus per-channel means
    assert blocks["reference"] - blocks["triton"] >= 0.99 * activation  # it keeps y - λm too


def test_reference_is_used_off_cuda():
    agc = AutoGainControl2d(4, relu=True)
    y = torch.randn(1, 4, 5, 5, requires_grad=True)
    assert agc(y).grad_fn.name() != "AGCReLUFunctionBackward"
    # Forced, the fused function runs where Triton can: on CUDA, or under its interpreter
    agc.kernels = "triton"
    assert agc.to(DEVICE)(y.to(DEVICE)).grad_fn.name() == "AGCReLUFunctionBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_without_gradients_matches_reference(dtype):
    """Evaluation runs the fused forward too (on CUDA): under no_grad it saves nothing."""
    y = (torch.randn(2, 12, 9, 7, generator=torch.Generator().manual_seed(3)) + 0.3).to(DEVICE)
    y = y.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = (layer(12, kernels).to(DEVICE)(y) for kernels in ("triton", "reference"))
    assert got.grad_fn is None and got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.cuda
def test_auto_runs_the_fused_function_on_cuda_in_training_and_evaluation(monkeypatch):
    calls, forward = [], fused_agc.triton_agc.forward

    def counted(*args):
        calls.append(1)
        return forward(*args)

    monkeypatch.setattr(fused_agc.triton_agc, "forward", counted)
    agc = AutoGainControl2d(8, relu=True).cuda()
    y = torch.randn(2, 8, 4, 4, device="cuda", requires_grad=True)
    assert agc(y).grad_fn.name() == "AGCReLUFunctionBackward"
    with torch.no_grad():
        agc.eval()(y)
    assert len(calls) == 2


def test_unknown_kernels_are_refused_clearly():
    with pytest.raises(ValueError, match="AGC kernels must be one of auto, reference, triton"):
        AutoGainControl2d(4, relu=True, kernels="cuda")
    with pytest.raises(ValueError, match="AGC kernels must be one of auto, reference, triton"):
        use_agc_kernels(ConvNormReLU(3, 4, "agc"), "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference_on_cuda(dtype):
    generator = torch.Generator().manual_seed(2)
    y = (torch.randn(2, 64, 33, 65, generator=generator) + 0.3).to(dtype).cuda()
    upstream = torch.randn(2, 64, 33, 65, generator=generator).to(dtype).cuda()
    y = y.contiguous(memory_format=torch.channels_last)
    fused = forward_backward("triton", y, upstream)
    reference = forward_backward("reference", y, upstream)
    for got, want in zip(fused, reference, strict=True):
        assert relative_error(got, want) <= TOLERANCE[dtype]
    if dtype == torch.bfloat16:
        assert_same_rounding(fused[0], reference[0])


@pytest.mark.cuda
def test_fused_is_repeatable_bit_for_bit_on_cuda():
    """Whichever program of a reduction finishes last adds the partial sums in the same
    order, so repeated steps agree to the bit; a race on the counters would break this."""
    generator = torch.Generator().manual_seed(10)
    shape = (8, 64, 128, 256)  # 128 chunks per (sample, channel block)
    y = (torch.randn(shape, generator=generator) + 0.3).to("cuda", torch.bfloat16)
    upstream = torch.randn(shape, generator=generator).to("cuda", torch.bfloat16)
    y = y.contiguous(memory_format=torch.channels_last)
    first = forward_backward("triton", y, upstream)
    for _ in range(5):
        for got, want in zip(forward_backward("triton", y, upstream), first, strict=True):
            assert torch.equal(got, want)
    reference = forward_backward("reference", y, upstream)
    for got, want in zip(first, reference, strict=True):
        assert relative_error(got, want) <= TOLERANCE[torch.bfloat16]


@pytest.mark.cuda
def test_fused_layer_compiles_on_cuda():
    generator = torch.Generator().manual_seed(4)
    y = (torch.randn(2, 64, 32, 64, generator=generator) + 0.3).cuda()
    upstream = torch.randn(2, 64, 32, 64, generator=generator).cuda()
    eager = forward_backward("triton", y, upstream)
    for mode in ("default", "reduce-overhead"):
        agc = layer(64, "triton").cuda()
        compiled = compile_model(agc, mode)
        for _ in range(3):  # CUDA graphs record on a later call than the first
            x = y.clone().requires_grad_(True)
            agc.zero_grad()
            out = compiled(x)
            (out * upstream).sum().backward()
        got = [out, x.grad, agc.mean_scale.grad, agc.weight.grad, agc.bias.grad]
        for g, want in zip(got, eager, strict=True):
            assert relative_error(g, want) <= 1e-5, mode


def test_unknown_compile_mode_is_refused_clearly():
    with pytest.raises(ValueError, match="train.compile must be false or one of"):
        compile_model(layer(4, "triton"), "fastest")
