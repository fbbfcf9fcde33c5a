"""``atomic_directory(replace=True)``: a folder replaced whole (the gate artifact), or left as it was when writing fails."""

from __future__ import annotations

import pytest

from hf_fastattn._io import atomic_directory


def test_a_new_folder_replaces_the_previous_one_whole(tmp_path):
    target = tmp_path / "gates"
    for files in (["a", "b"], ["b", "c"]):
        with atomic_directory(target, replace=True) as staging:
            assert staging.parent == tmp_path and not staging.name.startswith("gates")
            for name in files:
                (staging / name).write_text(name)
        assert sorted(path.name for path in target.iterdir()) == files  # nothing of the previous folder is left
    assert [path.name for path in tmp_path.iterdir()] == ["gates"]  # nor any staging folder


def test_a_failure_leaves_the_previous_folder_as_it_was(tmp_path):
    target = tmp_path / "gates"
    with atomic_directory(target, replace=True) as staging:
        (staging / "a").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(target, replace=True) as staging:
        (staging / "a").write_text("half")
        raise RuntimeError("disk full")
    assert [path.name for path in tmp_path.iterdir()] == ["gates"]
    assert (target / "a").read_text() == "old"
