"""What every evaluation task of one run shares: the options common to all tasks, the datasets
(each opened once), the problems counted, the output folder.

* :class:`EvalData` — which datasets to score: the built-in sets under the data root, and the
  user's own (``--medregion``, ``--class-folder``, ``--questions``);
* :class:`EvalOptions` — the run's options: tasks, data, test-time ROIs, image feature, prompts,
  bootstrap, batch, limits, and each task's own options (``task_options``);
* :class:`Datasets` — the dataset objects of :mod:`.suites`, made on first use and kept, so a
  dataset is opened once per run and handed to every task that scores it;
* :class:`Problems` — bad inputs and failed tasks, counted with their messages;
* :class:`EvalContext` — the above plus the output folder: what a task's ``run`` receives.

The built-in sets (SLAKE, VQA-RAD) serve the generic tasks (zeroshot, grounding) only when no
dataset of the user's is given or ``builtin`` is set (:meth:`EvalData.uses_builtin`): a task is
never scored on another dataset's data than the one asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regionmed.apps import data_root
from regionmed.apps.evaluate.suites import MedRegionSet, SlakeSet, SuiteError, VqaRadSet, folder_task, question_file
from regionmed.errors import RegionmedError
from regionmed.eval.images import ImageRef, ImageSetEmbeddings, embed_images
from regionmed.eval.prompts import proposal_phrases
from regionmed.eval.vqa import Question
from regionmed.eval.zeroshot import ZeroShotTask

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("zeroshot", "vqa_rad", "slake_vqa", "grounding")
# What a bad input raises (a missing or damaged file, a dataset that cannot supply a task): a part of
# a task that meets one is counted as a problem and the rest goes on; anything else is a bug.
INPUT_ERRORS = (RegionmedError, OSError, ValueError)


@dataclass
class EvalData:
    """The datasets an evaluation run may score."""

    data_root: str | None = None  # folder with slake/ and vqa_rad/ (None: $REGIONMED_DATA, read when a built-in set is used)
    medregion: str | None = None  # a built MedRegion dataset
    medregion_split: str = "test"
    class_folder: str | None = None  # ROOT/<class>/<image>
    class_names: dict[str, str] = field(default_factory=dict)  # class (folder) name -> words in its prompts
    questions: str | None = None  # a user's VQA question file (task "vqa")
    builtin: bool | None = None  # use SLAKE / VQA-RAD for zeroshot and grounding; None = only without user data

    @property
    def own(self) -> bool:
        """Whether a dataset of the user's is given."""
        return bool(self.medregion or self.class_folder or self.questions)

    @property
    def uses_builtin(self) -> bool:
        """Whether the built-in sets serve the generic tasks: ``builtin``, or by default only
        when no dataset of the user's is given."""
        return bool(self.builtin) if self.builtin is not None else not self.own


@dataclass
class EvalOptions:
    """The options of one evaluation run; each task's own options are in ``task_options``
    (task name → that task's options dataclass; a task left out runs with its defaults)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    data: EvalData = field(default_factory=EvalData)
    rois: str = "none"  # none | given | self (models without an ROI path run as none); none = the whole image
    image_feature: str = "auto"  # global | fused | roi | auto (fused for ROI models, global otherwise)
    prompts: str | None = None  # a prompt file laid over the packaged eval/prompts/default.yaml
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0
    limit_images: int | None = None  # keep the first N images per suite (smoke runs)
    limit_questions: int | None = None  # keep the first N questions per VQA split
    task_options: dict[str, Any] = field(default_factory=dict)


class Problems:
    """Bad inputs and failed tasks: counted, with their messages (the report shows them)."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, task: str, message: str, kind: str = "input") -> None:
        log.warning("%s: %s", task, message)
        self.items.append({"task": task, "kind": kind, "message": message})

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it["task"]] = counts.get(it["task"], 0) + 1
        return {"count": len(self.items), "per_task": counts,
                "messages": [f"[{i['task']}] {i['message']}" for i in self.items[:200]]}


class Datasets:
    """The datasets of one run (:class:`EvalData`), each made on first use and kept.

    ``slake`` / ``vqa_rad`` / ``medregion`` are the :mod:`.suites` objects (which read each split
    once); ``class_folder()`` and ``question_file()`` read their input once. The data root is
    resolved only when a built-in set is used (``$REGIONMED_DATA`` when not given)."""

    def __init__(self, data: EvalData):
        self.data = data
        self._cache: dict[str, Any] = {}

    def _once(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def root(self) -> Path:
        """The data root: ``data.data_root``, else ``$REGIONMED_DATA`` (a :class:`RegionmedError` when neither is set)."""
        return data_root(self.data.data_root)

    def require_root(self, why: str) -> Path:
        """The data root, checked to exist; :class:`SuiteError` naming it and ``why`` otherwise."""
        root = self.root()
        if not root.is_dir():
            raise SuiteError(f"data root {root} does not exist (set --data-root or REGIONMED_DATA); it holds {why}")
        return root

    @property
    def slake(self) -> SlakeSet:
        return self._once("slake", lambda: SlakeSet(self.root() / "slake"))

    @property
    def vqa_rad(self) -> VqaRadSet:
        return self._once("vqa_rad", lambda: VqaRadSet(self.root() / "vqa_rad"))

    @property
    def medregion(self) -> MedRegionSet:
        if not self.data.medregion:
            raise SuiteError("no MedRegion dataset given (--medregion DIR)")
        return self._once("medregion", lambda: MedRegionSet(self.data.medregion))

    def class_folder(self) -> tuple[list[ImageRef], ZeroShotTask]:
        """The class-folder task (:func:`.suites.folder_task`), checked against ``class_names``."""
        def make():
            refs, task = folder_task(self.data.class_folder)
            unknown = sorted(set(self.data.class_names) - set(task.classes))
            if unknown:
                raise SuiteError(f"class names given for {unknown}, which are not folders of {self.data.class_folder} "
                                 f"(its classes: {task.classes})")
            return refs, task
        return self._once("class_folder", make)

    def question_file(self) -> tuple[dict[str, list[Question]], list[ImageRef]]:
        return self._once("questions", lambda: question_file(self.data.questions))


@dataclass
class EvalContext:
    """What a task's ``run`` receives: the run's options, its datasets, its problems and its
    output folder (figures are written there)."""

    opts: EvalOptions
    datasets: Datasets
    problems: Problems
    out: Path

    def feature(self, model) -> str:
        """The image embedding scored: ``opts.image_feature``, or for ``auto`` fused for ROI models, global otherwise."""
        if self.opts.image_feature != "auto":
            return self.opts.image_feature
        return "fused" if model.roi_processor is not None else "global"

    def limit_images(self, seq):
        return seq if self.opts.limit_images is None else seq[: self.opts.limit_images]

    def limit_questions(self, seq):
        return seq if self.opts.limit_questions is None else seq[: self.opts.limit_questions]

    def embed(self, model, refs: list[ImageRef], task: str, rois: str | None = None) -> ImageSetEmbeddings:
        """``refs`` embedded with the run's test-time ROIs (or ``rois``); unreadable images and given
        boxes that could not be used are counted as ``task``'s problems."""
        emb = embed_images(model, refs, rois or self.opts.rois, self.opts.batch_size, self.opts.num_workers,
                           phrases=proposal_phrases(self.opts.prompts))
        for key, why in emb.missing:
            self.problems.add(task, f"image {key} could not be read ({why}); skipped")
        for key, why in emb.box_problems:
            self.problems.add(task, f"image {key}: {why}")
        return emb
