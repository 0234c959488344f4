"""`regionmed synth --shard-size`: several shards (what streaming over ranks x workers needs)."""

from __future__ import annotations

from regionmed.apps.cli import main
from regionmed.data.shards import MedRegionDataset, read_manifest


def test_shard_size_splits_the_phantoms_into_several_shards(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["synth", "--out", str(out), "--train", "13", "--test", "2", "--image-size", "64", "--shard-size", "5"]) == 0
    assert len(read_manifest(out)["splits"]["train"]["shards"]) == 3
    assert len(MedRegionDataset(out, "train")) == 13
    assert main(["synth", "--out", str(tmp_path / "x"), "--train", "2", "--test", "1", "--shard-size", "0"]) == 2
    assert "--shard-size must be >= 1" in capsys.readouterr().err
