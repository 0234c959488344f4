"""Applications built on the regionmed library.

The library (:mod:`regionmed.model`, :mod:`regionmed.data`, :mod:`regionmed.losses`,
:mod:`regionmed.task`, :mod:`regionmed.optim`, :mod:`regionmed.distributed`,
:mod:`regionmed.eval`) never imports anything from here (a test checks it).
Applications may import the library and each other:

* :mod:`.train` — the progressive trainer (stages, checkpoints, metrics, run config);
* :mod:`.curation` — dataset curation: the MedRegion builder and synthetic phantoms;
* :mod:`.evaluate` — ``regionmed eval``: the evaluation tasks (a registry), the suites (SLAKE,
  VQA-RAD, MedRegion splits, class folders) and reports;
* :mod:`.ablation` — the same-data ablation (``regionmed ablate``); :mod:`.demo` — ``make demo``;
* :mod:`.models` — ``regionmed models``, the named model architectures;
* :mod:`.cli` — the ``regionmed`` command.
"""

from __future__ import annotations

import os
from pathlib import Path

from regionmed.errors import RegionmedError

DATA_ENV = "REGIONMED_DATA"

__all__ = ["DATA_ENV", "data_root"]


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding the public datasets (``slake/``, ``vqa_rad/``, ``covid_cxr/``).

    ``explicit`` when given, else ``$REGIONMED_DATA``. Never derived from where
    regionmed is installed. Raises :class:`RegionmedError` when neither is set.
    """
    if explicit:
        return Path(explicit)
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    raise RegionmedError(f"no data folder: set {DATA_ENV} (or pass the data root explicitly)")
