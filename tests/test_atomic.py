"""Outputs appear whole or not at all."""

import pytest

from deepcontrol.atomic import atomic_dir, atomic_file, write_atomic


def test_file_is_replaced_only_when_the_write_succeeds(tmp_path):
    path = tmp_path / "metrics.csv"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_folder_appears_whole_replaces_or_keeps(tmp_path):
    path = tmp_path / "cache"
    with pytest.raises(RuntimeError), atomic_dir(path) as tmp:
        (tmp / "a").write_text("1")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(path) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(path, replace=False) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in path.iterdir()] == ["a"]
    with atomic_dir(path) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in path.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
