"""Carries torch.compile's on-disk caches from one GPU session's machine to the next one's.

Every GPU session starts on a fresh machine, where each compiled setting of ``make bench``
compiles from nothing: 9 to 104 s each on the H100 (runs 6 and 7), most of a lease. Inductor
keeps what it compiles on disk (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_$USER``): ``fxgraph/`` holds each compiled graph, with its Triton
kernels bundled in, ``aotautograd/`` each forward and backward pair, and two-letter folders
the generated code (on a CPU, its compiled C++). Found there, a graph skips Inductor's
work. The cache's keys name the torch and Triton versions, the device and the code
compiled, so an entry that does not fit is not used, never wrongly used.

- ``pack DEST``: the cache but ``triton/`` (Triton's own cache, whose kernels ``fxgraph/``
  bundles) and ``locks/``, as ``DEST/inductor-cache.tar.xz.NN``, parts of at most
  ``--part-mib`` (a file that comes back from the device machine is at most 16 MiB, and at
  most 8 come back), all of them at most ``--limit-mib`` (what a later call can carry
  beside the working tree and the wheels, 64 MiB in all); over that, no part is written.
  It prints the cache's folders' sizes either way.
- ``unpack SRC``: the parts in ``SRC`` back into the cache dir, before ``make bench``.

Not part of ``make bench``; it changes no measurement, only the compile time around them.

python results/benchmark-h100/compile_cache.py pack $OUT
python results/benchmark-h100/compile_cache.py unpack .compile-cache
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
from pathlib import Path

from torch._inductor.runtime.cache_dir_utils import cache_dir

from deepcontrol.atomic import atomic_file

LEFT_OUT = ("triton", "locks")  # Triton's cache, which fxgraph/ bundles; lock files
NAME = "inductor-cache.tar.xz"
MIB = 1 << 20


def folder_sizes(root: Path) -> dict[str, tuple[int, int]]:
    """Each top-level entry of ``root``, folder or file: its bytes and files."""
    sizes: dict[str, tuple[int, int]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            top = path.relative_to(root).parts[0]
            size, files = sizes.get(top, (0, 0))
            sizes[top] = (size + path.stat().st_size, files + 1)
    return dict(sorted(sizes.items(), key=lambda item: -item[1][0]))


def sized(sizes: dict[str, tuple[int, int]], top: str) -> str:
    """``top``'s entry of ``folder_sizes``, for the log."""
    size, files = sizes.get(top, (0, 0))
    return f"{top}/ {size / MIB:.1f} MiB in {files} files"


def parts(folder: Path) -> list[Path]:
    """The packed parts in ``folder``, in order."""
    return sorted(folder.glob(f"{NAME}.[0-9][0-9]"))


def pack(dest: Path, limit_mib: float, part_mib: float) -> list[Path]:
    """The cache but ``LEFT_OUT``, xz-compressed, split into ``dest``; none over the limit."""
    root = Path(cache_dir())
    sizes = folder_sizes(root)
    print(
        f"{root}: " + ", ".join(sized(sizes, top) for top in ("fxgraph", "aotautograd", "triton"))
    )
    present = sorted(top for top in sizes if top not in LEFT_OUT)
    if "fxgraph" not in present:
        raise SystemExit(f"{root} holds no fxgraph/: Inductor compiled nothing here")
    print(f"to pack: {sum(sizes[top][0] for top in present) / MIB:.1f} MiB")
    if parts(dest):
        raise SystemExit(f"{dest} already holds {NAME} parts: pack into an empty folder")
    whole = dest / f".{NAME}.tmp"
    try:
        with whole.open("wb") as out:  # many threads, a fast preset: device time is the cost
            try:
                tar = subprocess.Popen(["tar", "-C", str(root), "-cf", "-", *present],
                                       stdout=subprocess.PIPE)  # fmt: skip
                xz = subprocess.run(["xz", "-T0", "-1"], stdin=tar.stdout, stdout=out)
            except FileNotFoundError as missing:
                raise SystemExit(f"pack needs tar and xz on PATH: {missing}") from None
            tar.stdout.close()
            if tar.wait() or xz.returncode:
                raise SystemExit(f"tar or xz failed packing {root}")
        packed = whole.stat().st_size
        if packed > limit_mib * MIB:
            print(
                f"not packed: {packed / MIB:.1f} MiB compressed, over the limit of {limit_mib} MiB"
            )
            return []
        written, step = [], int(part_mib * MIB)
        with whole.open("rb") as source:
            while chunk := source.read(step):
                part = dest / f"{NAME}.{len(written):02d}"
                with atomic_file(part) as temporary:  # a killed pack leaves no cut part
                    temporary.write_bytes(chunk)
                written.append(part)
    finally:  # the whole archive is only the parts' source
        whole.unlink(missing_ok=True)
    print(f"packed: {packed / MIB:.1f} MiB in {len(written)} parts")
    return written


def unpack(src: Path) -> Path:
    """The parts in ``src`` extracted into the cache dir, which is returned."""
    found = parts(src)
    if not found:
        raise SystemExit(f"{src} holds no {NAME}.NN parts (compile_cache.py pack writes them)")
    root = Path(cache_dir())
    tar = subprocess.Popen(["tar", "-C", str(root), "-xJf", "-"], stdin=subprocess.PIPE)
    with contextlib.suppress(BrokenPipeError):  # tar stopped reading: its status says why
        for part in found:
            tar.stdin.write(part.read_bytes())
        tar.stdin.close()
    if tar.wait():
        raise SystemExit(f"tar could not extract {NAME} from {src} into {root}")
    sizes = folder_sizes(root)
    print(f"unpacked {len(found)} parts into {root}: {sized(sizes, 'fxgraph')}, "
          f"{sized(sizes, 'aotautograd')}")  # fmt: skip
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="the cache into DEST's parts")
    packing.add_argument("dest", type=Path)
    packing.add_argument("--limit-mib", type=float, default=45.0)
    packing.add_argument("--part-mib", type=float, default=15.0)
    unpacking = verbs.add_parser("unpack", help="SRC's parts into the cache")
    unpacking.add_argument("src", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        if not args.dest.is_dir():
            raise SystemExit(f"pack: {args.dest} is not a folder")
        pack(args.dest, args.limit_mib, args.part_mib)
    else:
        unpack(args.src)


if __name__ == "__main__":
    main()
