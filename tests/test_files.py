"""Files written whole or not at all."""
from __future__ import annotations

import pytest

from cbir.files import written_whole


def test_the_file_appears_only_once_written(tmp_path):
    target = tmp_path / "best.safetensors"
    with written_whole(target) as partial:
        partial.write_bytes(b"new")
        assert partial.suffix == ".safetensors" and not target.exists()
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_write_that_stops_halfway_keeps_the_previous_file(tmp_path, stop):
    target = tmp_path / "accuracy.xlsx"
    target.write_bytes(b"sheets of earlier runs")
    with pytest.raises(stop):
        with written_whole(target) as partial:
            partial.write_bytes(b"half")
            raise stop()
    assert target.read_bytes() == b"sheets of earlier runs"
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy.xlsx"]


def test_two_writers_of_one_output_write_separate_files_and_one_wins_whole(tmp_path):
    target = tmp_path / "results.json"
    with written_whole(target) as first, written_whole(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the last to finish replaced the other, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_the_file_gets_the_permissions_open_would_give(tmp_path):
    import os

    target = tmp_path / "checkpoint.safetensors"
    with written_whole(target) as partial:
        partial.write_bytes(b"weights")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_data_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    import os

    from cbir import files

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda handle: synced.append(os.readlink(f"/proc/self/fd/{handle}"))
                        or real_fsync(handle))
    target = tmp_path / "log.csv"
    with written_whole(target) as partial:
        partial.write_text("epoch,loss\n")
    assert synced[0].endswith(".partial.csv") and synced[1] == str(tmp_path)
