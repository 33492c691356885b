"""Whether the backward's ReLU bits (``triton_agc``, after 8f435db) made the fused AGC faster.

Its backward pass used to read the ReLU output ``out`` to mask the gradient; it now reads a
bit per element that the backward sums write. That is a third fewer bytes in that pass, a
16th of a pass more in the sums (bf16). Not a test and no part of ``make bench``: a one-off
A/B for the next GPU run, against the kernels as they were before, which it loads from a
file::

    git show 8f435db:src/deepcontrol/nn/triton_agc.py > .whl/triton_agc_before.py
    python results/benchmark-h100/kept_bits_ab.py .whl/triton_agc_before.py

For bf16 and fp32 at batches 8 and 1 it runs every SegNet AGC layer's fused forward and
backward as ``scripts/tune_agc_kernels.py --kernels elementwise`` does (captured in a CUDA
graph and replayed, so the kernels' time, not the host's), with each module's kernels, in
turn; checks that both give the same outputs and gradients bit for bit; and prints each
one's ms per step and their ratio. Without a GPU it checks the results only (interpreter).

Kept as the record of H100 run 4 (README, ``run4-kept-bits-ab.txt``), which found the bits
slower in bf16 and had them reverted (576a329). It needs the kernels with the bits: run it
from a checkout of b67a729.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# The tuner first: without a GPU it switches on Triton's interpreter before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tune_agc_kernels as tuner  # noqa: E402
from kernel_instructions import load_kernels  # noqa: E402  (this folder, the script's)

from deepcontrol.benchmark import Config, Setting, agc_inputs  # noqa: E402
from deepcontrol.nn import triton_agc  # noqa: E402


def main() -> None:
    before = load_kernels(sys.argv[1])
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cfg = Config() if gpu else Config(height=32, width=64)
    for precision in ("bf16", "fp32"):
        for batch in (8, 1) if gpu else (1,):
            inputs = agc_inputs(Setting("agc", batch, precision, "eager"), cfg, device)
            results, times = {}, {}
            for name, module in (("before", before), ("now", triton_agc)):
                tuner.kernels = module
                run = tuner.layer_passes(tuner.random_layers(inputs))
                results[name] = run()
                times[name] = tuner.device_ms(run, 20) if gpu else float("nan")
            same = tuner.other_results(lambda r=results["now"]: r, results["before"])
            print(f"{precision} batch {batch}, {len(inputs)} layers: before {times['before']:.3f}"
                  f" ms per step, now {times['now']:.3f} ({times['now'] / times['before']:.3f});"
                  f" results {'bit for bit the same' if not same else 'DIFFER: ' + same}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
