"""Shared fixtures: a tiny synthetic Cityscapes, composed configs, the real data in ../shared."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if not torch.cuda.is_available():
    # Off CUDA, Triton kernels run only under Triton's interpreter, which has to be chosen
    # before Triton is first imported (deepcontrol.nn imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deepcontrol.config import compose
from deepcontrol.data.synthetic import write_synthetic_cityscapes

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPCONTROL_SHARED", REPO.parent / "shared")) / "data"
CAMVID = SHARED_DATA / "camvid"
CITYSCAPES_SAMPLE = SHARED_DATA / "cityscapes-sample"


# The tests' synthetic Cityscapes: 16 train, 8 val frames at 128×256
SYNTHETIC = {"num_train": 16, "num_val": 8, "height": 128, "width": 256, "seed": 0}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' synthetic Cityscapes (``SYNTHETIC``), written once."""
    root = tmp_path_factory.mktemp("synthetic") / "cityscapes"
    return write_synthetic_cityscapes(root, **SYNTHETIC)


TF32_FLAGS = (torch.backends.cudnn, torch.backends.cuda.matmul)  # cuDNN's and cuBLAS's


def tf32_allowed() -> list[bool]:
    """Whether each of ``TF32_FLAGS`` lets float32 products round to TF32."""
    return [flags.allow_tf32 for flags in TF32_FLAGS]


@pytest.fixture
def float32_flags() -> Iterator[Callable[[bool], None]]:
    """Sets all ``TF32_FLAGS`` to one value; the process's are restored after the test."""
    before = tf32_allowed()

    def allow(tf32: bool) -> None:
        for flags in TF32_FLAGS:
            flags.allow_tf32 = tf32

    yield allow
    for flags, allowed in zip(TF32_FLAGS, before, strict=True):
        flags.allow_tf32 = allowed


@pytest.fixture
def compile_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """``torch.compile`` with AOT autograd's eager backend in place of inductor, whose C++
    build takes a minute a graph on this CPU: it traces the model as inductor would receive
    it, then runs the same ATen ops as eager. Returns, per graph compiled, whether its
    shapes are dynamic."""
    from torch._dynamo.backends.debugging import aot_eager

    real_compile, dynamic = torch.compile, []

    def recording(graph, example_inputs):
        dynamic.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return aot_eager(graph, example_inputs)

    def compile_with_stand_in(model, **options):
        return real_compile(model, **{**options, "mode": None, "backend": recording})

    monkeypatch.setattr(torch, "compile", compile_with_stand_in)
    yield dynamic
    torch._dynamo.reset()


class AtenCalls(TorchDispatchMode):
    """Records every ATen op run under it: its name and the device types of its tensor
    arguments and of its results. A read of a tensor's value on the host (``.item()``,
    ``float()``, ``bool()``) shows as ``_local_scalar_dense``; ``.tolist()`` and ops whose
    result's size depends on values (``nonzero``, a boolean mask), which on a GPU wait for it
    too, do not."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[str], set[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.__name__, _devices((args, kwargs)), _devices(out)))
        return out

    def mark(self, name: str) -> None:
        """A call named ``name`` with no tensors, to tell where the ops around it ran."""
        self.calls.append((name, set(), set()))

    def crossings(self, source: str, target: str) -> list[str]:
        """The ops that took tensors on ``source`` and made ones on ``target``: copies."""
        return [name for name, takes, makes in self.calls if source in takes and target in makes]


def _devices(tree: object) -> set[str]:
    return {t.device.type for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def small_agc_inputs() -> list[torch.Tensor]:
    """Two AGC inputs as training feeds them (bf16, channels_last), on CUDA where there is
    one: two samples whose maps make several chunks each, and one sample whose 80 channels
    make two blocks."""
    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [(torch.randn(shape, generator=generator) + 0.3).to(device, torch.bfloat16)
            .contiguous(memory_format=torch.channels_last)
            for shape in ((2, 16, 24, 40), (1, 80, 9, 7))]  # fmt: skip


def synthetic_overrides(root: Path) -> list[str]:
    """Overrides for the tests' synthetic data (``SYNTHETIC``) at ``root``."""
    settings = (f"data.synthetic.{key}={value}" for key, value in SYNTHETIC.items())
    return ["data=synthetic", f"data.root={root}", *settings]


def tiny_overrides(root: Path, cache: Path) -> list[str]:
    """Overrides for the synthetic data (``SYNTHETIC``, at ``root``) resized to 32×64, on the
    CPU, no W&B, and the network at 1/4 width (1/16 the parameters): the code under test is
    the same, and a full-width SegNet's checkpoints (350 MB per run) would fill a CI
    machine's disk."""
    return [
        *synthetic_overrides(root),
        f"data.cache_dir={cache}",
        "data.height=32",
        "data.width=64",
        "device=cpu",
        "logger=none",
        "train.progress=false",
        "model.width=16",
    ]


def tiny_config(root: Path, cache: Path, *overrides: str) -> DictConfig:
    """The real config with :func:`tiny_overrides`, for two epochs."""
    return compose([*tiny_overrides(root, cache), "epochs=2", *overrides])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
