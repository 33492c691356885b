"""What if memory that every norm holds were cut: the step's peak, counted as before.

Batch 1's memory row asks AGC's peak to be at most 0.8 of BN's, where AGC already keeps no
activation that the no-norm floor does not. ``memory_composition.py`` found that half the
floor's peak is what every norm holds, so only cutting that can move the ratio. This
script applies such cuts to the same eager ``sgd_step`` and counts its peak again, as
``memory_composition.py`` counts it:

- ``copies``: autocast's bf16 copies of the parameters are neither cached through the
  forward (autocast's ``cache_enabled=False``) nor kept for the backward, where they are
  cast again;
- ``optimiser``: each parameter is updated as soon as its gradient is complete, in the
  backward, and its gradient freed then (the fused SGD step, called from a
  post-accumulate-grad hook, finds only that parameter with a gradient);
- ``unpool``: the unpooled inputs of the decoder's convolutions are not kept for the
  backward, where they are unpooled again from the pooled values and indices, which the
  step keeps anyway. (On a CPU SegNet unpools in the activations' dtype, as on CUDA, in
  every row: ``memory_composition.unpooling_as_on_cuda``.)

All are applied from outside the model (saved-tensor hooks, a wrapped unpooling, gradient
hooks) to measure what they would save; none is training code. Before counting, each lever's step
is checked against the plain step: from the same state, the parameters after one step must
be equal bit for bit.

python results/benchmark-h100/memory_levers.py [--batches 1] [--device auto]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Iterator
from unittest import mock

import memory_composition
import torch
from memory_composition import MIB, composition, report, unpooled_by, unpooling_as_on_cuda

import deepcontrol.engine
from deepcontrol.benchmark import Config, Setting, random_batch, trained_parts
from deepcontrol.train import resolve_device

LEVERS = ((), ("copies",), ("unpool",), ("optimiser",), ("copies", "unpool"),
          ("copies", "optimiser"), ("copies", "unpool", "optimiser"))  # fmt: skip


def _cast_of_parameter(tensor: torch.Tensor) -> torch.nn.Parameter | None:
    """The parameter ``tensor`` is autocast's copy of, if it is one."""
    node = tensor.grad_fn
    if type(node).__name__ != "ToCopyBackward0":
        return None
    source = node.next_functions[0][0]
    return getattr(source, "variable", None)


@contextlib.contextmanager
def levers(names: tuple[str, ...]) -> Iterator[None]:
    """Within, ``memory_composition.sgd_step`` runs with the named cuts applied."""
    unpooled = {}  # an unpooling's autograd node: how to unpool again

    def recorded(unpool):
        def unpool_and_record(x, indices, *args, **kwargs):
            out = unpool(x, indices, *args, **kwargs)
            if out.grad_fn is not None:
                unpooled[out.grad_fn] = functools.partial(unpool, x, indices, *args, **kwargs)
            return out

        return unpool_and_record

    def pack(tensor: torch.Tensor) -> tuple:
        if "copies" in names and (parameter := _cast_of_parameter(tensor)) is not None:
            return ("cast", parameter, tensor.dtype)
        if "unpool" in names and (again := unpooled.pop(tensor.grad_fn, None)) is not None:
            return ("unpool", again)  # held from here by what the backward keeps
        return ("kept", tensor)

    def unpack(packed: tuple) -> torch.Tensor:
        if packed[0] == "cast":
            return packed[1].detach().to(packed[2])
        if packed[0] == "unpool":
            with torch.no_grad():
                return packed[1]()
        return packed[1]

    def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, torch.bfloat16, precision == "bf16", cache_enabled=False)

    plain_step, hooked = memory_composition.sgd_step, set()

    def step_in_backward(model, optimizer, *args, **kwargs):
        if model not in hooked:  # the first step of this model: from now on it steps as
            hooked.add(model)  # each gradient is complete, and sgd_step's own step finds none

            def step_now(parameter: torch.nn.Parameter) -> None:
                optimizer.step()
                parameter.grad = None

            for parameter in model.parameters():
                parameter.register_post_accumulate_grad_hook(step_now)
        return plain_step(model, optimizer, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        if "optimiser" in names:
            stack.enter_context(mock.patch.object(memory_composition, "sgd_step", step_in_backward))
        if "copies" in names:
            stack.enter_context(mock.patch.object(deepcontrol.engine, "autocast", autocast))
        if "unpool" in names:
            stack.enter_context(unpooled_by(recorded))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        yield


def check_same_step(setting: Setting, cfg: Config, device: torch.device, names: tuple) -> None:
    """Raise unless one step with the cuts leaves the parameters as the plain step does."""
    batch = random_batch(setting, cfg, device)
    after = []
    for cut in ((), names):
        model, optimizer, loss_fn = trained_parts(setting, device)  # the same, seeded
        # cuDNN's deterministic algorithms, so that on a GPU only a cut can make a difference
        deterministic = torch.backends.cudnn.flags(
            enabled=True, benchmark=False, deterministic=True
        )
        with deterministic, unpooling_as_on_cuda(device), levers(cut):
            memory_composition.sgd_step(model, optimizer, loss_fn, *batch, setting.precision)
        after.append([p.detach().clone() for p in model.parameters()])
    pairs = zip(*after, strict=True)
    for name, (plain, cut) in zip(dict(model.named_parameters()), pairs, strict=True):
        if not torch.equal(plain, cut):
            raise AssertionError(f"with {'+'.join(names)}, {name} differs after one step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = Config()
    print(f"device {device}, torch {torch.__version__}, input {cfg.height}x{cfg.width}, bf16\n")
    for batch in args.batches:
        rows = []
        for names in LEVERS:
            label = " + ".join(names) or "none (the step as it is)"
            peaks = {}
            for norm in ("none", "bn"):
                setting = Setting(norm, batch, "bf16", "eager")
                if names:
                    check_same_step(setting, cfg, device, names)
                with levers(names):
                    live, _ = composition(setting, cfg, device)
                peaks[norm] = live
                print(f"### cut: {label}\n{report(setting, live, None)}", flush=True)
            none, bn = peaks["none"], peaks["bn"]
            peak = {norm: f"{live.peak / MIB:.1f} ({live.peak_at})" for norm, live in peaks.items()}
            ratio = none.peak / bn.peak
            rows.append(f"| {label} | {peak['none']} | {peak['bn']} | {ratio:.3f} |")
        print(f"## batch {batch}: the peaks, MiB (where they fall), and none / BN\n")
        print("| cut | none | BN | none / BN |\n|---|---|---|---|")
        print("\n".join(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
