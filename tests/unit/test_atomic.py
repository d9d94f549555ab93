import pytest

from rugpt.atomic import atomic_write_dir, atomic_write_text


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_write_dir(target) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_write_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_folder_write_replaces_and_text_write_is_whole(tmp_path):
    target = tmp_path / "ckpt"
    for content in ("one", "two"):
        with atomic_write_dir(target) as tmp:
            (tmp / "a.txt").write_text(content)
    assert (target / "a.txt").read_text() == "two"
    atomic_write_text(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
