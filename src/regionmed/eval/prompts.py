"""Prompt ensembles for zero-shot classification, read from versioned YAML files.

The packaged file is ``regionmed/eval/prompts/default.yaml``; another file with the
same layout can be given (``--prompts``). Per dataset/task overrides live under
``datasets.<name>``: any of ``templates``, ``positive``, ``negative``, ``class_text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from regionmed.errors import RegionmedError

DEFAULT_PROMPTS = "default.yaml"


class PromptError(RegionmedError, ValueError):
    """A prompt file that cannot be used."""


def packaged_prompts(name: str = DEFAULT_PROMPTS) -> Path:
    return Path(str(resources.files("regionmed.eval") / "prompts" / name))


@dataclass
class PromptSet:
    """Templates for one dataset/task (overrides already applied)."""

    templates: list[str]
    positive: list[str]
    negative: list[str]
    class_text: dict[str, str] = field(default_factory=dict)
    source: str = ""
    version: int | str = ""

    def text_of(self, name: str) -> str:
        return self.class_text.get(name, " ".join(str(name).replace("_", " ").split()).lower())

    def class_prompts(self, name: str) -> list[str]:
        return [t.format(self.text_of(name)) for t in self.templates]

    def pair_prompts(self, name: str) -> tuple[list[str], list[str]]:
        c = self.text_of(name)
        return [t.format(c) for t in self.positive], [t.format(c) for t in self.negative]


def _check_templates(values, where: str) -> list[str]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and "{}" in v for v in values):
        raise PromptError(f"{where} must be a non-empty list of strings each containing '{{}}'")
    return list(values)


def load_prompts(path: str | Path | None = None, dataset: str | None = None) -> PromptSet:
    """Read a prompt file (default: the packaged one) and apply ``datasets.<dataset>``."""
    path = Path(path) if path else packaged_prompts()
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise PromptError(f"{path}: not valid YAML ({err})") from err
    if "version" not in data:
        raise PromptError(f"{path}: field 'version' is missing (prompt files are versioned)")
    base = {k: data.get(k) for k in ("templates", "positive", "negative")}
    class_text = dict(data.get("class_text") or {})
    over = (data.get("datasets") or {}).get(dataset or "", {}) or {}
    unknown = set(over) - {"templates", "positive", "negative", "class_text"}
    if unknown:
        raise PromptError(f"{path}: datasets.{dataset}: unknown key(s) {sorted(unknown)}")
    for k in ("templates", "positive", "negative"):
        if k in over:
            base[k] = over[k]
    class_text.update(over.get("class_text") or {})
    return PromptSet(
        templates=_check_templates(base["templates"], f"{path}: templates"),
        positive=_check_templates(base["positive"], f"{path}: positive"),
        negative=_check_templates(base["negative"], f"{path}: negative"),
        class_text={str(k): str(v) for k, v in class_text.items()},
        source=path.name,
        version=data["version"],
    )


def proposal_phrases(path: str | Path | None = None) -> list[str]:
    path = Path(path) if path else packaged_prompts()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return [str(p) for p in data.get("proposal_phrases") or []]
