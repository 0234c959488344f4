"""Fixtures for the dataset-builder tests (imported by tests/test_build_*.py).

The real data is found through ``REGIONMED_DATA`` (default ``../shared/data``
beside the repository root). When it is missing the tests FAIL, they do not skip.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionmed.apps import DATA_ENV, data_root
from regionmed.apps.curation.config import BuildConfig, SourceSpec
from regionmed.errors import RegionmedError

SUBSET = 40  # items per public source in the shared small build


def require_data() -> Path:
    try:
        root = data_root()
    except RegionmedError as err:
        pytest.fail(f"{err} (see ../shared/data/README.md)", pytrace=False)
    missing = [n for n in ("slake", "vqa_rad", "covid_cxr") if not (root / n).is_dir()]
    if missing:
        pytest.fail(
            f"shared data not found: {root} lacks {missing}. Set {DATA_ENV} to the folder holding "
            "slake/, vqa_rad/ and covid_cxr/ (see ../shared/data/README.md).",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_data()


def public_config(root: Path, out: Path, limit: int = SUBSET, workers: int = 2) -> BuildConfig:
    return BuildConfig(
        out=str(out),
        workers=workers,
        progress=False,
        sources=[SourceSpec(name, str(root / name), limit=limit) for name in ("slake", "vqa_rad", "covid_cxr")],
    )


@pytest.fixture(scope="session")
def public_build(data_dir, tmp_path_factory):
    """One small build from the first 40 items of each public source (shared by tests)."""
    from regionmed.apps.curation.builder import build

    out = tmp_path_factory.mktemp("public") / "ds"
    cfg = public_config(data_dir, out)
    summary = build(cfg, log=lambda s: None)
    return out, cfg, summary


def read_all_records(root: Path) -> list[dict]:
    from regionmed.data.shards import MedRegionDataset, read_manifest

    out = []
    for split in read_manifest(root)["splits"]:
        ds = MedRegionDataset(root, split)
        out += [ds.record(i) for i in range(len(ds))]
        ds.close()
    return out


def read_rejects(root: Path) -> list[dict]:
    path = Path(root) / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0])) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()
