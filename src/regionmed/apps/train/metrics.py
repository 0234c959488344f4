"""Per-step metrics: JSON lines (always), TensorBoard (when installed), loss plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON object per event to ``<output>/metrics.jsonl``.

    Step records have ``"event": "step"``; stage changes, skipped steps and the
    end of training have their own event names.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
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


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_loss_curves(runs: dict[str, str | Path], out_png: str | Path, smooth: int = 5) -> Path:
    """Plot every ``loss.*`` term of each run's metrics.jsonl (one panel per run),
    with stage boundaries as dotted lines. ``runs``: {label: metrics.jsonl path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (label, path) in zip(axes[0], runs.items()):
        records = read_metrics(path)
        steps = [r for r in records if r["event"] == "step"]
        # A resumed run logs some steps twice: keep the last record of each step.
        by_step = {r["step"]: r for r in steps}
        steps = [by_step[s] for s in sorted(by_step)]
        terms = sorted({k for r in steps for k in r if k.startswith("loss.")})
        for term in terms:
            xs = np.array([r["step"] for r in steps if term in r])
            ys = np.array([r[term] for r in steps if term in r])
            if len(ys) >= smooth > 1:
                ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
                xs = xs[smooth - 1 :]
            ax.plot(xs, ys, label=term[5:])
        for r in records:
            if r["event"] == "stage":
                ax.axvline(r["step"], color="grey", linestyle=":", linewidth=1)
                ax.text(r["step"], ax.get_ylim()[1], f" {r['stage']}", fontsize=7, va="top", color="grey")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss (moving average of {smooth})" if smooth > 1 else "loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
