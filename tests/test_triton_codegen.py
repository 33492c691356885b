"""The AGC Triton kernels compile for an H100 (sm_90), with no GPU needed.

The CPU tests run the kernels under Triton's interpreter, which checks their arithmetic but
not Triton's GPU code generation. This compiles them ahead of time for sm_90, with the
specialisation Triton's JIT gives a channels_last bf16 SegNet activation (unit channel
stride, 16-divisible pointers and sizes), and reads the PTX and ptxas's report: it must
compile, spill no register, and move data in 16-byte vectors. Run as a script (without
``TRITON_INTERPRET``, which the test suite sets) it prints the report as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

N, C, HW = 8, 64, 256 * 512  # SegNet's first layer at batch 8, channels_last
STRIDES = {"sn": HW * C, "shw": C, "sc": 1}
ACTIVATION_POINTERS = {"a_ptr", "out_ptr", "y_ptr", "g_ptr", "grad_ptr"}  # bf16; others fp32


def compile_report() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepcontrol.nn import triton_agc

    ptxas = Path(triton.__path__[0]) / "backends" / "nvidia" / "bin" / "ptxas"
    values = {"N": N, "C": C, "HW": HW, "rows": 1024}
    for prefix in ("a_", "o_", "y_", "g_", "r_"):
        values |= {prefix + k: v for k, v in STRIDES.items()}
    tiles = {"BLOCK_HW": 64, "BLOCK_C": 64}
    kernels = {
        "partial sums": (triton_agc._partial_sums_kernel, tiles | {"GRAD": False}),
        "partial sums, grad": (triton_agc._partial_sums_kernel, tiles | {"GRAD": True}),
        "agc relu": (triton_agc._agc_relu_kernel, tiles),
        "agc relu, grad": (triton_agc._agc_relu_grad_kernel, tiles),
        "parameter grads": (triton_agc._param_grads_kernel, {"BLOCK_C": 64}),
    }  # fmt: skip
    report = {}
    for label, (kernel, constants) in kernels.items():
        signature, attrs, constexprs = {}, {}, dict(constants)
        for i, name in enumerate(kernel.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*bf16" if name in ACTIVATION_POINTERS else "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif values[name] == 1:  # Triton's JIT makes arguments equal to 1 constants
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if values[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 8})  # fmt: skip
        ptx = compiled.asm["ptx"]
        ptx_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"agc-{os.getpid()}.ptx"
        ptx_file.write_text(ptx)
        ptxas_info = subprocess.run(
            [str(ptxas), "-v", "-arch=sm_90a", str(ptx_file), "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
        ptx_file.unlink()
        report[label] = {
            "loads": sorted({line.split()[1] for line in ptx.splitlines() if "ld.global" in line}),
            "stores": sorted({line.split()[1] for line in ptx.splitlines()
                              if "st.global" in line}),
            "ptxas": " ".join(line.split(":", 1)[-1].strip()
                              for line in ptxas_info.splitlines() if "spill" in line),
        }  # fmt: skip
    return report


def test_kernels_compile_for_sm90_with_vector_loads_and_no_spills():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__path__[0]) / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert len(report) == 5
    for kernel, found in report.items():
        assert "0 bytes spill stores, 0 bytes spill loads" in found["ptxas"], kernel
    # the passes over activations move 16 bytes (8 bf16) per load and store
    for kernel in ("partial sums", "partial sums, grad", "agc relu", "agc relu, grad"):
        assert "ld.global.v4.b32" in report[kernel]["loads"], kernel
    for kernel in ("agc relu", "agc relu, grad"):
        assert report[kernel]["stores"] == ["st.global.v4.b32"], kernel


if __name__ == "__main__":
    print(json.dumps(compile_report()))
