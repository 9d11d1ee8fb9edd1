"""Atomic writes: a failed write leaves the previous file intact and no temporary file behind."""

import json

import pytest

from pumit_seg.atomic import atomic_folder, atomic_path, write_json_atomic


def test_success_replaces_the_file_and_keeps_the_extension(tmp_path):
    target = tmp_path / "sub" / "case.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.endswith("case.nii.gz")  # writers that choose the format by extension see the real one
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["case.nii.gz"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert target.stat().st_mode == plain.stat().st_mode  # the usual permissions, not a temp file's 0600


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"old": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half a fi")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_folder_replaces_cleanly_or_not_at_all(tmp_path):
    target = tmp_path / "Dataset001_X"
    with atomic_folder(target) as tmp:
        (tmp_path / tmp / "a.txt").write_text("first")
        (tmp_path / tmp / "stale.txt").write_text("first")
        assert not target.exists()  # nothing appears before the folder is complete
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "stale.txt"]
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp_path / tmp / "a.txt").write_text("second, half done")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset001_X"]  # no temporary folder left
    with atomic_folder(target) as tmp:  # a complete second run: the first run's files do not survive
        (tmp_path / tmp / "a.txt").write_text("second")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "second"
    with atomic_folder(target, keep_existing=True) as tmp:  # update: old files kept, new ones added
        assert (tmp_path / tmp / "a.txt").read_text() == "second"
        (tmp_path / tmp / "b.txt").write_text("added")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset001_X"]


def test_atomic_folder_failure_leaves_no_new_parent(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "raw" / "Dataset002_Y"):
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
