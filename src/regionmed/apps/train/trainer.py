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

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from regionmed.apps.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from regionmed.apps.train.config import RunConfig
from regionmed.apps.train.metrics import MetricsLogger
from regionmed.apps.train.schedule import StagePlan, learning_rate, plan_stages, stage_at
from regionmed.config import to_dict
from regionmed.data.loader import Batch, RegionSampleDataset, StepBatchSampler, make_loader
from regionmed.data.transforms import Preprocessor
from regionmed.distributed import DistInfo, init_distributed
from regionmed.errors import RegionmedError
from regionmed.model.clip import RegionMedCLIP, create_model
from regionmed.optim import GuardedStep, NonFiniteError
from regionmed.task import TrainingTask

log = logging.getLogger(__name__)



class TrainingError(RegionmedError, RuntimeError):
    pass


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

    Reads the MedRegion dataset ``cfg.data.train``; writes into ``cfg.train.output_dir``:
    ``metrics.jsonl``, ``checkpoints/``, ``model/`` (the final model folder),
    ``config.json`` (the resolved run config) and ``loss_curve.png``.
    """

    def __init__(self, cfg: RunConfig, resume: str | bool | None = None, progress: bool = True, dist: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist or init_distributed()
        self.device = self.dist.device
        self.out = Path(cfg.train.output_dir)
        self.progress = progress and self.dist.is_main
        seed_everything(cfg.seed)
        self.model = create_model(cfg.model).to(self.device)
        self.notes: list[str] = []  # said once at the start of fit()
        if self.dist.world_size > 1 and self.model.image_tower.batchnorms:
            if self.device.type == "cuda":
                self.model.image_tower = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.image_tower)
            else:
                self.notes.append(
                    f"image tower {cfg.model.image.name!r} has BatchNorm and PyTorch has no CPU SyncBatchNorm: each of the "
                    f"{self.dist.world_size} processes normalises whole images with its own batch statistics (not equal to "
                    "one process); on GPUs they are synchronised"
                )
        self.pre = Preprocessor.from_model(self.model)
        self.data = RegionSampleDataset(
            cfg.data.train, cfg.data.split, self.pre, cfg.data.max_negatives, use_rois=cfg.model.roi.mode != "none",
            max_image_negatives=cfg.data.max_image_negatives,
        )
        self.steps_per_epoch = len(self.data) // cfg.train.batch_size
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{cfg.data.train}: split {cfg.data.split!r} has {len(self.data)} samples, fewer than one batch of {cfg.train.batch_size}"
            )
        self.plans = plan_stages(cfg.train.stages, self.steps_per_epoch)
        self.total_steps = self.plans[-1].end
        self.optimizer = build_optimizer(self.model, cfg)
        self.task = TrainingTask(self.model, cfg.data.max_negatives, cfg.data.max_image_negatives)
        self.runner: torch.nn.Module = self.task  # the DDP wrapper of the current stage, under torchrun
        self.guard = GuardedStep(cfg.train.precision, cfg.train.grad_clip, cfg.train.max_nonfinite)
        self.step = 0
        self.counters: Counter = Counter()
        self.audit = self.data.audit() if self.data.use_rois else Counter()
        if resume:
            path = self.out if resume is True else Path(resume)
            state = load_checkpoint(find_checkpoint(path), self.model, self.optimizer)
            self.step = int(state["step"])
            self.guard.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
            self.counters = Counter(state.get("counters", {}))
            log.info("resumed from %s at step %d", state["checkpoint"], self.step)

    # ---------------------------------------------------------------------------------
    def _enter_stage(self, plan: StagePlan, logger: MetricsLogger) -> None:
        st = plan.config
        wanted = set(self.model.module_groups()) if "all" in st.trainable else set(st.trainable)
        if not st.use_rois:
            # Unused in this stage: it gets no gradient (AdamW skips it, as in one process),
            # and DDP needs every parameter it reduces to take part in the loss.
            wanted.discard("roi_processor")
        self.model.set_trainable(sorted(wanted))
        self.task.set_stage(st.losses, st.use_rois)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device] if self.device.type == "cuda" else None
            self.runner = self.task  # release the previous stage's wrapper (and its gradient hooks) first
            self.runner = DistributedDataParallel(self.task, device_ids=device_ids, broadcast_buffers=True)
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
        logger.write("stage", step=self.step, stage=plan.name, losses=plan.config.losses,
                     use_rois=plan.config.use_rois, trainable=plan.config.trainable, trainable_params=n_train)

    def _state(self, plan: StagePlan) -> dict:
        return {"stage": plan.name, "nonfinite_in_row": self.guard.nonfinite_in_row, "counters": dict(self.counters),
                "config": to_dict(self.cfg), "world_size": self.dist.world_size}

    def _checkpoint(self, plan: StagePlan) -> None:
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
        batch = batch.to(self.device)
        with self.guard.autocast(self.device):
            terms = self.runner(batch)
        try:
            losses = self.guard.step(terms, self.optimizer, self.model.parameters(), where=f"step {self.step}")
        except NonFiniteError as err:
            raise TrainingError(f"{err} (train.max_nonfinite)") from err
        if losses is None:
            self.counters["nonfinite_steps"] += 1
            self._say(self.guard.last_skip)
        return losses

    def fit(self) -> dict:
        """Run from the current step to the end of the last stage; return a summary."""
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2), encoding="utf-8")
        logger = MetricsLogger(self.out, enabled=self.dist.is_main, tensorboard=cfg.train.tensorboard)
        per_rank = cfg.train.batch_size // self.dist.world_size
        sampler = StepBatchSampler(len(self.data), cfg.train.batch_size, cfg.seed, self.total_steps, self.step,
                                   self.dist.rank, self.dist.world_size)
        loader = make_loader(self.data, sampler, cfg.data.num_workers, cfg.seed)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.progress, dynamic_ncols=True)
        if self.dist.is_main:
            for note in [*self.notes, *self._input_notes()]:
                self._say(note)
            logger.write("data", step=self.step, steps_per_epoch=self.steps_per_epoch, **{"samples": len(self.data), **dict(self.audit)})
        plan = stage_at(self.plans, self.step)
        self._enter_stage(plan, logger)
        last: dict[str, float] = {}
        t_last = time.perf_counter()
        try:
            for batch in loader:
                if self.step >= plan.end:
                    plan = stage_at(self.plans, self.step)
                    self._enter_stage(plan, logger)
                losses = self.train_step(batch, plan)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                if losses is None:
                    logger.write("skip", step=self.step, stage=plan.name)
                else:
                    last = losses
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps - 1:
                        record = {f"loss.{k}": v for k, v in losses.items()}
                        record.update(step=self.step, stage=plan.name, lr=learning_rate(plan, self.step),
                                      samples_per_s=cfg.train.batch_size / dt, samples_per_s_per_rank=per_rank / dt,
                                      step_time_s=dt, logit_scale=float(self.model.scale().detach()))
                        if self.model.roi_processor is not None:
                            record["gate.global"] = float(torch.tanh(self.model.roi_processor.global_gate.detach()))
                            record["gate.region"] = float(torch.tanh(self.model.roi_processor.region_gate.detach()))
                        logger.write("step", **record)
                    bar.set_postfix(stage=plan.name, loss=f"{losses['total']:.3f}", sps=f"{cfg.train.batch_size / dt:.1f}")
                self.step += 1
                bar.update(1)
                every = cfg.train.checkpoint_every
                if self.step == plan.end or (every and self.step % every == 0):
                    self._checkpoint(plan)
                    t_last = time.perf_counter()  # checkpoint time is not step time
        finally:
            bar.close()
        self.counters["text_truncated"] = self.model.text_tower.tokenizer.truncated
        summary = {"steps": self.step, "final_losses": last, "counters": dict(self.counters), "data": dict(self.audit)}
        if self.dist.is_main:
            self.model.save_pretrained(self.out / "model")
            logger.write("end", **summary)
            for note in self._input_notes(end=True):
                self._say(note)
            try:
                from regionmed.apps.train.metrics import plot_loss_curves

                plot_loss_curves({self.out.name: logger.path}, self.out / "loss_curve.png")
            except Exception as err:  # a plot must never fail a finished training run
                log.warning("loss plot not written: %s", err)
        logger.close()
        return summary

    def _say(self, message: str) -> None:
        """A warning: above the progress bar when there is one, else to the log."""
        if self.progress:
            tqdm.write(message)
        else:
            log.warning(message)

    def _input_notes(self, end: bool = False) -> list[str]:
        """Human-readable notes on input problems: boxes and ROIs (at the start), texts and skipped steps (at the end)."""
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
        if c.get("nonfinite_steps"):
            notes.append(f"{c['nonfinite_steps']} step(s) skipped for a non-finite loss")
        return notes


def train(cfg: RunConfig, resume: str | bool | None = None, progress: bool = True) -> dict:
    """Train with ``cfg`` (single process, or under torchrun); return the summary."""
    return Trainer(cfg, resume=resume, progress=progress).fit()
