"""Per-step metrics: JSON lines (always), TensorBoard (when installed), loss plots."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON object per event to ``<output>/metrics.jsonl``.

    Step records have ``"event": "step"``; stage changes, skipped steps and the
    end of training have their own event names. Every record but ``end`` has a
    ``step``.

    ``start_step``: the step the run starts at. The file is first rewritten (atomically)
    to the records of earlier steps, so a run resumed from the checkpoint of step ``S``
    holds each step once — the records a killed run wrote after its last checkpoint are
    dropped, as is a torn last line — and a fresh run (``start_step = 0``) starts an empty
    file. TensorBoard events from ``start_step`` on are purged likewise.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step or None)
            except ImportError:  # tensorboard is optional
                self._tb = None

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None and event == "step":
            for key, value in fields.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key.replace(".", "/"), value, fields["step"])

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: str | Path, step: int) -> int:
    """Rewrite ``path`` (atomically) keeping only the records of steps before ``step``
    (records without a step, such as ``end``, and unparsable lines are dropped); return
    how many records were dropped. A missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("%s: %d record(s) at or after step %d dropped", path, dropped, step)
    return dropped


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn last line (a run killed mid-write) is ignored."""
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON record ({err})") from err
    return records


def stage_curves(steps: list[dict], term: str, bounds: list[tuple[float, float]], smooth: int) -> list[tuple]:
    """``(xs, ys)`` arrays of ``term`` per stage ``[lo, hi)`` of ``bounds``: a moving average of
    ``smooth`` steps within the stage (x = the window's last step), unsmoothed when the stage
    has fewer than ``smooth`` points; stages without the term are left out."""
    import numpy as np

    out = []
    for lo, hi in bounds:
        xs = np.array([r["step"] for r in steps if term in r and lo <= r["step"] < hi])
        ys = np.array([r[term] for r in steps if term in r and lo <= r["step"] < hi], dtype=float)
        if not len(ys):
            continue
        if len(ys) >= smooth > 1:
            ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
            xs = xs[smooth - 1 :]
        out.append((xs, ys))
    return out


def plot_loss_curves(runs: dict[str, str | Path], out_png: str | Path, smooth: int = 5) -> Path:
    """Plot every ``loss.*`` term of each run's metrics.jsonl (one panel per run), with
    stage boundaries as dotted lines, and the validation records' total loss (points)
    and image→report R@1 (right axis) where the run validated. ``runs``: {label:
    metrics.jsonl path}.

    Curves are a moving average of ``smooth`` steps taken *within* each stage (a stage
    changes which terms make the total, so averaging across a boundary would mix two
    different sums); a stage shorter than ``smooth`` steps is drawn unsmoothed, and
    validation points are joined only within a stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (label, path) in zip(axes[0], runs.items()):
        records = read_metrics(path)
        steps = [r for r in records if r["event"] == "step"]
        # One record per step (a resumed run rewrites its metrics to the checkpoint's step;
        # older files may hold a step twice: the last record wins).
        by_step = {r["step"]: r for r in steps}
        steps = [by_step[s] for s in sorted(by_step)]
        starts = sorted({r["step"] for r in records if r["event"] == "stage"} | {0})
        bounds = list(zip(starts, [*starts[1:], float("inf")]))
        terms = sorted({k for r in steps for k in r if k.startswith("loss.")})
        for term in terms:
            color, drawn = None, False
            for xs, ys in stage_curves(steps, term, bounds, smooth):
                (line,) = ax.plot(xs, ys, color=color, label=None if drawn else term[5:], marker="." if len(ys) < 3 else None)
                color, drawn = line.get_color(), True
        # Validation in the loop (apps/train/validation.py): the held-out total, as points
        # joined within a stage (the same terms and scale as the training total there).
        vals = {r["step"]: r for r in records if r["event"] == "val" and "loss.total" in r}
        if vals:
            first = True
            for lo, hi in bounds:
                xs = [s for s in sorted(vals) if lo <= s < hi]
                if xs:
                    ax.plot(xs, [vals[s]["loss.total"] for s in xs], "ko--", markersize=3, linewidth=1,
                            label="val total" if first else None)
                    first = False
            r1 = [(s, vals[s]["i2t_R@1"]) for s in sorted(vals) if "i2t_R@1" in vals[s]]
            if r1:
                twin = ax.twinx()
                twin.plot([s for s, _ in r1], [100 * v for _, v in r1], "s:", color="tab:purple", markersize=3,
                          linewidth=1, label="val image→report R@1 (%)")
                twin.set_ylabel("val R@1 (%)", color="tab:purple")
                twin.legend(fontsize=7, loc="lower left")
        for r in records:
            if r["event"] == "stage":
                ax.axvline(r["step"], color="grey", linestyle=":", linewidth=1)
                ax.text(r["step"], ax.get_ylim()[1], f" {r['stage']}", fontsize=7, va="top", color="grey")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss (moving average of {smooth} within a stage)" if smooth > 1 else "loss")
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
