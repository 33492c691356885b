"""results/benchmark-h100/compile_cache.py: a compile cache packed on one machine comes back
whole on another, in parts small enough to travel, or not at all."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results" / "benchmark-h100"))
import compile_cache  # noqa: E402

KIB = 1024


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def fake_cache(root: Path) -> None:
    """What Inductor leaves: compiled graphs, autograd pairs, generated code, Triton's own
    cache and lock files; random bytes, which xz cannot shrink, so the parts are many."""
    for name, size in [("fxgraph/ab/cd/entry", 6 * KIB), ("aotautograd/ef/entry", 2 * KIB),
                       ("3e/c3eabc.py", 1 * KIB), ("triton/0/KH/kernel.cubin", 4 * KIB),
                       ("locks/3e.lock", 0)]:  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))


def test_a_packed_cache_unpacks_whole_elsewhere_but_tritons_own_cache(
    tmp_path, monkeypatch, capsys
):
    here, there, parts = tmp_path / "here", tmp_path / "there", tmp_path / "out"
    fake_cache(here)
    parts.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(here))
    written = compile_cache.pack(parts, limit_mib=1, part_mib=4 * KIB / compile_cache.MIB)
    assert [p.name for p in written] == [
        f"inductor-cache.tar.xz.{i:02d}" for i in range(len(written))
    ]
    assert len(written) >= 2 and all(p.stat().st_size <= 4 * KIB for p in written)
    assert sorted(os.listdir(parts)) == [p.name for p in written]  # no temporary file left
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(there))
    assert compile_cache.unpack(parts) == there
    expected = {k: v for k, v in tree(here).items() if k.split("/")[0] not in ("triton", "locks")}
    assert tree(there) == expected and "fxgraph/ab/cd/entry" in expected
    log = capsys.readouterr().out
    assert "triton/ 0.0 MiB in 1 files" in log and "packed: " in log


def test_a_cache_over_the_limit_leaves_no_part(tmp_path, monkeypatch, capsys):
    fake_cache(tmp_path / "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "out").mkdir()
    assert compile_cache.pack(tmp_path / "out", limit_mib=4 * KIB / compile_cache.MIB,
                              part_mib=15) == []  # fmt: skip
    assert os.listdir(tmp_path / "out") == []
    assert "not packed" in capsys.readouterr().out


def test_bad_folders_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="holds no fxgraph"):
        compile_cache.pack(tmp_path, limit_mib=46, part_mib=15)
    with pytest.raises(SystemExit, match=f"{tmp_path} holds no inductor-cache"):
        compile_cache.unpack(tmp_path)
    with pytest.raises(SystemExit, match="is not a folder"):
        compile_cache.main(["pack", str(tmp_path / "missing")])
    fake_cache(tmp_path / "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "inductor-cache.tar.xz.00").write_bytes(b"old")
    with pytest.raises(SystemExit, match="already holds"):
        compile_cache.pack(tmp_path, limit_mib=46, part_mib=15)


def test_parts_that_are_no_archive_are_named_not_a_broken_pipe(tmp_path, monkeypatch):
    """A part that is not what pack wrote (2 MiB of noise, more than a pipe holds, so tar
    stops reading before it is all written) fails with the folders named."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "inductor-cache.tar.xz.00").write_bytes(os.urandom(2 * 1024 * KIB))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="tar could not extract .* from .*parts into .*cache"):
        compile_cache.unpack(tmp_path / "parts")
