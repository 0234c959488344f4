"""The progressive schedule: stages resolved to step ranges, and the learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

from regionmed.apps.train.config import StageConfig


@dataclass(frozen=True)
class StagePlan:
    index: int
    config: StageConfig
    start: int  # first global step of the stage
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def name(self) -> str:
        return self.config.name


def plan_stages(stages: list[StageConfig], steps_per_epoch: int) -> list[StagePlan]:
    """Resolve ``steps`` / ``epochs`` into consecutive global step ranges."""
    plans, start = [], 0
    for i, st in enumerate(stages):
        steps = st.steps if st.steps is not None else max(1, math.ceil(st.epochs * steps_per_epoch))
        plans.append(StagePlan(i, st, start, steps))
        start += steps
    return plans


def stage_at(plans: list[StagePlan], step: int) -> StagePlan:
    for plan in plans:
        if step < plan.end:
            return plan
    return plans[-1]


def learning_rate(plan: StagePlan, step: int) -> float:
    """Linear warm-up to the stage's lr, then cosine decay to ``lr * min_lr_ratio``."""
    st = plan.config
    local = step - plan.start
    if local < st.warmup_steps:
        return st.lr * (local + 1) / st.warmup_steps
    decay_steps = max(1, plan.steps - st.warmup_steps)
    progress = min(1.0, (local - st.warmup_steps) / decay_steps)
    floor = st.lr * st.min_lr_ratio
    return floor + (st.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
