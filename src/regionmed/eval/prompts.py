"""Prompt ensembles for zero-shot classification, read from versioned YAML files.

The packaged file is ``regionmed/eval/prompts/default.yaml``. A user's file
(``regionmed eval --prompts FILE``) *extends* it: its keys are laid over the packaged
ones (lists replace lists, ``class_text`` mappings and ``datasets.<name>`` blocks are
merged key by key), so a file may hold only what it changes. ``extends: none`` makes
a file stand alone (it must then give ``templates``, ``positive`` and ``negative``).

Keys of a prompt file:

``version`` (required)
    any string or number; results record the file(s) and version(s) they used.
``extends``
    ``default`` (the packaged file; the default for a user's file) or ``none``.
``templates``
    list of strings with ``{}`` (the class text): the prompt ensemble of a class
    (``softmax`` and ``similarity`` scoring).
``positive`` / ``negative``
    templates of the "present" / "absent" pair per class (``pairs`` scoring).
``class_text``
    mapping class name -> the words put into ``{}`` (``notumor: no tumor``); without an
    entry the class name is used, ``_`` turned into spaces and lower-cased.
``datasets.<name>``
    any of ``templates``, ``positive``, ``negative``, ``class_text`` for one task only.
    Names: ``modality``, ``organ``, ``abnormality`` (the SLAKE tasks), ``medregion``
    (the labels of ``--medregion``), ``folder`` (``--class-folder``).
``proposal_phrases``
    phrases whose similarity maps give self-proposed test-time ROIs (``--rois self``).

Any other key is an error (a misspelt key would otherwise be ignored silently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from regionmed.config import yaml_error_line
from regionmed.errors import RegionmedError
from regionmed.io import read_text

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


TOP_KEYS = ("version", "extends", "templates", "positive", "negative", "class_text", "datasets", "proposal_phrases")
DATASET_KEYS = ("templates", "positive", "negative", "class_text")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist")
    try:
        data = yaml.safe_load(read_text(path, PromptError, "prompt file")) or {}
    except yaml.YAMLError as err:
        raise PromptError(f"{path}: not valid YAML ({yaml_error_line(err)})") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: must be a mapping of the keys {', '.join(TOP_KEYS)}")
    if "version" not in data:
        raise PromptError(f"{path}: field 'version' is missing (prompt files are versioned)")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise PromptError(f"{path}: unknown key(s) {unknown}; known: {', '.join(TOP_KEYS)}")
    for name, block in (data.get("datasets") or {}).items():
        if not isinstance(block, dict):
            raise PromptError(f"{path}: datasets.{name} must be a mapping")
        bad = sorted(set(block) - set(DATASET_KEYS))
        if bad:
            raise PromptError(f"{path}: datasets.{name}: unknown key(s) {bad}; known: {', '.join(DATASET_KEYS)}")
    for where, ct in [("class_text", data.get("class_text"))] + [
            (f"datasets.{n}.class_text", (b or {}).get("class_text")) for n, b in (data.get("datasets") or {}).items()]:
        if ct is not None and not isinstance(ct, dict):
            raise PromptError(f"{path}: {where} must be a mapping class name -> text")
    if data.get("extends", "default") not in ("default", "none"):
        raise PromptError(f"{path}: extends must be 'default' or 'none', got {data['extends']!r}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k in ("class_text",) and isinstance(v, dict):
            out[k] = {**(base.get(k) or {}), **v}
        elif k == "datasets" and isinstance(v, dict):
            ds = {n: dict(b or {}) for n, b in (base.get("datasets") or {}).items()}
            for n, b in v.items():
                ds[n] = _merge(ds.get(n, {}), b or {})
            out[k] = ds
        else:
            out[k] = v
    return out


def prompt_data(path: str | Path | None = None) -> tuple[dict, str, int | str]:
    """The merged prompt data of ``path`` over the packaged file (see the module docstring),
    with the names and versions of the files used."""
    base_path = packaged_prompts()
    base = _read(base_path)
    if not path or Path(path).resolve() == base_path.resolve():
        return base, base_path.name, base["version"]
    user = _read(Path(path))
    if user.get("extends", "default") == "none":
        return user, Path(path).name, user["version"]
    return _merge(base, user), f"{base_path.name}+{Path(path).name}", f"{base['version']}+{user['version']}"


def load_prompts(path: str | Path | None = None, dataset: str | None = None,
                 class_text: dict[str, str] | None = None) -> PromptSet:
    """The prompt set for ``dataset``: ``path`` laid over the packaged file, then
    ``datasets.<dataset>``, then ``class_text`` (e.g. a folder-name mapping given on the
    command line). Raises :class:`PromptError` naming the file and key."""
    data, source, version = prompt_data(path)
    base = {k: data.get(k) for k in ("templates", "positive", "negative")}
    merged_text = dict(data.get("class_text") or {})
    over = (data.get("datasets") or {}).get(dataset or "", {}) or {}
    for k in ("templates", "positive", "negative"):
        if k in over:
            base[k] = over[k]
    merged_text.update(over.get("class_text") or {})
    merged_text.update(class_text or {})
    return PromptSet(
        templates=_check_templates(base["templates"], f"{source}: templates"),
        positive=_check_templates(base["positive"], f"{source}: positive"),
        negative=_check_templates(base["negative"], f"{source}: negative"),
        class_text={str(k): str(v) for k, v in merged_text.items()},
        source=source,
        version=version,
    )


def proposal_phrases(path: str | Path | None = None) -> list[str]:
    return [str(p) for p in prompt_data(path)[0].get("proposal_phrases") or []]
