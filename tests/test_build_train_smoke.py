"""A short training run on a dataset built from SLAKE + VQA-RAD + the chest radiographs."""

from __future__ import annotations

import math

from conftest import tiny_run_config
from conftest_build import data_dir, public_build  # noqa: F401


def test_train_smoke_on_built_public_data(public_build, tmp_path):  # noqa: F811
    from regionmed.apps.train.trainer import train

    out, _, summary = public_build
    assert summary.built > 100
    cfg = tiny_run_config(str(out), str(tmp_path / "run"), steps=(2, 2), batch_size=8)
    result = train(cfg, progress=False)
    assert result["steps"] == 4
    final = result["final_losses"]
    assert {"region", "hard_negative"} <= set(final)  # the built regions and negatives were used
    losses = [v for _, v in _flatten(final) if isinstance(v, (int, float))]
    assert losses and all(math.isfinite(v) for v in losses)


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj
