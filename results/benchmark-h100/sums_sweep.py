"""One-off: the AGC reduction (_sums_kernel) over SegNet's 25 real AGC inputs at batch 8,
bf16, channels_last, 256x512, per launch configuration (TILE, PROGRAMS, num_warps).
Prints ms per step (forward sums + backward sums) and GB/s. Its CUDA events also time the
host (README.md); scripts/tune_agc_kernels.py times the kernels alone."""
import itertools, statistics, sys, time
import torch
from deepcontrol.benchmark import build
from deepcontrol.nn import AutoGainControl2d, triton_agc as T

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
batch, h, w = (8, 256, 512) if dev.type == "cuda" else (1, 32, 64)
model = build("agc", dev)
ys = []
hooks = [m.register_forward_hook(lambda m, i, o: ys.append(i[0].detach()))
         for m in model.modules() if isinstance(m, AutoGainControl2d)]
x = torch.randn(batch, 3, h, w, device=dev).contiguous(memory_format=torch.channels_last)
with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16):
    model(x)
for hk in hooks:
    hk.remove()
layers = []
for y in ys:
    y = y.to(torch.bfloat16)
    c = y.shape[1]
    p = [torch.rand(c, device=dev) + 0.5 for _ in range(3)]
    out, sums, counts = T.forward(y, *p)
    g = torch.randn_like(out)  # the 4 after max-unpooling arrive NCHW; here all are NHWC
    layers.append((y, out, sums, g, p))
nbytes = sum(3 * y.numel() * 2 for y, *_ in layers)  # forward reads y; backward g and out
print(f"{len(layers)} AGC inputs, {nbytes / 1e9:.3f} GB read per step by the sums", flush=True)

real_kernel = T._sums_kernel


class Warps:  # the kernel launched with another num_warps
    def __init__(self, warps):
        self.warps = warps

    def __getitem__(self, grid):
        launch = real_kernel[grid]
        return lambda *a, **kw: launch(*a, **{**kw, "num_warps": self.warps})


def step():
    for y, out, sums, g, p in layers:
        st = T._strides(y)
        counts = T._counters(y)
        T._sums(y, st, counts)
        grads = tuple(torch.empty_like(q) for q in p)
        T._sums(g, st, counts, out, p[2], sums, p[1], grads)


def ms(reps):
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); step(); b.record(); b.synchronize(); times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter(); step(); times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


configs = [(4096, 1024, 256, 8)]  # the committed one first
configs += [c for c in itertools.product((2048, 4096, 8192, 16384), (1024, 4096), (256, 1024), (4, 8))
            if c not in configs]
if dev.type != "cuda":
    configs = configs[:2]
reference = None
for tile, programs, max_chunks, warps in configs:
    T.TILE, T.PROGRAMS, T.MAX_CHUNKS, T._sums_kernel = tile, programs, max_chunks, Warps(warps)
    try:
        ms(2)  # compile
        t = ms(15 if dev.type == "cuda" else 1)
        print(f"TILE {tile:5d} PROGRAMS {programs:4d} MAX_CHUNKS {max_chunks:4d} warps {warps}: "
              f"{t:7.3f} ms/step {nbytes / t / 1e6:7.0f} GB/s", flush=True)
    except Exception as e:
        print(f"TILE {tile} PROGRAMS {programs} MAX_CHUNKS {max_chunks} warps {warps}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
