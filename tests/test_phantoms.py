"""The phantom generator: determinism, records, boxes, conventions, negatives, shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from regionmed.apps.curation.phantoms import (
    LEVELS,
    NODULE_RADIUS,
    NORMAL_REPORT,
    NORMAL_SUMMARY,
    PhantomConfig,
    generate_phantom,
    render_phantom,
    write_phantom_dataset,
)
from regionmed.data.schema import validate_record
from regionmed.data.shards import MedRegionDataset, read_manifest

CFG = PhantomConfig()
SMALL = PhantomConfig(image_size=96)
REGION_RULES = {"laterality", "zone", "finding", "size", "severity", "negation"}


@pytest.fixture(scope="module")
def renders():
    """120 phantoms at 256 px with their layers (about 0.5 s)."""
    return [render_phantom(i, 7, "train", CFG, keep_layers=True) for i in range(120)]


@pytest.fixture(scope="module")
def records():
    """600 records (small images: the text does not depend on the image size)."""
    return [generate_phantom(i, 3, split, SMALL)[1] for split in ("train", "test") for i in range(300)]


def test_same_arguments_give_identical_phantoms():
    for index in (0, 5, 123):
        img_a, rec_a = generate_phantom(index, 11, "train", CFG)
        img_b, rec_b = generate_phantom(index, 11, "train", CFG)
        assert img_a.dtype == np.uint8 and img_a.shape == (CFG.image_size, CFG.image_size)
        assert np.array_equal(img_a, img_b)
        assert rec_a == rec_b
        assert json.loads(json.dumps(rec_a)) == rec_a  # plain JSON types only
    # and the inputs matter: index, seed and split each change the image
    base, _ = generate_phantom(0, 11, "train", CFG)
    for other in (generate_phantom(1, 11, "train", CFG), generate_phantom(0, 12, "train", CFG), generate_phantom(0, 11, "test", CFG)):
        assert not np.array_equal(base, other[0])


def test_images_are_all_different_and_radiograph_like(renders):
    images = [r.image for r in renders]
    flat = {img.tobytes() for img in images}
    assert len(flat) == len(images)
    for r in renders[:20]:
        img = r.image.astype(float)
        lung = img[r.lung_mask > 0.95].mean()
        central = img[r.central_mask > 0.95].mean()
        corner = img[:8, :8].mean()
        assert corner < lung < central  # dark background, dark lungs, bright mediastinum/heart


def test_records_validate_and_agree_with_their_facts(records):
    for rec in records:
        validate_record(rec)
        split, index = rec["split"], rec["meta"]["index"]
        assert rec["id"] == f"phantom-{split}-{index:06d}" == rec["group"]
        assert rec["source"] == "phantom" and rec["modality"] == "xray"
        assert rec["width"] == rec["height"] == SMALL.image_size
        assert set(rec["labels"]) == set(SMALL.findings)
        present = {r["label"] for r in rec["regions"]}
        assert {k for k, v in rec["labels"].items() if v} == present
        zones = [(r["side"], r["level"]) for r in rec["regions"]]
        assert len(zones) == len(set(zones))  # at most one finding per zone
        assert len(rec["regions"]) <= SMALL.max_findings
        if not rec["regions"]:
            assert rec["report"] == NORMAL_REPORT and rec["summary"] == NORMAL_SUMMARY
            continue
        sentences = rec["report"].split(". ")
        assert len(sentences) == len(rec["regions"]) + 1
        for region, sentence in zip(rec["regions"], sentences):
            caption = region["caption"]
            assert sentence == f"There is a {caption}"
            assert region["label"] in caption and region["side"] in caption and region["level"] in caption
            assert len(caption.split()) <= 12
            assert region["source"] == "annotation"
        assert rec["report"].endswith("The heart size is normal.")


def test_normal_fraction_is_respected(records):
    normal = sum(not rec["regions"] for rec in records)
    # 600 draws at p = 0.15: mean 90, sd ~8.7
    assert 55 <= normal <= 125
    none = [generate_phantom(i, 0, "train", PhantomConfig(image_size=64, min_findings=2))[1] for i in range(40)]
    assert all(2 <= len(r["regions"]) <= 3 for r in none)


def test_boxes_inside_image_and_contain_a_bright_finding(renders):
    checked = 0
    for r in renders:
        s = r.image.shape[0]
        img = r.image.astype(float)
        all_findings = np.zeros_like(r.lung_mask)
        for m in r.finding_masks:
            all_findings = np.maximum(all_findings, m)
        clear_lung = (r.lung_mask > 0.9) & (r.central_mask < 0.1) & (all_findings < 0.02)
        for region, mask in zip(r.record["regions"], r.finding_masks):
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s
            xi0, yi0, xi1, yi1 = (int(v) for v in (x0, y0, x1, y1))
            # the box holds the finding (every pixel where it is at least half present) ...
            outside = mask.copy()
            outside[yi0:yi1, xi0:xi1] = 0
            assert outside.max() <= 0.5 and mask[yi0:yi1, xi0:xi1].sum() >= 0.85 * mask.sum()
            # ... and is tight: a pad of 1-2 px around where the finding is
            ys, xs = np.nonzero(mask > 0.1)
            assert xs.min() - 3 <= x0 and x1 <= xs.max() + 4 and ys.min() - 3 <= y0 and y1 <= ys.max() + 4
            # brighter than the clear lung around it
            m = max(8, (xi1 - xi0) // 2)
            ring = np.zeros_like(clear_lung)
            ring[max(0, yi0 - m) : yi1 + m, max(0, xi0 - m) : xi1 + m] = True
            ring[yi0:yi1, xi0:xi1] = False
            ring &= clear_lung
            background = img[ring].mean() if ring.sum() >= 20 else img[clear_lung].mean()
            assert img[yi0:yi1, xi0:xi1].mean() > background + 5, (r.record["id"], region)
            assert img[mask > 0.5].mean() > background + 15, (r.record["id"], region)
            checked += 1
    assert checked > 100


def test_side_and_level_follow_the_radiological_convention(renders):
    sides = set()
    for r in renders:
        s = r.image.shape[0]
        for region in r.record["regions"]:
            x0, y0, x1, y1 = region["box"]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            sides.add(region["side"])
            if region["side"] == "right":  # the patient's right is on the image left
                assert cx < s / 2, region
            else:
                assert cx > s / 2, region
            if region["label"] == "effusion":
                continue  # its box runs from the meniscus to the base
            zy0, zy1 = r.zones[(region["side"], region["level"])]
            assert zy0 <= cy <= zy1, (region, (zy0, zy1))
    assert sides == {"right", "left"}


def test_size_words_follow_the_pixels(renders):
    widths = {("nodule", "small"): [], ("nodule", "large"): [], ("mass", "small"): [], ("mass", "large"): []}
    for r in renders:
        for region, fact in zip(r.record["regions"], r.findings):
            assert (region["label"], region["side"], region["level"]) == (fact.kind, fact.side, fact.level)
            if fact.kind in ("nodule", "mass"):
                widths[(fact.kind, fact.word)].append(region["box"][2] - region["box"][0])
    assert all(widths.values())
    mean = {k: float(np.mean(v)) for k, v in widths.items()}
    assert mean[("nodule", "small")] < mean[("nodule", "large")] < mean[("mass", "small")] < mean[("mass", "large")]
    # nodules stay small (diameter <= 6% of the image: <= 8 px at the demo's 128 px); box = disc + 2 px pad
    assert max(widths[("nodule", "large")]) <= 2 * NODULE_RADIUS[1] * CFG.image_size + 2 * 2 + 1


def test_effusions_only_in_lower_zones(records):
    effusions = [r for rec in records for r in rec["regions"] if r["label"] == "effusion"]
    assert len(effusions) > 30
    assert all(r["level"] == "lower" and r["caption"] == f"{r['side']} lower zone pleural effusion" for r in effusions)
    for rec in records:
        for region in rec["regions"]:
            for neg in region["negatives"]:
                if "effusion" in neg["text"] and not neg["text"].startswith("no "):
                    assert "lower zone" in neg["text"]


def test_region_negatives_are_near_misses_that_are_false(records):
    for rec in records:
        captions = {r["caption"] for r in rec["regions"]}
        facts = {(r["label"], r["side"], r["level"]) for r in rec["regions"]}
        for region in rec["regions"]:
            negs = region["negatives"]
            assert len(negs) == SMALL.negatives_per_region
            texts = [n["text"] for n in negs]
            assert len(set(texts)) == len(texts)
            other_side = "left" if region["side"] == "right" else "right"
            mirror_taken = all(
                (region["label"], other_side, lv) in facts for lv in (LEVELS if region["label"] != "effusion" else ["lower"])
            )
            if not mirror_taken:  # laterality applies: it comes first
                assert negs[0]["rule"] == "laterality"
            else:  # e.g. bilateral effusions: "left lower zone pleural effusion" would be true
                assert all(n["rule"] != "laterality" for n in negs)
            zone_free = any(
                (region["label"], region["side"], lv) not in facts for lv in LEVELS if lv != region["level"]
            )
            if region["label"] != "effusion" and zone_free:  # zone applies: it comes second
                assert negs[1]["rule"] == "zone"
            for neg in negs:
                assert neg["rule"] in REGION_RULES
                assert neg["text"] != region["caption"] and neg["text"] not in captions
                assert len(neg["text"].split()) <= 12
                if neg["rule"] == "negation":
                    assert neg["text"].startswith("no ")
                    continue
                # the negated claim names a finding that is not at that place in this image
                words = neg["text"].split()
                kind = "effusion" if "effusion" in words else next(k for k in ("nodule", "mass", "opacity") if k in words)
                side = "right" if "right" in words else "left"
                level = next(lv for lv in LEVELS if lv in words)
                assert (kind, side, level) not in facts or (kind, side, level) == (
                    region["label"],
                    region["side"],
                    region["level"],
                ) and neg["rule"] in ("size", "severity")
            for neg in negs:
                if neg["rule"] == "laterality":
                    assert other_side in neg["text"].split() and region["side"] not in neg["text"].split()


def test_region_negative_count_follows_config():
    for n in (0, 1, 2, 6):
        cfg = PhantomConfig(image_size=64, negatives_per_region=n, min_findings=3)
        for i in range(10):
            for region in generate_phantom(i, 0, "train", cfg)[1]["regions"]:
                negs = region["negatives"]
                if n <= 3:
                    assert len(negs) == n
                else:  # as many distinct valid near-misses as there are, up to n
                    assert 3 <= len(negs) <= n and len({x["text"] for x in negs}) == len(negs)
                if n >= 1 and region["label"] != "effusion":  # (bilateral effusions have no laterality near-miss)
                    assert negs[0]["rule"] == "laterality"


def test_image_negatives(records):
    for rec in records:
        negs = rec["negatives"]
        assert 1 <= len(negs) <= 2
        texts = [n["text"] for n in negs]
        assert rec["report"] not in texts and len(set(texts)) == len(texts)
        for neg in negs:
            assert neg["rule"] in ("laterality", "negation")
        if rec["regions"]:
            assert negs[-1]["rule"] == "negation"
            if len(rec["regions"]) == 1:
                assert negs[-1]["text"] == NORMAL_REPORT
            else:  # one finding fewer: its sentence is gone, the others are kept
                kept = negs[-1]["text"].split(". ")
                assert len(kept) == len(rec["regions"]) and set(kept) < set(rec["report"].split(". "))
        else:
            assert all(n["rule"] == "negation" and n["text"].startswith("There is a") for n in negs)


def test_write_phantom_dataset_round_trip(tmp_path):
    cfg = PhantomConfig(image_size=64)
    manifest = write_phantom_dataset(
        tmp_path / "ph", n_train=7, n_test=3, seed=5, config=cfg, n_val=2, shard_max_count=3, progress=False
    )
    assert manifest == read_manifest(tmp_path / "ph")
    assert manifest["provenance"]["source"] == "phantom"
    assert manifest["provenance"]["seed"] == 5
    assert manifest["provenance"]["config"]["image_size"] == 64
    for split, n in (("train", 7), ("val", 2), ("test", 3)):
        info = manifest["splits"][split]
        assert info["samples"] == n == sum(s["samples"] for s in info["shards"])
        assert len(info["shards"]) == -(-n // 3)
        ds = MedRegionDataset(tmp_path / "ph", split)
        assert len(ds) == n
        assert info["regions"] == sum(len(ds.record(i)["regions"]) for i in range(n))
        for i in range(n):
            image, record = ds[i]
            want_image, want_record = generate_phantom(i, 5, split, cfg)
            assert record == want_record
            assert np.array_equal(np.asarray(image), want_image)
        ds.close()


def test_image_i_does_not_depend_on_dataset_size(tmp_path):
    cfg = PhantomConfig(image_size=64)
    write_phantom_dataset(tmp_path / "a", n_train=3, n_test=1, config=cfg, progress=False)
    write_phantom_dataset(tmp_path / "b", n_train=6, n_test=2, config=cfg, progress=False)
    for split, n in (("train", 3), ("test", 1)):
        a, b = MedRegionDataset(tmp_path / "a", split), MedRegionDataset(tmp_path / "b", split)
        for i in range(n):
            assert a.record(i) == b.record(i)
            assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))
        a.close()
        b.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 32},
        {"min_findings": 3, "max_findings": 2},
        {"max_findings": 7},
        {"normal_fraction": 1.5},
        {"negatives_per_region": -1},
        {"findings": ("nodule", "fracture")},
        {"findings": ()},
        {"findings": ("effusion",), "min_findings": 3, "max_findings": 3},
    ],
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        PhantomConfig(**kwargs)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        generate_phantom(0, 0, "dev", CFG)
    with pytest.raises(ValueError):
        generate_phantom(-1, 0, "train", CFG)


# --- finding_scale ---------------------------------------------------------------------------

# sha256 over the pixels and records of phantoms 0..3 of the train and test splits (seed 0, the
# default config), computed with the generator as it was before finding_scale existed.
BEFORE_FINDING_SCALE = "9264015cf66dddb99d07b5936665769035e009f274bad750f27b46c383b59098"


def _digest(config):
    import hashlib

    h = hashlib.sha256()
    for split in ("train", "test"):
        for i in range(4):
            image, record = generate_phantom(i, 0, split, config)
            h.update(image.tobytes())
            h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def test_finding_scale_one_gives_the_images_of_before():
    assert _digest(PhantomConfig(finding_scale=1.0)) == _digest(None) == BEFORE_FINDING_SCALE


@pytest.mark.parametrize("value", [0, -0.5, 2.5, float("nan"), float("inf"), "0.5", True, None])
def test_bad_finding_scale_is_refused(value):
    with pytest.raises(ValueError, match="finding_scale"):
        PhantomConfig(finding_scale=value)


def test_finding_scale_shrinks_lesions_keeps_effusions_and_the_draws():
    """Same facts (kinds, zones, size words: the thresholds scale too), the same effusions; the
    nodule, mass and opacity footprints shrink by about the scale squared."""
    half = PhantomConfig(finding_scale=0.5)
    areas = {kind: [] for kind in ("nodule", "mass", "opacity", "effusion")}
    for i in range(40):
        a, b = render_phantom(i, 5, "train", CFG, keep_layers=True), render_phantom(i, 5, "train", half, keep_layers=True)
        assert a.findings == b.findings  # the RNG draw sequence is unchanged
        for fact, ma, mb in zip(a.findings, a.finding_masks, b.finding_masks):
            areas[fact.kind].append(float(mb.sum()) / float(ma.sum()))
            if fact.kind == "effusion":
                assert np.array_equal(ma, mb)
    assert all(areas.values())
    for kind in ("nodule", "mass", "opacity"):
        assert 0.15 < float(np.median(areas[kind])) < 0.4, (kind, np.median(areas[kind]))


def test_finding_scale_is_recorded_in_the_provenance(tmp_path):
    manifest = write_phantom_dataset(tmp_path / "d", 2, 1, seed=1, config=PhantomConfig(finding_scale=0.3), progress=False)
    assert manifest["provenance"]["config"]["finding_scale"] == 0.3
    assert read_manifest(tmp_path / "d")["provenance"]["config"]["finding_scale"] == 0.3


def test_demo_finding_scale_hides_small_nodules_at_the_global_size_but_not_in_their_crops():
    """The criterion the demo's finding_scale was chosen by (regionmed.apps.demo.DEMO_FINDING_SCALE):
    a small nodule's peak contrast / local texture-noise level is below 1 at the global input size
    (128 px) and clearly above it (> 3) in its ROI crop (margin 0.25, 64 px), as medians over the
    small nodules of 150 held-out phantoms; at the generator's default size they stand out at 128 px."""
    from regionmed.apps.curation.phantoms import finding_contrast
    from regionmed.apps.demo import DEMO_FINDING_SCALE

    def small_nodules(scale, n):
        out = []
        for i in range(n):
            r = render_phantom(i, 0, "test", PhantomConfig(finding_scale=scale), keep_layers=True)
            out += [finding_contrast(r, k, image_size=128, roi_size=64, context_margin=0.25)
                    for k, f in enumerate(r.findings) if f.kind == "nodule" and f.word == "small"]
        return out

    demo = small_nodules(DEMO_FINDING_SCALE, 150)
    assert len(demo) >= 8
    assert float(np.median([c["global_cnr"] for c in demo])) < 1.0
    assert float(np.median([c["crop_cnr"] for c in demo])) > 3.0
    assert sum(c["crop_cnr"] > c["global_cnr"] for c in demo) >= 0.9 * len(demo)
    default = small_nodules(1.0, 60)
    assert float(np.median([c["global_cnr"] for c in default])) > 2.0
