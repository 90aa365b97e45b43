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
