"""The progressive trainer: one process or many (torchrun; gloo on CPU, nccl on GPU).

Data parallelism is PyTorch's ``DistributedDataParallel`` around the library's
:class:`~regionmed.task.TrainingTask`, with the local contrastive loss (see
:mod:`regionmed.distributed`): equal to single-process training on the union
batch. DDP fixes its parameter set when it is built, so the task is wrapped anew
at each stage boundary, after ``set_trainable``; each wrap broadcasts rank 0's
parameters and buffers, so every rank starts the stage from identical weights.

BatchNorm towers: on CUDA, BatchNorm layers become ``SyncBatchNorm`` (statistics
over the union batch, as in one process). PyTorch has no CPU SyncBatchNorm, so
multi-process CPU runs of a BatchNorm tower normalise with per-rank statistics
(said once at start; not equal to one process). ROI crops never use batch
statistics by default (``model.image.crop_batchnorm``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from regionmed.apps.train.checkpoint import (
    STATE_NAME,
    CheckpointError,
    clean_stale_temporaries,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_model_folder,
    step_folders,
)
from regionmed.apps.train.config import RunConfig, stage_reads_grid, trajectory_changes, uses_boxes, validate_run_config
from regionmed.apps.train.feature_cache import attach_feature_caches, set_locked_modes
from regionmed.apps.train.metrics import MetricsLogger
from regionmed.apps.train.schedule import StagePlan, learning_rate, plan_stages, stage_at
from regionmed.apps.train.validation import Validator
from regionmed.config import ConfigError, to_dict
from regionmed.data.loader import (
    Batch,
    MixedSampleDataset,
    MixedStepBatchSampler,
    RegionSampleDataset,
    StepBatchSampler,
    make_loader,
)
from regionmed.data.shards import (
    IDENTITY_FIELDS,
    counts_from_stats,
    read_manifest,
    unreadable_from_stats,
    write_json_atomic,
)
from regionmed.data.stream import (
    RESUME_EXACT,
    RESUME_RESAMPLED,
    RESUME_SHARD,
    SHARD_FAILURE,
    MedRegionStream,
    StreamSource,
    StreamState,
    gather_stream_state,
    make_stream_loader,
)
from regionmed.data.transforms import Preprocessor
from regionmed.distributed import DistInfo, all_reduce_sum, init_distributed, prepare_batchnorm
from regionmed.errors import RegionmedError
from regionmed.finite import nonfinite_tensors
from regionmed.io import read_json
from regionmed.model.clip import RegionMedCLIP, create_model
from regionmed.optim import GuardedStep, NonFiniteError, NonFiniteWeightsError
from regionmed.outputs import refuse_inside_inputs
from regionmed.task import REGION_LOSSES, TrainingTask, accumulate, split_batch
from regionmed.threads import set_threads

log = logging.getLogger(__name__)



class TrainingError(RegionmedError, RuntimeError):
    """A training run that cannot start or go on (its message says why and what to do)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name or "gate" in name or name == "logit_scale" \
        or "pos_embed" in name or "cls_token" in name or "position_embeddings" in name


def build_optimizer(model: RegionMedCLIP, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with one parameter group per (module group, decay / no decay), so stages
    can scale the learning rate of each module group (``lr_scale``)."""
    owner = {id(p): name for name, params in model.module_groups().items() for p in params}
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        buckets.setdefault((owner[id(p)], not _no_decay(name, p)), []).append(p)
    groups = [{"params": params, "weight_decay": 0.0, "module": module, "decay": decay}
              for (module, decay), params in sorted(buckets.items())]
    return torch.optim.AdamW(groups, lr=cfg.train.stages[0].lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps)


class Trainer:
    """Train a RegionMedCLIP model through the stages of a :class:`RunConfig`.

    Reads the MedRegion dataset ``cfg.data.train`` (or the datasets of ``cfg.data.sources``,
    mixed with their weights, or the shard URLs ``cfg.data.urls``) with the reader
    ``cfg.data.reader``: ``indexed`` (random access, exact resume at any world size) or
    ``streaming`` (:mod:`regionmed.data.stream`, resume at shard granularity). Each step takes
    ``train.accum_freq * train.batch_size`` samples. The data counts of the start-of-run
    checks come from the manifests' build-time statistics (no pass over the records).
    Writes into ``cfg.train.output_dir``:
    ``metrics.jsonl``, ``checkpoints/``, ``model/`` (the final model folder, written
    atomically), ``config.json`` (the resolved run config) and ``loss_curve.png``.

    ``resume``: ``True`` (the output folder's latest complete checkpoint) or a path.
    Without it, an output folder that already holds checkpoints is refused (no two runs
    mixed in one folder). A resumed run must have the checkpoint's config, apart from
    :data:`~regionmed.apps.train.config.RESUME_NEUTRAL_FIELDS`; ``allow_config_changes``
    (``regionmed train --resume --allow-config-changes``) accepts other changes, saying which.

    Raises :class:`~regionmed.config.ConfigError` for a bad config and :class:`TrainingError`
    for a run that cannot start or go on: a stage that can learn nothing from the data,
    more than ``data.max_bad_samples`` unreadable samples (after a checkpoint), NaN/inf
    weights (never saved).
    """

    def __init__(self, cfg: RunConfig, resume: str | bool | None = None, progress: bool = True, dist: DistInfo | None = None,
                 allow_config_changes: bool = False):
        validate_run_config(cfg, "the run config")
        if not (cfg.data.train.strip() or cfg.data.sources or cfg.data.urls):
            raise ConfigError("the run config: data.train is empty: give the MedRegion dataset folder (--data DIR), "
                              "or data.sources / data.urls")
        self.cfg = cfg
        self.dist = dist or init_distributed()
        if cfg.train.threads:  # else the process's own choice stands (the CLI's automatic one, or the caller's)
            set_threads(cfg.train.threads)
        if cfg.train.batch_size % self.dist.world_size:
            raise ConfigError(f"the run config: train.batch_size = {cfg.train.batch_size} is not divisible by the "
                              f"{self.dist.world_size} processes: every process takes an equal share of the batch")
        self.device = self.dist.device
        self.out = refuse_inside_inputs(cfg.train.output_dir, flag="train.output_dir", inputs=[
            ("data.train", cfg.data.train or None), *((f"data.sources {src.name or src.path!r}", src.path or None) for src in cfg.data.sources),
            ("model.init_from", cfg.model.init_from)])
        self.progress = progress and self.dist.is_main
        if not resume and step_folders(self.out / "checkpoints"):
            raise TrainingError(
                f"{self.out} already holds the checkpoints of a run ({self.out / 'checkpoints'}): pass --resume to continue "
                "it, or give another train.output_dir (--output-dir), or remove the folder to start anew"
            )
        self.sources = self._source_specs()
        self.data_fingerprint = self._data_fingerprint()
        self.resumed_from: str | None = None
        self.config_changes: list[tuple[str, object, object]] = []
        # Checked before anything is built: a refused resume fails at once.
        resume_folder = self._resume_check(self.out if resume is True else Path(resume), allow_config_changes) if resume else None
        seed_everything(cfg.seed)
        self.model = create_model(cfg.model).to(self.device)
        self.notes: list[str] = []  # said once at the start of fit()
        note = prepare_batchnorm(self.model, self.dist.world_size, self.device)
        if note:
            self.notes.append(note)
        self.pre = Preprocessor.from_model(self.model)
        self.step_batch = cfg.train.batch_size * cfg.train.accum_freq  # samples per optimiser step, all ranks
        self.stream_sources: list[StreamSource] = []
        self.data: RegionSampleDataset | MixedSampleDataset | None = None
        if cfg.data.reader == "indexed":
            parts = [RegionSampleDataset(path, split, self.pre, cfg.data.max_negatives, use_rois=uses_boxes(cfg),
                                         max_image_negatives=cfg.data.max_image_negatives, on_bad="substitute",
                                         max_open_files=cfg.data.max_open_files, source=name if len(self.sources) > 1 else "")
                     for name, path, _, _, split in self.sources]
            self.data = parts[0] if len(parts) == 1 else MixedSampleDataset(parts)
            self.n_samples: int | None = len(self.data)
        else:
            self.stream_sources = [StreamSource.from_urls(name, urls, weight) if urls else
                                   StreamSource.from_dataset(name, path, split, weight)
                                   for name, path, urls, weight, split in self.sources]
            sizes = [s.samples for s in self.stream_sources]
            self.n_samples = None if None in sizes else sum(sizes)
        self.reader = cfg.data.reader
        self.resume_guarantee = RESUME_EXACT if self.reader == "indexed" else (
            RESUME_RESAMPLED if cfg.data.resampled else RESUME_SHARD)
        self.stream_resume: dict | None = None
        self.stream_state: StreamState | None = None
        self._stream_state_all: StreamState | None = None
        if self.n_samples is None:
            for i, st in enumerate(cfg.train.stages):
                if st.epochs is not None:
                    raise ConfigError(f"the run config: train.stages[{i}].epochs needs the number of samples, which shard URLs "
                                      "without a manifest do not give: use 'steps'")
            self.steps_per_epoch = 1
        else:
            self.steps_per_epoch = self.n_samples // self.step_batch
            if self.steps_per_epoch == 0:
                raise TrainingError(
                    f"{self._data_name()}: split {cfg.data.split!r} has {self.n_samples} samples, fewer than one batch of "
                    f"{self.step_batch}" + (" (train.batch_size x train.accum_freq)" if cfg.train.accum_freq > 1 else "")
                )
        self.plans = plan_stages(cfg.train.stages, self.steps_per_epoch)
        self.total_steps = self.plans[-1].end
        self.optimizer = build_optimizer(self.model, cfg)
        self.task = TrainingTask(self.model, cfg.data.max_negatives, cfg.data.max_image_negatives,
                                 grounding_text=cfg.train.grounding_text, grounding_mode=cfg.train.grounding_mode)
        self.runner: torch.nn.Module = self.task  # the DDP wrapper of the current stage, under torchrun
        self.guard = GuardedStep(cfg.train.precision, cfg.train.grad_clip, cfg.train.max_nonfinite)
        self.step = 0
        self.counters: Counter = Counter()
        self.bad_samples: dict[str, str] = {}  # "<shard>:<key>" -> why it cannot be read (distinct samples)
        self.bad_shards: dict[str, str] = {}  # streaming: shard URL -> why it could not be read (or broke off)
        self.unreadable_records: list[tuple[str, str]] = []
        self.counts_from = "none"
        self.audit = self._data_counts()
        self.validator = self._validator()
        if self.data is not None:  # the indexed reader: locked towers read their outputs from the feature cache
            self.notes += attach_feature_caches(self.model, self.data, self.task, cfg.train.lock, cfg.train.output_dir,
                                                self.dist, cfg.data.max_negatives, cfg.data.max_image_negatives, progress)
        if resume_folder is not None:
            self._resume(resume_folder)

    def _validator(self) -> Validator | None:
        """The held-out split's :class:`Validator` on the main process (None elsewhere, or
        without ``validation.every``); a split that cannot be read is an error before step 0."""
        v = self.cfg.validation
        if not v.every or not self.dist.is_main:
            return None
        root = v.data.strip() or self.cfg.data.train.strip()
        if not root:
            raise ConfigError("the run config: validation.every is set but validation.data is empty and there is no "
                              "data.train to take the held-out split from: give validation.data (a MedRegion folder)")
        try:
            # Default loss batch: the rows one training loss is computed over (accum_freq x batch_size).
            rows = v.batch_size or self.cfg.train.batch_size * self.cfg.train.accum_freq
            validator = Validator(v, root, self.pre, rows, self.cfg.model.roi.max_rois,
                                  self.cfg.data.max_negatives, self.cfg.data.max_image_negatives,
                                  use_rois=uses_boxes(self.cfg))
        except (RegionmedError, OSError) as err:
            raise ConfigError(f"the run config: validation.split {v.split!r} of {root} cannot be read: {err}") from err
        if not len(validator):
            raise ConfigError(f"the run config: validation.split {v.split!r} of {root} holds no sample")
        return validator

    # ---------------------------------------------------------------------------------
    def _source_specs(self) -> list[tuple[str, str, list[str], float, str]]:
        """``(name, path, urls, weight, split)`` of each dataset the run reads."""
        d = self.cfg.data
        if d.sources:
            return [(s.name or Path(s.path.rstrip("/")).name or s.path or s.urls[0], s.path, list(s.urls), s.weight,
                     s.split or d.split) for s in d.sources]
        if d.urls:
            return [("urls", "", list(d.urls), 1.0, d.split)]
        return [(Path(d.train.rstrip("/")).name or d.train, d.train, [], 1.0, d.split)]

    def _data_name(self) -> str:
        return ", ".join(path or urls[0] for _, path, urls, _, _ in self.sources)

    def _manifest_entry(self, path: str, split: str) -> dict:
        if self.cfg.data.reader == "streaming":
            from regionmed.data.stream import read_remote_manifest

            return read_remote_manifest(path).get("splits", {}).get(split, {})
        return read_manifest(path)["splits"].get(split, {})

    def _data_fingerprint(self) -> str:
        """A digest of each source's split entry in manifest.json (shard names and counts) or
        of its shard URLs, and of the weights: a resumed run must read the same data."""
        parts = []
        for name, path, urls, weight, split in self.sources:
            if urls:
                parts.append({"urls": urls, "weight": weight})
                continue
            entry = dict(self._manifest_entry(path, split))
            entry.pop("index", None)  # how it is read, not what it holds
            entry.pop("stats", None)
            # names and counts only: shard sizes and digests are checked when the data is opened (a
            # checkpoint of a dataset written before they were recorded resumes after index-shards)
            entry["shards"] = [{k: v for k, v in s.items() if k not in IDENTITY_FIELDS} for s in entry.get("shards", [])]
            parts.append(entry if len(self.sources) == 1 else {"entry": entry, "weight": weight, "name": name})
        data = parts[0] if len(parts) == 1 else parts
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def _data_counts(self) -> Counter:
        """The counts of the start-of-run checks (samples, regions, negatives, boxes clipped or
        dropped, ROIs beyond max_rois), summed over the sources: from the manifests' build-time
        statistics; without them (``data.audit: auto``), one pass over the records for the
        indexed reader, none for the streaming one (said once); ``always``: one pass."""
        cfg = self.cfg
        needs = cfg.model.roi.mode != "none" or any(st.losses.get("hard_negative", 0) > 0 for st in cfg.train.stages)
        if cfg.data.audit == "never" or not needs:
            return Counter()
        parts = self.data.datasets if isinstance(self.data, MixedSampleDataset) else [self.data] if self.data else []
        total: Counter = Counter()
        missing = []
        for k, (name, path, urls, _, split) in enumerate(self.sources):
            counts = None
            if cfg.data.audit == "auto":
                if parts:
                    counts = parts[k].manifest_counts()
                    if counts is not None:  # the unreadable records the statistics name
                        self.unreadable_records += parts[k].unreadable_records
                else:
                    stats = self.stream_sources[k].stats
                    if stats:
                        counts = counts_from_stats(stats, self.pre.max_rois, cfg.data.max_negatives, cfg.data.max_image_negatives)
                        self.unreadable_records += unreadable_from_stats(stats)
            if counts is None and parts:
                counts = parts[k].audit()  # one pass over the records (JSON only)
                self.unreadable_records += parts[k].unreadable_records
                missing.append(name)
            if counts is None:
                missing.append(name)
                continue
            total.update(counts)
        if missing and cfg.data.audit == "auto":
            for name, path, urls, _, split in (s for s in self.sources if s[0] in missing):
                if urls:  # no manifest: nothing index-shards could add
                    self.notes.append(f"{name}: shard URLs without a manifest: no build-time statistics, the start-of-run "
                                      "data checks are skipped")
                    continue
                fix = ("rebuild it, or add them with 'regionmed index-shards' on the folder it serves" if "://" in path
                       else f"rebuild it, or add them with 'regionmed index-shards {path}'")
                self.notes.append(f"{name}: {path}/manifest.json has no build-time statistics for split {split!r}; "
                                  + (f"counted them in one pass over the records ({fix})" if parts else
                                     f"the start-of-run data checks are skipped ({fix})"))
        self.counts_from = "audit" if cfg.data.audit == "always" else ("manifest" if not missing else
                                                                       "manifest+audit" if parts else "partial")
        if not parts and missing and len(missing) == len(self.sources):
            self.counts_from = "none"
            return Counter()
        return total

    def _resume_check(self, path: Path, allow_changes: bool) -> Path:
        """The checkpoint folder to resume from; refuses a config that changes the run's trajectory."""
        folder = find_checkpoint(path)
        saved = read_json(folder / STATE_NAME, CheckpointError, "the trainer state")
        changes = trajectory_changes(saved["config"], to_dict(self.cfg)) if isinstance(saved.get("config"), dict) else []
        old_data = saved.get("data_fingerprint")
        if old_data and old_data != self.data_fingerprint:
            changes.append(("data", f"split {self.cfg.data.split!r} as checkpointed",
                            f"split {self.cfg.data.split!r} of {self._data_name()} (other shards or counts in manifest.json)"))
        if changes and not allow_changes:
            listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes[:8])
            more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
            raise CheckpointError(
                f"--resume from {folder}: the run config differs from the checkpoint's in field(s) that change the run's "
                f"trajectory: {listed}{more}. Resume with the checkpoint's values (its config is in {folder / STATE_NAME}), "
                "or pass --allow-config-changes to continue anyway (the run will then not equal an uninterrupted one)"
            )
        self.config_changes = changes
        return folder

    def _resume(self, folder: Path) -> None:
        state = load_checkpoint(folder, self.model, self.optimizer)
        self.step = int(state["step"])
        self.guard.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.counters = Counter(state.get("counters", {}))
        self.bad_samples = dict(state.get("bad_samples", {}))
        self.bad_shards = dict(state.get("bad_shards", {}))
        self.stream_resume = state.get("stream")
        self.model.text_tower.tokenizer.restore_truncated(state.get("text_truncated_digests", []))
        self.resumed_from = state["checkpoint"]
        if self.config_changes:
            self.notes.append("resumed with a changed config (--allow-config-changes): "
                              + "; ".join(f"{n}: {o!r} -> {v!r}" for n, o, v in self.config_changes))
        log.info("resumed from %s at step %d", state["checkpoint"], self.step)

    def _enter_stage(self, plan: StagePlan, logger: MetricsLogger) -> None:
        st = plan.config
        wanted = set(self.model.module_groups()) if "all" in st.trainable else set(st.trainable)
        if not st.use_rois:
            # Unused in this stage: it gets no gradient (AdamW skips it, as in one process),
            # and DDP needs every parameter it reduces to take part in the loss.
            wanted.discard("roi_processor")
        if not stage_reads_grid(st, self.model.roi_processor is not None):
            wanted.discard("dense_head")  # the same for the grid head when nothing reads the grid
        lock = self.cfg.train.lock
        wanted -= {name for name, on in (("image_tower", lock.image), ("text_tower", lock.text)) if on}
        self.model.set_trainable(sorted(wanted))
        self.task.set_stage(st.losses, st.use_rois)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device] if self.device.type == "cuda" else None
            self.runner = self.task  # release the previous stage's wrapper (and its gradient hooks) first
            # find_unused_parameters: a stage's active terms may not reach every trainable
            # parameter (e.g. `region` alone never uses the fused embedding), and a batch may hold
            # no ROI at all. DDP then leaves a parameter unused on every rank without a gradient,
            # exactly as one process would (AdamW skips it), at the cost of one graph walk per step.
            # PyTorch warns when a step happens to use every parameter; with stages and ROI-less
            # batches that is expected here, and the warning would repeat on every rank.
            warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
            self.runner = DistributedDataParallel(self.task, device_ids=device_ids, find_unused_parameters=True)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = plan.config.weight_decay if group["decay"] else 0.0
        message = (
            f"stage {plan.index + 1}/{len(self.plans)} '{plan.name}': steps {plan.start}-{plan.end - 1}, "
            f"losses {plan.config.losses}, ROIs {'on' if plan.config.use_rois else 'off'}, "
            f"trainable {plan.config.trainable} ({n_train / 1e6:.2f} M params)"
        )
        log.info(message)
        if self.progress:
            tqdm.write(message)
        if self.step == plan.start:  # a run resumed mid-stage logged the stage's start before
            logger.write("stage", step=self.step, stage=plan.name, losses=plan.config.losses,
                         use_rois=plan.config.use_rois, trainable=plan.config.trainable, trainable_params=n_train)

    def _state(self, plan: StagePlan) -> dict:
        return {"stage": plan.name, "nonfinite_in_row": self.guard.nonfinite_in_row,
                "counters": {**self.counters, "text_truncated": self.model.text_tower.tokenizer.truncated},
                "bad_samples": dict(self.bad_samples), "bad_shards": dict(self.bad_shards), "data_fingerprint": self.data_fingerprint,
                "text_truncated_digests": self.model.text_tower.tokenizer.truncated_digests(),
                "config": to_dict(self.cfg), "world_size": self.dist.world_size,
                "reader": self.reader, "resume_guarantee": self.resume_guarantee,
                **({"stream": self._stream_state_all.as_dict(self.step)} if self._stream_state_all is not None else {})}

    def _check_weights(self, what: str) -> None:
        """Raise :class:`TrainingError` when a weight holds NaN/inf: such weights are never saved."""
        if self.guard.nonfinite_in_row:
            # Finite weights can still compute NaN (e.g. 1e30 after an overflowing learning rate):
            # weights whose latest steps gave non-finite losses are not saved either.
            raise TrainingError(
                f"step {self.step}: the last {self.guard.nonfinite_in_row} step(s) gave non-finite losses, so these weights "
                f"compute non-finite values; {what} not written. Lower the learning rate and resume from the last "
                "checkpoint (--allow-config-changes) or start again"
            )
        bad = nonfinite_tensors([*self.model.named_parameters(), *self.model.named_buffers()])
        if bad:
            raise TrainingError(
                f"step {self.step}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[:3]}); {what} not written. "
                "Lower the learning rate and resume from the last checkpoint or start again"
            )

    def _sync_truncated(self) -> None:
        """Union the distinct truncated texts (digests) of every rank, so the count is the
        single-process one (each rank sees only its share of the texts)."""
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, self.model.text_tower.tokenizer.truncated_digests())
            self.model.text_tower.tokenizer.restore_truncated([d for part in gathered for d in part])

    def _checkpoint(self, plan: StagePlan) -> None:
        self._sync_truncated()
        self._stream_state_all = gather_stream_state(self.stream_state, self.dist.world_size) if self.stream_state else None
        self._check_weights("checkpoint")  # the same weights on every rank: every rank decides alike
        if self.dist.is_main:
            save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer, self._state(plan), self.cfg.train.keep_checkpoints)
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def train_step(self, batch: Batch, plan: StagePlan) -> dict[str, float] | None:
        """One optimisation step; returns the loss terms, or None when the step was skipped."""
        st = plan.config
        lr = learning_rate(plan, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * st.lr_scale.get(group["module"], 1.0)
        self.model.train()
        set_locked_modes(self.model, self.cfg.train.lock)
        batch = batch.to(self.device)
        backward = None
        if self.cfg.train.accum_freq > 1:
            # One Batch of accum_freq x the micro-batch per rank; the loss and gradient of the
            # whole of it, one micro-batch's activations at a time (regionmed.task.accumulate).
            acc = accumulate(self.runner, self.task, split_batch(batch, self.cfg.train.accum_freq),
                             lambda: self.guard.autocast(self.device))
            terms, backward = acc.terms, acc.backward
        else:
            with self.guard.autocast(self.device):
                terms = self.runner(batch)
        try:
            losses = self.guard.step(terms, self.optimizer, self.model.parameters(), where=f"step {self.step}",
                                     backward=backward)
        except NonFiniteWeightsError as err:
            bad = nonfinite_tensors(self.model.named_parameters())
            raise TrainingError(f"{err}{f' (e.g. {bad[:3]})' if bad else ''}; nothing was saved from this step on: resume "
                                "from the last checkpoint with a lower learning rate (--allow-config-changes) or start again") from err
        except NonFiniteError as err:
            raise TrainingError(f"{err} (train.max_nonfinite)") from err
        if losses is None:
            self.counters["nonfinite_steps"] += 1
            self._say(self.guard.last_skip)
        return losses

    def _bad_samples_in(self, batch: Batch, plan: StagePlan, logger: MetricsLogger) -> None:
        """Count the unreadable samples this step's batch replaced (on every rank; one small
        collective per step under data parallelism); stop cleanly, after a checkpoint, once
        more than ``data.max_bad_samples`` distinct samples were bad."""
        found = [(where, why, index == SHARD_FAILURE) for index, where, why in batch.bad_samples]
        if self.dist.world_size > 1:
            n = all_reduce_sum(torch.tensor([float(len(found))], device=self.device))
            if n.item() > 0:
                gathered: list = [None] * self.dist.world_size
                torch.distributed.all_gather_object(gathered, found)
                found = [x for part in gathered for x in part]
            else:
                found = []
        if not found:
            return
        shards = [(where, why) for where, why, shard in found if shard]
        found = [(where, why) for where, why, shard in found if not shard]
        if shards:
            self._bad_shards_in(shards, plan, logger)
        if not found:
            return
        limit = self.cfg.data.max_bad_samples
        new = {where: why for where, why in found if where not in self.bad_samples}
        seen = {**self.bad_samples, **new}
        if len(seen) > limit:
            # Checkpointed as before this batch: resumed with a larger limit, the run (and its
            # counters) equal an uninterrupted run with that limit.
            self._checkpoint(plan)
            raise TrainingError(
                f"step {self.step}: {len(seen)} distinct sample(s) of {self._data_name()} cannot be read, more than "
                f"data.max_bad_samples = {limit} (e.g. {'; '.join(f'{w}: {r}' for w, r in list(seen.items())[-3:])}). "
                f"Checkpoint step_{self.step:08d} was written: repair or remove these samples, or raise data.max_bad_samples, "
                "then --resume"
            )
        self.counters["bad_samples_skipped"] += len(found)
        for where, why in new.items():
            self.bad_samples[where] = why
            if self.dist.is_main:
                self._say(f"step {self.step}: sample {where} cannot be read ({why}); skipped: replaced by the next "
                          f"readable sample ({len(self.bad_samples)} bad so far, data.max_bad_samples = {limit})")
        self.counters["bad_samples"] = len(self.bad_samples)
        logger.write("bad_samples", step=self.step, samples=[w for w, _ in found], distinct_total=len(self.bad_samples))

    def _bad_shards_in(self, shards: list[tuple[str, str]], plan: StagePlan, logger: MetricsLogger) -> None:
        """Streaming: shards that could not be read (or broke off) lose an unknown number of
        samples, so they are counted apart from bad samples, against ``data.max_bad_shards``
        (default 0: the first one stops the run, after a checkpoint, naming it)."""
        limit = self.cfg.data.max_bad_shards
        new = {where: why for where, why in shards if where not in self.bad_shards}
        seen = {**self.bad_shards, **new}
        if len(seen) > limit:
            self._checkpoint(plan)
            raise TrainingError(
                f"step {self.step}: {len(seen)} shard(s) of {self._data_name()} cannot be read, more than "
                f"data.max_bad_shards = {limit}; their samples were lost unseen (e.g. "
                f"{'; '.join(f'{w}: {r}' for w, r in list(seen.items())[-3:])}). Checkpoint step_{self.step:08d} was "
                "written: repair the shards or the storage, or raise data.max_bad_shards to go on without them, then --resume"
            )
        for where, why in new.items():
            self.bad_shards[where] = why
            if self.dist.is_main:
                self._say(f"step {self.step}: shard {where} cannot be read ({why}); its remaining samples are skipped "
                          f"({len(self.bad_shards)} bad shard(s) so far, data.max_bad_shards = {limit})")
        self.counters["bad_shards"] = len(self.bad_shards)
        logger.write("bad_shards", step=self.step, shards=[w for w, _ in shards], distinct_total=len(self.bad_shards))

    def fit(self) -> dict:
        """Run from the current step to the end of the last stage; return a summary."""
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for path in clean_stale_temporaries(self.out / "checkpoints", self.out):
                log.info("removed %s, left by an interrupted write", path)
            write_json_atomic(self.out / "config.json", to_dict(cfg))
        logger = MetricsLogger(self.out, enabled=self.dist.is_main, tensorboard=cfg.train.tensorboard, start_step=self.step)
        try:
            return self._fit(logger)
        except RegionmedError as err:
            logger.write("stopped", step=self.step, error=str(err))
            raise
        finally:
            logger.close()

    def _fit(self, logger: MetricsLogger) -> dict:
        cfg = self.cfg
        first_step = self.step
        per_rank = self.step_batch // self.dist.world_size
        if self.resumed_from:
            logger.write("resume", step=self.step, checkpoint=self.resumed_from,
                         config_changes=[[n, o, v] for n, o, v in self.config_changes])
        problems, fatal = self._learnability()
        unreadable = self.unreadable_records  # named ones; the manifests' statistics may count more
        n_unreadable = max(len(unreadable), self.audit.get("records_unreadable", 0))
        if n_unreadable > cfg.data.max_bad_samples:
            fatal.append(
                f"{n_unreadable} record(s) of {self._data_name()} split {cfg.data.split!r} cannot be read, more than "
                f"data.max_bad_samples = {cfg.data.max_bad_samples} (e.g. {'; '.join(w for w, _ in unreadable[:3])})"
            )
        elif n_unreadable:
            problems.append(f"{n_unreadable} record(s) cannot be read and will be skipped when met: "
                            + "; ".join(r for _, r in unreadable[:5]))
        if fatal:
            raise TrainingError("; ".join(fatal))
        loader = self._loader()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.progress, dynamic_ncols=True)
        if self.dist.is_main:
            for note in [*self.notes, *problems, *self._input_notes()]:
                self._say(note)
            for problem in problems:
                logger.write("warning", step=self.step, message=problem)
            logger.write("data", step=self.step, steps_per_epoch=self.steps_per_epoch,
                         **{"samples": self.n_samples, **dict(self.audit)}, counts_from=self.counts_from, reader=self.reader,
                         resume_guarantee=self.resume_guarantee, samples_per_step=self.step_batch,
                         sources={name: {"weight": w, "split": split, "where": path or urls[:3]}
                                  for name, path, urls, w, split in self.sources})
        plan = stage_at(self.plans, self.step)
        self._enter_stage(plan, logger)
        last: dict[str, float] = {}
        last_val: dict = {}
        t_last, c_last = time.perf_counter(), time.process_time()
        try:
            for batch in loader:
                if self.step >= self.total_steps:  # the streaming loader is endless
                    break
                if self.step >= plan.end:
                    plan = stage_at(self.plans, self.step)
                    self._enter_stage(plan, logger)
                self._bad_samples_in(batch, plan, logger)
                if self.stream_state is not None:
                    self.stream_state.update(batch)
                self._count_sources(batch)
                losses = self.train_step(batch, plan)
                now, cpu_now = time.perf_counter(), time.process_time()
                dt, t_last = now - t_last, now
                dcpu, c_last = cpu_now - c_last, cpu_now
                if losses is None:
                    logger.write("skip", step=self.step, stage=plan.name)
                else:
                    last = losses
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps - 1:
                        record = {f"loss.{k}": v for k, v in losses.items()}
                        if len(self.sources) > 1:
                            record["source_samples"] = {n: self.counters[f"source.{n}"] for n, *_ in self.sources}
                        record.update(step=self.step, stage=plan.name, lr=learning_rate(plan, self.step),
                                      samples_per_s=self.step_batch / dt, samples_per_s_per_rank=per_rank / dt,
                                      step_time_s=dt, step_cpu_s=dcpu, logit_scale=float(self.model.scale().detach()))
                        if self.model.roi_processor is not None:
                            gate_global, gate_region = self.model.roi_processor.gates()
                            record["gate.global"], record["gate.region"] = float(gate_global.detach()), float(gate_region.detach())
                        logger.write("step", **record)
                    bar.set_postfix(stage=plan.name, loss=f"{losses['total']:.3f}", sps=f"{self.step_batch / dt:.1f}")
                self.step += 1
                bar.update(1)
                if cfg.validation.every and (self.step % cfg.validation.every == 0 or self.step == self.total_steps):
                    last_val = self._validate(logger) or last_val
                    t_last, c_last = time.perf_counter(), time.process_time()  # validation time is not step time
                every = cfg.train.checkpoint_every
                if self.step == plan.end or (every and self.step % every == 0):
                    self._checkpoint(plan)
                    t_last, c_last = time.perf_counter(), time.process_time()  # checkpoint time is not step time
        finally:
            bar.close()
        self._sync_truncated()
        self.counters["text_truncated"] = self.model.text_tower.tokenizer.truncated
        summary = {"steps": self.step, "steps_this_run": self.step - first_step, "final_losses": last,
                   "counters": dict(self.counters), "data": dict(self.audit)}
        if last_val:
            summary["validation"] = last_val
        self._check_weights("the model folder")
        if self.dist.is_main:
            save_model_folder(self.model, self.out / "model")
            logger.write("end", **summary)
            for note in self._input_notes(end=True):
                self._say(note)
            try:
                from regionmed.apps.train.metrics import plot_loss_curves

                plot_loss_curves({self.out.name: logger.path}, self.out / "loss_curve.png")
            except Exception as err:  # a plot must never fail a finished training run
                log.warning("loss plot not written: %s", err)
        return summary

    def _loader(self):
        """This rank's loader from the current step: one :class:`Batch` of ``accum_freq x batch_size / world``
        samples per step."""
        cfg, d = self.cfg, self.cfg.data
        pin = {"auto": None, "on": True, "off": False}[d.pin_memory]
        if self.reader == "indexed":
            if isinstance(self.data, MixedSampleDataset):
                sampler = MixedStepBatchSampler(self.data.sizes, [w for _, _, _, w, _ in self.sources], self.step_batch,
                                                cfg.seed, self.total_steps, self.step, self.dist.rank, self.dist.world_size)
            else:
                sampler = StepBatchSampler(len(self.data), self.step_batch, cfg.seed, self.total_steps, self.step,
                                           self.dist.rank, self.dist.world_size)
            return make_loader(self.data, sampler, d.num_workers, cfg.seed, pin_memory=pin, prefetch_factor=d.prefetch_factor)
        stream = MedRegionStream(
            self.stream_sources, self.pre, self.step_batch // self.dist.world_size, seed=cfg.seed, rank=self.dist.rank,
            world=self.dist.world_size, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
            use_rois=uses_boxes(cfg), max_negatives=d.max_negatives, max_image_negatives=d.max_image_negatives,
            resume=self.stream_resume if self.step else None)
        self.resume_guarantee = stream.resume_guarantee
        self.stream_state = StreamState(stream.n_slots, stream.initial_state())
        return make_stream_loader(stream, pin_memory=pin, prefetch_factor=d.prefetch_factor)

    def _validate(self, logger: MetricsLogger) -> dict:
        """Score the held-out split (main process; the others wait) and log a ``val`` record
        at the step just taken; returns the figures (empty on the other processes)."""
        out: dict = {}
        if self.validator is not None:
            out = self.validator.run(self.task)
            logger.write("val", step=self.step - 1, split=self.cfg.validation.split, **out)
            parts = [f"loss {out['loss.total']:.4f}" if "loss.total" in out else "",
                     f"image→report R@1 {out['i2t_R@1']:.1%}" if "i2t_R@1" in out else "",
                     f"region→caption R@1 {out['region_i2t_R@1']:.1%}" if "region_i2t_R@1" in out else ""]
            message = f"validation after step {self.step - 1} ({out['samples']} samples): " + ", ".join(p for p in parts if p)
            if self.progress:
                tqdm.write(message)
            else:
                log.info(message)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        return out

    def _count_sources(self, batch: Batch) -> None:
        """Per-source sample counts of the global batch (mixing), summed over the ranks."""
        if len(self.sources) <= 1:
            return
        names = [n for n, *_ in self.sources]
        local = torch.tensor([float(batch.sources.count(n)) for n in names], device=self.device)
        if self.dist.world_size > 1:
            local = all_reduce_sum(local)
        for n, c in zip(names, local.tolist()):
            self.counters[f"source.{n}"] += int(c)

    def _learnability(self) -> tuple[list[str], list[str]]:
        """What each stage's active losses need that the data lacks, from the dataset's counts
        (:meth:`RegionSampleDataset.audit`, no extra pass): ``(warnings, errors)``. A stage
        where some active term can never be computed gets a warning naming the stage, the
        term and the missing input; a stage where no active term can be computed is an error."""
        if not self.audit:
            return [], []
        a = self.audit
        split = f"split {self.cfg.data.split!r} of {self._data_name()}"
        warnings, errors = [], []
        for plan in self.plans:
            st = plan.config
            active = [k for k, w in st.losses.items() if w > 0]
            missing: dict[str, str] = {}
            if "region" in active and not a.get("regions"):
                missing["region"] = "no regions (usable boxes with captions)"
            if "grounding" in active and not a.get("regions"):
                missing["grounding"] = "no regions (boxes with a label or caption to ground)"
            if "hard_negative" in active:
                region_negs = st.use_rois and a.get("regions") and a.get("region_negatives")
                if not region_negs and not a.get("image_negatives"):
                    missing["hard_negative"] = (f"no hard negatives (none of its images{' or regions' if st.use_rois else ''} "
                                                "carries a negative text)")
                elif st.use_rois and not a.get("regions"):
                    warnings.append(f"stage '{plan.name}' (steps {plan.start}-{plan.end - 1}): {split} has no regions, so the "
                                    "'hard_negative' loss gets no region negatives (only image negatives are used)")
            if st.use_rois and not a.get("regions") and not (set(active) & set(REGION_LOSSES)):
                warnings.append(f"stage '{plan.name}' (steps {plan.start}-{plan.end - 1}) has use_rois on, but {split} has no "
                                "regions: the ROI processor gets no input")
            if not missing:
                continue
            what = f"{split} has " + "; it has ".join(f"{v}, which loss '{k}' needs" for k, v in missing.items())
            if set(active) - set(missing):
                warnings.append(f"stage '{plan.name}' (steps {plan.start}-{plan.end - 1}): {what}: "
                                f"{'these terms are' if len(missing) > 1 else 'this term is'} absent from every step of the stage")
            else:
                errors.append(f"stage '{plan.name}' can learn nothing: {what}")
        return warnings, errors

    def _say(self, message: str) -> None:
        """A warning: above the progress bar when there is one, else to the log."""
        if self.progress:
            tqdm.write(message)
        else:
            log.warning(message)

    def _input_notes(self, end: bool = False) -> list[str]:
        """Human-readable notes on input problems: boxes and ROIs (at the start), texts,
        unreadable samples and skipped steps (at the end)."""
        c = self.counters if end else self.audit
        notes = []
        dropped = sum(c.get(k, 0) for k in ("boxes_dropped_outside", "boxes_dropped_zero_area", "boxes_dropped_invalid"))
        if c.get("boxes_clipped"):
            notes.append(f"{c['boxes_clipped']} box(es) reached past the image and were clipped to it")
        if dropped:
            notes.append(
                f"{dropped} box(es) dropped: {c.get('boxes_dropped_outside', 0)} outside the image, "
                f"{c.get('boxes_dropped_zero_area', 0)} of zero area, {c.get('boxes_dropped_invalid', 0)} invalid"
            )
        if c.get("rois_over_max"):
            notes.append(f"{c['rois_over_max']} region(s) beyond model.roi.max_rois = {self.cfg.model.roi.max_rois} were not used")
        if c.get("text_truncated"):
            notes.append(f"{c['text_truncated']} distinct text(s) were longer than model.text.context_length = "
                         f"{self.cfg.model.text.context_length} tokens and were truncated")
        if c.get("bad_shards"):
            notes.append(f"{c['bad_shards']} shard(s) could not be read (or broke off) and their remaining samples were "
                         "skipped: " + "; ".join(list(self.bad_shards)[:5]))
        if c.get("bad_samples"):
            notes.append(f"{c['bad_samples']} unreadable sample(s) were skipped ({c.get('bad_samples_skipped', 0)} time(s) in all): "
                         + "; ".join(list(self.bad_samples)[:5]))
        if c.get("nonfinite_steps"):
            notes.append(f"{c['nonfinite_steps']} step(s) skipped for a non-finite loss")
        return notes


def train(cfg: RunConfig, resume: str | bool | None = None, progress: bool = True, allow_config_changes: bool = False) -> dict:
    """Train with ``cfg`` (single process, or under torchrun); return the summary (see :class:`Trainer`)."""
    return Trainer(cfg, resume=resume, progress=progress, allow_config_changes=allow_config_changes).fit()
