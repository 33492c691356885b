"""AutoGainControl2d against eq. (1) of the paper and its stated properties (§2)."""

import pytest
import torch

from deepcontrol.nn import AutoGainControl2d


def random_agc(channels: int, dtype: torch.dtype = torch.float32) -> AutoGainControl2d:
    agc = AutoGainControl2d(channels).to(dtype)
    with torch.no_grad():  # away from the 1, 1, 0 initialisation so every term matters
        agc.mean_scale.uniform_(0.0, 2.0)
        agc.weight.uniform_(0.5, 1.5)
        agc.bias.normal_()
    return agc


def reference(y: torch.Tensor, agc: AutoGainControl2d) -> torch.Tensor:
    """Eq. (1) in float64, written out per sample and per filter with loops."""
    y = y.double()
    out = torch.empty_like(y)
    for s in range(y.shape[0]):
        for c in range(y.shape[1]):
            lam, gamma, beta = (
                float(p[c].detach()) for p in (agc.mean_scale, agc.weight, agc.bias)
            )
            out[s, c] = (y[s, c] - lam * y[s, c].mean()) * gamma + beta
    return out


def test_initialisation():
    agc = AutoGainControl2d(5)
    assert agc.mean_scale.tolist() == [1.0] * 5
    assert agc.weight.tolist() == [1.0] * 5
    assert agc.bias.tolist() == [0.0] * 5
    assert AutoGainControl2d(3, mean_scale_init=0.5).mean_scale.tolist() == [0.5] * 3
    assert len(list(agc.buffers())) == 0  # no running statistics


@pytest.mark.parametrize("shape", [(4, 6, 7, 9), (1, 3, 1, 5), (2, 8, 16, 16)])
def test_forward_matches_equation_1(shape):
    torch.manual_seed(0)
    agc = random_agc(shape[1])
    y = torch.randn(shape) * 3 + 2
    torch.testing.assert_close(agc(y).double(), reference(y, agc), rtol=1e-5, atol=1e-5)


def test_no_division_by_std():
    agc = AutoGainControl2d(1)
    y = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    # λ = γ = 1, β = 0: the mean is removed and the amplitude kept.
    assert agc(y).flatten().tolist() == [-15.0, -5.0, 5.0, 15.0]


@pytest.mark.parametrize("background", ["mean", "window", "median"])
def test_gradcheck_float64(background):
    torch.manual_seed(0)
    agc = random_agc(3, torch.float64)
    agc.background, agc.window = background, 3
    # the median's gradient is the mean's by choice, not its own: only its parameters' check
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=background != "median")
    assert torch.autograd.gradcheck(
        lambda y, lam, w, b: torch.func.functional_call(
            agc, {"mean_scale": lam, "weight": w, "bias": b}, (y,)
        ),
        (y, *(p.detach().clone().requires_grad_() for p in agc.parameters())),
    )


def test_train_and_eval_identical():
    torch.manual_seed(0)
    agc = random_agc(4)
    y = torch.randn(3, 4, 5, 6)
    train_out = agc.train()(y)
    eval_out = agc.eval()(y)
    assert torch.equal(train_out, eval_out)


def test_batch_of_one_equals_sample_in_batch():
    torch.manual_seed(0)
    agc = random_agc(4)
    y = torch.randn(5, 4, 6, 6)
    single = agc(y[2:3])
    torch.testing.assert_close(single, agc(y)[2:3], rtol=0, atol=1e-6)
    torch.testing.assert_close(single.double(), reference(y[2:3], agc), rtol=1e-5, atol=1e-5)


def test_no_cross_sample_leakage():
    torch.manual_seed(0)
    agc = random_agc(4)
    y = torch.randn(2, 4, 6, 6, requires_grad=True)
    changed = y.detach().clone()
    changed[1] = torch.randn(4, 6, 6) * 100
    assert torch.equal(agc(y)[0], agc(changed)[0])
    # and no gradient flows from one sample's output to another's input
    agc(y)[0].sum().backward()
    assert torch.count_nonzero(y.grad[1]) == 0


def test_bf16_autocast_keeps_activation_dtype():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    agc = AutoGainControl2d(8)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        out = agc(y)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for p in agc.parameters():  # parameters and their gradients stay float32
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    expected = reference(y.float(), agc)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"AutoGainControl2d\(4\) expects \(N, 4, H, W\)"):
        AutoGainControl2d(4)(torch.randn(1, 3, 2, 2))


# Beyond the paper: the background levels it names for future work


def test_median_background_is_the_median_of_each_sample_and_channel():
    agc = AutoGainControl2d(1, background="median")
    y = torch.tensor([[[[0.0, 1.0, 100.0], [2.0, 3.0, -50.0]]],
                      [[[5.0, 5.0, 5.0], [5.0, 6.0, 9.0]]]])  # fmt: skip
    # medians 1 (the lower of 1 and 2) and 5; λ = γ = 1, β = 0; the outlier does not move it
    expected = torch.cat([y[:1] - 1.0, y[1:] - 5.0])
    torch.testing.assert_close(agc(y), expected)


def test_a_window_covering_the_map_is_the_paper_s_mean_and_one_position_is_itself():
    torch.manual_seed(0)
    y = torch.randn(2, 3, 5, 7) * 3 + 2
    paper = random_agc(3)
    wide = AutoGainControl2d(3, background="window", window=15)
    wide.load_state_dict(paper.state_dict())
    torch.testing.assert_close(wide(y), paper(y), rtol=1e-5, atol=1e-5)
    single = AutoGainControl2d(3, background="window", window=1)
    single.load_state_dict(paper.state_dict())
    lam, gamma, beta = (p.detach().view(1, 3, 1, 1) for p in paper.parameters())
    torch.testing.assert_close(single(y), (1 - lam) * y * gamma + beta)


def test_window_background_is_the_local_mean_inside_the_map():
    agc = AutoGainControl2d(1, background="window", window=3)
    y = torch.arange(12.0).view(1, 1, 3, 4)
    out = agc(y)
    # corner (0, 0) averages the 2×2 inside the map: (0 + 1 + 4 + 5) / 4 = 2.5
    assert out[0, 0, 0, 0] == 0.0 - 2.5
    # centre (1, 1) averages the full 3×3: its mean is y[1, 1] itself, 5
    assert out[0, 0, 1, 1] == 0.0


@pytest.mark.parametrize("window", [1, 5, 9, 21])
def test_window_background_is_one_2d_average_over_the_window(window):
    # on an odd-sized map, with windows narrower and wider than it
    torch.manual_seed(0)
    y = torch.randn(2, 1, 11, 6) * 3 + 2
    mean = torch.nn.functional.avg_pool2d(y, window, 1, window // 2, count_include_pad=False)
    agc = AutoGainControl2d(1, background="window", window=window)
    torch.testing.assert_close(agc(y), y - mean)
    # bf16 activations stay bf16, off by bf16's rounding only
    low = agc(y.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), agc(y.bfloat16().float()), rtol=1e-2, atol=3e-2)


def test_the_median_takes_the_mean_s_gradient():
    torch.manual_seed(0)
    paper = random_agc(3)
    median = AutoGainControl2d(3, background="median")
    median.load_state_dict(paper.state_dict())
    y = torch.randn(2, 3, 4, 5)
    g = torch.randn(2, 3, 4, 5)
    grads = []
    for agc in (paper, median):
        x = y.clone().requires_grad_()
        agc.zero_grad()
        agc(x).backward(g)
        grads.append([x.grad, agc.bias.grad])  # λ's and γ's hold the level, which differs
    for ours, papers in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, papers)


def test_bad_backgrounds_are_named():
    with pytest.raises(ValueError, match="background must be one of mean, median, window"):
        AutoGainControl2d(3, background="mode")
    with pytest.raises(ValueError, match="window must be a positive odd size, got 4"):
        AutoGainControl2d(3, background="window", window=4)
    with pytest.raises(ValueError, match="window applies to background='window' only"):
        AutoGainControl2d(3, window=9)
    assert AutoGainControl2d(3, background="window").window == 9
    forced = AutoGainControl2d(3, relu=True, kernels="triton", background="median")
    with pytest.raises(ValueError, match="fused AGC kernels take the mean only, not the median"):
        forced(torch.randn(1, 3, 2, 2))
