"""Machine instructions per element of the fused AGC's backward kernels for sm_90, with the
ReLU bits (``triton_agc``) and without them (the kernels of 8f435db, loaded from a file),
compiled ahead of time as tests/test_triton_codegen.py compiles them: no GPU needed.

    git show 8f435db:src/deepcontrol/nn/triton_agc.py > .whl/triton_agc_before.py
    python results/benchmark-h100/kernel_instructions.py .whl/triton_agc_before.py

For a 64×64 tile of bf16 SegNet activations, as each kernel is launched (its committed
warps): the backward pass's instructions, and the instructions of the backward sums' main
loop, each over the elements one thread handles. Then the kernels with the bits compiled
at every channel-block width the CUDA tests use. Run it without TRITON_INTERPRET.

Kept as the record of ``kernel-instructions.txt``. The bits were reverted after H100 run 4
timed them (576a329), so it runs only from a checkout of b67a729, with that commit's
``tests/test_triton_codegen.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_triton_codegen as codegen  # noqa: E402

from deepcontrol.nn import triton_agc  # noqa: E402

TILE = {"BLOCK_HW": 64, "BLOCK_C": 64}


def load_kernels(path: str):
    """The fused AGC's kernels as another commit has them, from its ``triton_agc.py`` at
    ``path``."""
    spec = importlib.util.spec_from_file_location("triton_agc_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_bits(kernel, constants: dict) -> dict:
    """``constants``, with the bits' width where ``kernel`` takes it (the kernels before do not)."""
    bits = triton_agc._bits_per_word(constants["BLOCK_C"])
    return constants | ({"BITS": bits} if "BITS" in kernel.arg_names else {})


def per_element(module) -> str:
    sums = module._sums_kernel
    sums_constants = TILE | {"BLOCK_N": module.BLOCK_N, "FINISH": module.FINISH, "GRAD": True}
    compiled = codegen.compile_for_sm90(sums, with_bits(sums, sums_constants),
                                        num_warps=module.SUMS_WARPS)[0]  # fmt: skip
    sums_loop = codegen.largest_loop(compiled.asm["cubin"]) / (64 * 64 / (32 * module.SUMS_WARPS))
    grad = module._agc_relu_grad_kernel
    warps = module.ELEMENTWISE_WARPS
    compiled = codegen.compile_for_sm90(grad, with_bits(grad, TILE), num_warps=warps)[0]
    grad_pass = codegen.machine_instructions(compiled.asm["cubin"]) / (64 * 64 / (32 * warps))
    return (f"backward pass {grad_pass:.1f} instructions per element ({warps} warps); "
            f"backward sums' loop {sums_loop:.1f} ({module.SUMS_WARPS} warps)")  # fmt: skip


def main() -> None:
    print(f"before: {per_element(load_kernels(sys.argv[1]))}")
    print(f"now:    {per_element(triton_agc)}")
    for channels in (1, 2, 3, 5, 12, 16, 33, 64, 80):
        block_hw, block_c, _ = triton_agc._blocks(channels)
        sums_hw = triton_agc._blocks(channels, triton_agc.SUMS_TILE)[0]
        bits = triton_agc._bits_per_word(block_c)
        sums = {"BLOCK_HW": sums_hw, "BLOCK_C": block_c, "BLOCK_N": triton_agc.BLOCK_N,
                "FINISH": triton_agc.FINISH, "BITS": bits}  # fmt: skip
        for constants, kernel, warps in (
            (sums | {"GRAD": True}, triton_agc._sums_kernel, triton_agc.SUMS_WARPS),
            (sums | {"GRAD": False, "BITS": 1}, triton_agc._sums_kernel, triton_agc.SUMS_WARPS),
            ({"BLOCK_HW": block_hw, "BLOCK_C": block_c, "BITS": bits},
             triton_agc._agc_relu_grad_kernel, triton_agc.ELEMENTWISE_WARPS),
        ):  # fmt: skip
            codegen.compile_for_sm90(kernel, constants, num_warps=warps)
    print("with the bits, every kernel compiles at C = 1, 2, 3, 5, 12, 16, 33, 64, 80")


if __name__ == "__main__":
    main()
