"""Where the fused bf16 AGC+ReLU and the bf16 reference differ, and which follows eq. (1)
rounded after each op (the spec both claim). Not a test: a one-off measurement."""
import os, sys
import torch
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, "tests")
from test_fused_agc import forward_backward, relative_error, layer  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
names = ["out", "grad y", "grad λ", "grad γ", "grad β"]
cases = [((2, 16, 32, 64), 1, None), ((2, 64, 33, 65), 2, None), ((2, 4, 33, 65), 7, 1.0)]
if dev == "cuda":
    cases.append(((8, 64, 128, 256), 10, None))
for shape, seed, gain in cases:
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(shape, generator=g) + 0.3).to(dev, torch.bfloat16)
    up = torch.randn(shape, generator=g).to(dev, torch.bfloat16)
    if gain is None:
        y = y.contiguous(memory_format=torch.channels_last)
    res = {}
    for kernels in ("triton", "reference"):
        agc = layer(shape[1], kernels).to(dev)
        if gain is not None:
            with torch.no_grad():
                agc.weight.fill_(gain)
                agc.bias.fill_(0.6)
        x = y.clone().requires_grad_(True)
        out = agc(x)
        (out * up).sum().backward()
        res[kernels] = [out, x.grad, agc.mean_scale.grad, agc.weight.grad, agc.bias.grad]
    p = [bf(t.detach()).view(1, -1, 1, 1) for t in (agc.mean_scale, agc.weight, agc.bias)]
    lam, gam, beta = p
    yf = y.float()
    m = bf(yf.mean((2, 3), keepdim=True))
    spec = bf(torch.relu(bf(bf(bf(yf - bf(lam * m)) * gam) + beta)))  # eq. (1), rounded per op
    print(shape, dev, "gain", gain)
    f, r = res["triton"], res["reference"]
    for n, a, b in zip(names, f, r):
        print(f"  {n:7s} fused-vs-ref {relative_error(a, b):.5f}")
    for who, o in (("fused", f[0]), ("ref", r[0])):
        print(f"  {who:5s} out != spec at {(o.float() != spec).sum().item()} of {o.numel()}; "
              f"ReLU mask != spec's at {((o > 0) != (spec > 0)).sum().item()}")
    for who, o, gy in (("fused", f[0], f[1]), ("ref", r[0], r[1])):
        gm = up.double() * (o > 0).double()  # exact grad y given this one's own ReLU mask
        exact = gam.double() * (gm - lam.double() * gm.mean((2, 3), keepdim=True))
        print(f"  {who:5s} grad y vs exact (own mask) {relative_error(gy, exact):.5f}")
    keep = (f[0] > 0) == (r[0] > 0)
    print("  grad y fused-vs-ref where masks agree", round(relative_error(f[1] * keep, r[1] * keep), 5))
