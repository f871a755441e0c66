"""Directories written whole or not at all (jaxlora/fileio.py), and output paths checked before any work."""

import pytest

from jaxlora.fileio import atomic_directory, check_directory_path


def test_a_new_directory_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no temporary left behind
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("whole")
    assert (target / "weights").read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replacing_keeps_what_the_new_content_lacks_and_keep_accepts(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "weights").write_text("old")
    (target / "tokenizer.json").write_text("tok")
    (target / "stale.bin").write_text("x")
    (target / "sub").mkdir()
    (target / "sub" / "a").write_text("a")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("new")
            raise RuntimeError
    assert (target / "weights").read_text() == "old"  # a failed replacement leaves the old content whole
    with atomic_directory(target, keep=lambda name: name != "stale.bin") as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["sub", "tokenizer.json", "weights"]
    assert (target / "weights").read_text() == "new" and (target / "sub" / "a").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match=r"output directory .*/f is a file; give a directory path"):
        check_directory_path(tmp_path / "f")
    with pytest.raises(NotADirectoryError, match=r"--out .*/f/x cannot be created: .*/f is a file"):
        check_directory_path(tmp_path / "f" / "x", "--out")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "f"):
            pass
    assert check_directory_path(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
