"""Source adapters: each iterates :class:`~regionmed.apps.curation.items.RawItem` objects.

Choose one by name (``get_source(name, root, **options)``):

* ``generic`` — a folder of images + a CSV or JSONL table (+ optional COCO json for boxes);
* ``dicom`` — a folder of DICOM files (+ optional table or ``<stem>.txt`` reports);
* ``slake``, ``vqa_rad``, ``covid_cxr`` — the public sets as laid out in ``../shared/data``.
"""

from __future__ import annotations

from regionmed.apps.curation.sources.base import Source, SourceError
from regionmed.apps.curation.sources.covid_cxr import CovidCxrSource
from regionmed.apps.curation.sources.generic import DicomSource, GenericSource
from regionmed.apps.curation.sources.slake import SlakeSource
from regionmed.apps.curation.sources.vqa_rad import VqaRadSource

SOURCES: dict[str, type[Source]] = {
    "generic": GenericSource,
    "dicom": DicomSource,
    "slake": SlakeSource,
    "vqa_rad": VqaRadSource,
    "covid_cxr": CovidCxrSource,
}


def get_source(name: str, root, **options) -> Source:
    try:
        cls = SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; choose one of {sorted(SOURCES)}") from None
    return cls(root, **options)


__all__ = ["SOURCES", "Source", "SourceError", "get_source"]
