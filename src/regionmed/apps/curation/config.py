"""The build configuration: typed dataclasses loaded from YAML.

Example (``regionmed build --config build.yaml``)::

    out: runs/medregion-public
    workers: 2
    sources:
      - {name: slake, root: ../shared/data/slake}
      - {name: vqa_rad, root: ../shared/data/vqa_rad, limit: 100}
      - {name: covid_cxr, root: ../shared/data/covid_cxr}
      - name: generic
        root: /data/export
        options: {table: reports.csv, coco: boxes.json, modality: xray, body: chest}
    proposer: {name: annotation, fallback: unsupervised}
    captions: {negatives_per_region: 3, laterality: {xray: radiological, default: radiological}}
    split: {train: 0.8, val: 0.1, test: 0.1, near_dup_threshold: 32}
    shards: {max_count: 1000, max_size: 256000000}
    image: {max_pixels: 40000000, max_side: null}

A key that is not a field is an error naming the field and the file; so is a
value of the wrong type. Relative source roots are resolved against the config
file's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regionmed.apps.curation.captions import RULES, CaptionConfig
from regionmed.apps.curation.images import NEAR_DUP_THRESHOLD
from regionmed.apps.curation.proposers import ProposerConfig
from regionmed.config import ConfigError, load_yaml_config  # one typed-config loader for the project


@dataclass
class SourceSpec:
    name: str
    root: str
    limit: int | None = None
    repeat: int = 1
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    near_dup_threshold: int = NEAR_DUP_THRESHOLD  # max Hamming distance of the 256-bit perceptual hashes (-1: off)
    salt: str = "regionmed-split-v1"


@dataclass
class ShardConfig:
    max_count: int = 1000
    max_size: int = 256_000_000


@dataclass
class ImageConfig:
    max_pixels: int = 40_000_000
    max_side: int | None = None
    dicom_window: str = "auto"  # "auto" (VOI LUT / window) or "minmax"


@dataclass
class BuildConfig:
    out: str = ""
    sources: list[SourceSpec] = field(default_factory=list)
    workers: int = 2
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    require_regions: bool = False
    chunksize: int = 4
    keep_staging: bool = False
    progress: bool = True

    # fields that do not change the output (left out of the config hash)
    _RUNTIME = ("out", "workers", "chunksize", "keep_staging", "progress")

    def config_hash(self) -> str:
        data = dataclasses.asdict(self)
        for name in self._RUNTIME:
            data.pop(name, None)
        blob = json.dumps(data, sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self, where: str = "config") -> None:
        if not self.sources:
            raise ConfigError(f"{where}: no sources given")
        ratios = (self.split.train, self.split.val, self.split.test)
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise ConfigError(f"{where}: split train/val/test must be >= 0 and sum to 1, got {ratios}")
        if self.workers < 0:
            raise ConfigError(f"{where}: workers must be >= 0")
        for rule in self.captions.rules:
            if rule not in RULES:
                raise ConfigError(f"{where}: captions.rules: unknown rule {rule!r}; known {list(RULES)}")
        if self.captions.report_captions not in ("extra", "replace", "off"):
            raise ConfigError(f"{where}: captions.report_captions must be 'extra', 'replace' or 'off', "
                              f"got {self.captions.report_captions!r}")
        for mod, conv in self.captions.laterality.items():
            if conv not in ("radiological", "image"):
                raise ConfigError(f"{where}: captions.laterality.{mod} must be 'radiological' or 'image', got {conv!r}")


def load_config(path: str | Path, overrides: dict | None = None) -> BuildConfig:
    """Read a YAML build config (relative source roots resolve against its folder).

    Read by :func:`regionmed.config.load_yaml_config`: UTF-8 with or without a byte-order
    mark; another encoding, bad YAML, an unknown key or a wrong type is a ``ConfigError``
    naming the file (and the field)."""
    path = Path(path)
    cfg = load_yaml_config(BuildConfig, path, what="build config")  # the one reader of config files
    for spec in cfg.sources:
        root = Path(spec.root).expanduser()
        if not root.is_absolute():
            spec.root = str((path.parent / root).resolve())
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    cfg.validate(str(path))
    return cfg
