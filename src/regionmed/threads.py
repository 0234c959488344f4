"""Torch threads that fit the machine (issue 20).

PyTorch starts as many intra-op (OpenMP) threads as the machine has cores, whatever else runs.
Two such processes on two cores oversubscribe them, and OpenMP's waiting threads then slow each
process about 7x (measured on this project's 2-core machine: an ablation step went from 2.8 s
to 17-22 s while another job ran). :func:`choose_threads` picks the count instead:

1. ``requested`` (the ``--threads`` option of the commands, ``train.threads`` of a run config);
2. else the ``REGIONMED_THREADS`` environment variable, else ``OMP_NUM_THREADS`` (a user who set
   it meant it; but ``1`` with several local ranks is torchrun's own default, which it sets
   whenever ``nproc_per_node > 1``: then 3. applies);
3. else the cores this process may use (:func:`cores_available`: its CPU affinity, capped by a
   cgroup CPU quota), shared among the local ranks (``LOCAL_WORLD_SIZE``, set by torchrun) and,
   for a single process, less the cores other processes keep busy on its CPUs (:func:`busy_cores`,
   sampled from ``/proc/stat`` when the process starts; not under a cgroup quota, where other
   containers' work shows there too), at least 1.

Data-loader workers use one thread each: PyTorch's DataLoader sets that in its workers, and the
builder's worker pool does the same (:func:`one_thread`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from regionmed.errors import RegionmedError

log = logging.getLogger(__name__)

__all__ = ["ThreadsError", "ThreadPlan", "busy_cores", "choose_threads", "cores_available", "one_thread", "set_threads"]

ENV = "REGIONMED_THREADS"


class ThreadsError(RegionmedError, ValueError):
    """A thread count (option or environment variable) that is not a whole number >= 1."""


@dataclass(frozen=True)
class ThreadPlan:
    """``threads``: intra-op threads; ``source``: why (``option``, ``REGIONMED_THREADS``,
    ``OMP_NUM_THREADS`` or ``cores``); ``cores``, ``local_ranks``, ``busy``: what ``cores`` used."""

    threads: int
    source: str
    cores: int
    local_ranks: int = 1
    busy: float = 0.0

    def describe(self) -> str:
        if self.source != "cores":
            return f"{self.threads} torch thread(s) ({self.source})"
        return (f"{self.threads} torch thread(s): {self.cores} core(s) available, {self.local_ranks} local rank(s), "
                f"{self.busy:.1f} core(s) busy with other processes at start")


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cfs_quota/period``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cores_available() -> int:
    """Cores this process may run on: its CPU affinity (``os.sched_getaffinity``; ``os.cpu_count``
    where that does not exist), capped by a cgroup CPU quota rounded up. At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cpu_times(stat: Path, cpus: set[int] | None) -> tuple[int, int] | None:
    """(total, idle) jiffies summed over the per-CPU lines ``cpuN`` of ``cpus`` (all when None)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    total = idle = 0
    seen = False
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        try:
            cpu = int(fields[0][3:])
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus:
            continue
        seen = True
        total += sum(values)
        idle += values[3] + values[4]
    return (total, idle) if seen else None


def _own_cpu_ticks() -> int:
    t = os.times()
    return int(round((t.user + t.system) * os.sysconf("SC_CLK_TCK")))


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def busy_cores(interval: float = 0.2, stat: Path = Path("/proc/stat"), cpus: set[int] | None = None) -> float:
    """Cores kept busy by other processes among the CPUs this process may run on (``cpus``;
    default its affinity), sampled over ``interval`` seconds from the per-CPU lines of
    ``/proc/stat`` (this process's own CPU time left out). 0.0 where it cannot be read."""
    cpus = _affinity() if cpus is None else cpus
    first, own0 = _cpu_times(stat, cpus), _own_cpu_ticks()
    if first is None:
        return 0.0
    time.sleep(interval)
    second, own1 = _cpu_times(stat, cpus), _own_cpu_ticks()
    if second is None or second[0] <= first[0]:
        return 0.0
    total, idle = second[0] - first[0], second[1] - first[1]
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    busy_ticks = max(0, total - idle - (own1 - own0))
    return busy_ticks / total * n


def choose_threads(requested: int | None = None, *, local_ranks: int | None = None, environ=os.environ,
                   cores: int | None = None, busy: float | None = None) -> ThreadPlan:
    """The thread count for this process (see the module docstring for the order). ``cores`` and
    ``busy`` are measured when not given. Raises :class:`ThreadsError` for a count below 1 (option or env)."""
    if requested is not None:
        if int(requested) < 1:
            raise ThreadsError(f"threads must be >= 1, got {requested}")
        return ThreadPlan(int(requested), "option", cores or 0)
    raw_ranks = environ.get("LOCAL_WORLD_SIZE", "").strip()
    try:
        env_ranks = max(1, int(raw_ranks)) if raw_ranks else 1
    except ValueError:
        raise ThreadsError(f"LOCAL_WORLD_SIZE={raw_ranks!r} is not a whole number of processes") from None
    for name in (ENV, "OMP_NUM_THREADS"):
        raw = environ.get(name, "").strip()
        if name == "OMP_NUM_THREADS" and raw == "1" and env_ranks > 1:
            continue  # torchrun's own default for several local ranks, not a user's choice: share the cores instead
        if raw:
            try:
                n = int(raw)
            except ValueError:
                raise ThreadsError(f"{name}={raw!r} is not a whole number of threads") from None
            if n < 1:
                raise ThreadsError(f"{name} must be >= 1, got {n}")
            return ThreadPlan(n, name, cores or 0)
    ranks = env_ranks if local_ranks is None else max(1, local_ranks)
    cores = cores_available() if cores is None else cores
    if busy is None:  # siblings of a multi-rank launch are counted by `ranks`, not sampled
        quota = _cgroup_cpus()
        affinity = _affinity()
        capped = quota is not None and affinity is not None and quota < len(affinity)
        # under a cgroup quota /proc/stat counts other containers' work on the same CPUs: not ours to leave
        busy = busy_cores() if ranks == 1 and not capped else 0.0
    free = cores - int(round(busy)) if ranks == 1 else cores
    return ThreadPlan(max(1, free // ranks), "cores", cores, ranks, busy)


def set_threads(requested: int | None = None, **kwargs) -> ThreadPlan:
    """:func:`choose_threads`, then ``torch.set_num_threads``; logs the plan (INFO) and returns it."""
    import torch

    plan = choose_threads(requested, **kwargs)
    torch.set_num_threads(plan.threads)
    log.info("%s", plan.describe())
    return plan


def one_thread(*_args) -> None:
    """For a worker process (a pool initializer or a DataLoader ``worker_init_fn``): one torch
    thread. Torch is not imported for it: where the worker has not imported torch yet,
    ``OMP_NUM_THREADS=1`` is set for the import to come."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    else:
        os.environ["OMP_NUM_THREADS"] = "1"
