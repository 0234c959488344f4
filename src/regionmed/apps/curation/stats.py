"""Dataset statistics for ``regionmed stats DIR``: a text table and a PNG plot."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from regionmed.data.shards import MedRegionDataset, read_manifest


def collect(root: str | Path, progress: bool = True) -> dict[str, Any]:
    """Regions per image, box sizes, caption lengths, class and modality counts (all splits)."""
    root = Path(root)
    manifest = read_manifest(root)
    regions_per_image: list[int] = []
    box_rel_size: list[float] = []
    lens: dict[str, list[int]] = {"summary": [], "report": [], "region": [], "negative": []}
    classes: Counter = Counter()
    region_labels: Counter = Counter()
    modalities: Counter = Counter()
    splits: Counter = Counter()
    sources: Counter = Counter()
    rules: Counter = Counter()
    for split in manifest["splits"]:
        ds = MedRegionDataset(root, split)
        try:
            for i in tqdm(range(len(ds)), desc=f"stats {split}", unit="rec", disable=not progress, leave=False):
                r = ds.record(i)
                splits[split] += 1
                sources[r.get("source", "?")] += 1
                modalities[r.get("modality", "unknown")] += 1
                for k, v in r.get("labels", {}).items():
                    if v:
                        classes[k] += 1
                regs = r.get("regions", [])
                regions_per_image.append(len(regs))
                lens["summary"].append(len(r["summary"].split()))
                lens["report"].append(len(r["report"].split()))
                area = float(r["width"] * r["height"])
                for g in regs:
                    x0, y0, x1, y1 = g["box"]
                    box_rel_size.append(((x1 - x0) * (y1 - y0) / area) ** 0.5)
                    lens["region"].append(len(g["caption"].split()))
                    region_labels[g.get("label") or "?"] += 1
                    for n in g.get("negatives", []):
                        lens["negative"].append(len(n["text"].split()))
                        rules[n.get("rule", "?")] += 1
        finally:
            ds.close()
    return {
        "images": int(sum(splits.values())), "splits": dict(splits), "sources": dict(sources),
        "modalities": dict(modalities), "classes": dict(classes), "region_labels": dict(region_labels),
        "negative_rules": dict(rules), "regions_per_image": regions_per_image, "box_rel_size": box_rel_size,
        "caption_words": lens,
    }


def _describe(values) -> str:
    if not values:
        return "n=0"
    a = np.asarray(values, dtype=float)
    return f"n={a.size} mean={a.mean():.2f} median={np.median(a):.2f} p5={np.percentile(a, 5):.2f} p95={np.percentile(a, 95):.2f} max={a.max():.2f}"


def format_table(st: dict[str, Any], top: int = 15) -> str:
    lines = [f"images: {st['images']}"]
    for key in ("splits", "sources", "modalities"):
        lines.append(f"{key}: " + ", ".join(f"{k}={v}" for k, v in sorted(st[key].items())))
    lines.append(f"regions per image: {_describe(st['regions_per_image'])}")
    lines.append(f"box size (sqrt of area fraction): {_describe(st['box_rel_size'])}")
    for k, v in st["caption_words"].items():
        lines.append(f"{k} caption words: {_describe(v)}")
    lines.append("negative rules: " + ", ".join(f"{k}={v}" for k, v in sorted(st["negative_rules"].items())))
    for key in ("classes", "region_labels"):
        items = sorted(st[key].items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"{key} (top {top} of {len(items)}):")
        lines += [f"  {name:<32} {count:>6}" for name, count in items[:top]]
    return "\n".join(lines)


def plot(st: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    rpi = st["regions_per_image"]
    ax.hist(rpi, bins=range(0, (max(rpi) if rpi else 0) + 2), color="tab:blue")
    ax.set_title("regions per image")
    ax = axes[0, 1]
    ax.hist(st["box_rel_size"], bins=30, color="tab:orange")
    ax.set_title("box size (sqrt area fraction)")
    ax = axes[0, 2]
    for k, v in st["caption_words"].items():
        if v:
            ax.hist(v, bins=30, alpha=0.5, label=k)
    ax.set_title("caption length (words)")
    ax.legend()
    for ax, key in ((axes[1, 0], "classes"), (axes[1, 1], "region_labels")):
        items = sorted(st[key].items(), key=lambda kv: -kv[1])[:15]
        ax.barh([k[:24] for k, _ in items][::-1], [v for _, v in items][::-1], color="tab:green")
        ax.set_title(f"{key} (top 15)")
        ax.tick_params(axis="y", labelsize=7)
    ax = axes[1, 2]
    mods = sorted(st["modalities"].items())
    ax.bar([k for k, _ in mods], [v for _, v in mods], color="tab:purple")
    ax.set_title("modalities")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
