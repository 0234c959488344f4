"""The streaming, parallel, resumable MedRegion builder.

Two passes, neither holding the dataset in memory:

1. **process** — items stream from the sources through a multiprocessing pool
   (``imap``, in order, with a bounded number in flight). Each worker decodes and
   checks the image, cleans the text, proposes ROIs, makes captions and hard
   negatives, and returns either a record + encoded image or a reject. The main
   process appends results to ``<out>/.staging/`` (``images.bin`` + ``index.jsonl``).
   An interrupted build resumes from the staging folder: items already staged are
   skipped, a half-written last entry is discarded, so nothing is duplicated.
2. **finalize** — splits are assigned from the staged (group, perceptual hash,
   official split) triples (:mod:`.splits`); the staged samples stream into
   size-bounded tar shards (:class:`~regionmed.data.shards.MedRegionWriter`),
   every reject goes to ``rejects.jsonl`` with a reason, and ``manifest.json`` is
   written last. Then the staging folder is removed.

Re-running with the same config on a complete build does nothing ("up to date") when the
inputs are unchanged too: a complete build records every file its sources read
(``build-inputs.jsonl``, :mod:`.inputs`), and a re-run that finds one changed, added or
gone stops, naming each and ``--force``, rather than keep data built from other bytes. An
interrupted build whose inputs changed before it resumed starts its staging over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from regionmed.apps.curation import BUILDER_VERSION
from regionmed.apps.curation.captions import (
    CaptionConfig,
    apply_report_captions,
    clean_report,
    make_negatives,
    make_summary,
    region_caption,
    report_text,
)
from regionmed.apps.curation.config import BuildConfig, ConfigError
from regionmed.apps.curation.images import ItemReject, load_image, phash_hex, sha256
from regionmed.apps.curation.inputs import LEDGER_NAME, changes, describe, ledger, read_input, read_ledger, write_ledger
from regionmed.apps.curation.items import REJECT_REASONS, RawItem, hashed, norm_modality
from regionmed.apps.curation.proposers import make_proposer
from regionmed.apps.curation.sources import SourceError, get_source
from regionmed.apps.curation.sources.base import SourceReport
from regionmed.apps.curation.splits import assign_splits
from regionmed.data.decode import DECODING_POLICY
from regionmed.data.schema import SCHEMA_VERSION, sanitize_box
from regionmed.data.shards import MANIFEST_NAME, MedRegionWriter, write_json_atomic, write_manifest
from regionmed.errors import RegionmedError
from regionmed.io import read_json
from regionmed.outputs import refuse_inside_inputs
from regionmed.threads import one_thread

STAGING = ".staging"
REJECTS_NAME = "rejects.jsonl"
CHECKS_NAME = "checks.json"  # the source checks of this run, in the staging folder
INPUTS_NAME = "inputs.json"  # the ledger lines of this run's inputs as checked (no paths), in the staging folder
BOX_REASONS = {"outside": "box_outside", "zero_area": "zero_area_box", "invalid": "invalid_box"}


class BuildError(RegionmedError, RuntimeError):
    """A build that cannot run (bad output folder, config mismatch)."""


# --------------------------------------------------------------------------- worker side

_CTX: dict[str, Any] = {}


def _init_worker(cfg: BuildConfig, pool: bool = False) -> None:
    if pool:  # one of cfg.workers processes: one torch thread each (regionmed.threads)
        one_thread()
    _CTX["cfg"] = cfg
    _CTX["proposer"] = make_proposer(cfg.proposer)


def _reject(item: RawItem, reason: str, detail: str = "") -> dict:
    return {"status": "reject", "id": item.id, "source": item.source, "ref": item.ref, "reason": reason, "detail": detail}


def process_item(item: RawItem) -> dict:
    """Turn one raw item into a staged sample or a reject (runs in a worker). The image file
    is read once, here: its size, time and SHA-256 go to the result's ``input`` (the build's
    ledger, :func:`~regionmed.apps.curation.inputs.read_input`) and its bytes are decoded."""
    raw, seen = (None, None)
    if item.image_path and item.image_bytes is None:
        raw, seen = read_input(item.image_path)
        if raw:
            item = dataclasses.replace(item, image_bytes=raw)
    try:
        res = _process(item)
    except ItemReject as rej:
        res = _reject(item, rej.reason, rej.detail)
    except Exception as err:  # noqa: BLE001 - one bad input must not stop the build
        res = _reject(item, "processing_error", type(err).__name__)
    if seen is not None:
        res["input"] = seen
    return res


def _process(item: RawItem) -> dict:
    cfg: BuildConfig = _CTX["cfg"]
    ccfg: CaptionConfig = cfg.captions
    if item.reject:  # the source already knows (malformed row, invalid label, undecodable text)
        raise ItemReject(*item.reject)
    region_rejects = []
    if any(b.reject for b in item.boxes):  # boxes known to be unusable when read: region-level rejects
        for j, b in enumerate(item.boxes):
            if b.reject:
                region_rejects.append({"status": "region_reject", "id": item.id, "source": item.source, "region": j,
                                       "label": b.label, "reason": b.reject, "detail": b.detail or "given box"})
        item = dataclasses.replace(item, boxes=[b for b in item.boxes if not b.reject])
    report = report_text(item.report, item.facts, item.summary, ccfg.scrub_dates)
    if not report:
        raise ItemReject("empty_report", "no report text or facts")
    loaded = load_image(
        item.image_path, item.image_bytes, max_pixels=cfg.image.max_pixels, max_side=cfg.image.max_side,
        dicom_options={"window": cfg.image.dicom_window},
    )
    img = loaded.image
    width, height = img.size
    if any(b.ref_size for b in item.boxes):  # boxes drawn on an image of another size (VOC <size>)
        kept = []
        for j, b in enumerate(item.boxes):
            if b.ref_size and tuple(b.ref_size) != tuple(loaded.source_size):
                region_rejects.append({"status": "region_reject", "id": item.id, "source": item.source, "region": j,
                                       "label": b.label, "reason": "size_mismatch",
                                       "detail": f"{b.detail or 'given box'}: drawn on a {b.ref_size[0]}x{b.ref_size[1]} "
                                                 f"image, the image is {loaded.source_size[0]}x{loaded.source_size[1]}"})
            else:
                kept.append(b)
        item = dataclasses.replace(item, boxes=kept)
    modality = item.modality
    if modality in ("auto", "unknown", ""):
        modality = norm_modality(str(loaded.meta.get("Modality", ""))) if loaded.meta else (modality or "unknown")
        if modality in ("auto", ""):
            modality = "unknown"
    body = item.body or str(loaded.meta.get("BodyPartExamined", "")).lower()
    summary = (clean_report(item.summary, ccfg.scrub_dates) if item.summary else "") or make_summary(report, ccfg)
    src_w = loaded.source_size[0]  # boxes are in pixels of the displayed (EXIF-oriented) source image
    scale = width / src_w if src_w else 1.0
    proposals = _CTX["proposer"].propose(item, img, scale)
    regions = []
    for j, (label, box, src) in enumerate(proposals):
        clean, status = sanitize_box(list(box), width, height)
        if clean is None:
            region_rejects.append({"status": "region_reject", "id": item.id, "source": item.source, "region": j,
                                   "label": label, "reason": BOX_REASONS.get(status, "invalid_box"),
                                   "detail": f"box {['%.1f' % v for v in box]} in {width}x{height} image"})
            continue
        caption, loc = region_caption(label, clean, width, height, modality, body, ccfg, loaded.pixel_spacing)
        region = {"box": [round(v, 2) for v in clean], "label": label, "caption": caption, "source": src,
                  "location": loc, "_key": f"{item.id}/{j}"}
        if item.kinds.get(label):
            region["kind"] = item.kinds[label]
        regions.append(region)
    # Report sentences that describe a region (anatomy / laterality / zone), recorded with their
    # rule (captions.report_captions: extra, replace or off); negatives are made from the final caption.
    apply_report_captions(regions, report, height, ccfg)
    for reg in regions:
        reg["negatives"] = make_negatives(reg["caption"], ccfg.negatives_per_region, ccfg, key=reg.pop("_key"))
    if cfg.require_regions and not regions:
        raise ItemReject("no_regions", "no region left after proposing and clipping")
    meta = {k: v for k, v in {**item.meta, **loaded.meta}.items() if isinstance(v, (str, int, float))}
    record = {
        "schema_version": SCHEMA_VERSION,
        "id": item.id,
        "split": "train",  # set in finalize
        "source": item.source,
        "modality": modality,
        "width": width,
        "height": height,
        "summary": summary,
        "report": report,
        "negatives": make_negatives(summary, ccfg.negatives_per_image, ccfg, key=item.id),
        "regions": regions,
        "labels": dict(item.labels),
        "group": "g-" + hashed(item.group or loaded.patient_key or item.id, cfg.split.salt),
        "meta": meta,
        "sha256": sha256(loaded.data),
        "phash": phash_hex(img),
    }
    return {
        "status": "ok", "id": item.id, "source": item.source, "ref": item.ref, "record": record, "image": loaded.data,
        "ext": loaded.ext, "official_split": item.split, "region_rejects": region_rejects,
    }


# --------------------------------------------------------------------------- main side


@dataclass
class BuildSummary:
    out: str
    up_to_date: bool = False
    inputs: int = 0
    built: int = 0
    resumed: int = 0
    rejected: Counter = field(default_factory=Counter)
    region_rejects: Counter = field(default_factory=Counter)
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    regions: int = 0
    split_stats: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"MedRegion build -> {self.out}" + ("  (up to date: nothing to do)" if self.up_to_date else "")]
        lines.append(f"{'source':<12} {'inputs':>7} {'built':>7} {'rejected':>9}  reasons")
        for name, s in self.per_source.items():
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items())) or "-"
            lines.append(f"{name:<12} {s['inputs']:>7} {s['built']:>7} {sum(s['rejected'].values()):>9}  {reasons}")
        nrej = sum(self.rejected.values())
        lines.append(f"{'total':<12} {self.inputs:>7} {self.built:>7} {nrej:>9}")
        ok = "OK" if self.inputs == self.built + nrej else "MISMATCH"
        lines.append(f"accounted: {self.inputs} inputs = {self.built} built + {nrej} rejected [{ok}]")
        if self.region_rejects:
            lines.append("regions dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.region_rejects.items())))
        lines.append(f"regions kept: {self.regions}; splits: " + ", ".join(f"{k}={v}" for k, v in self.splits.items()))
        if self.split_stats:
            lines.append("split groups: " + ", ".join(f"{k}={v}" for k, v in self.split_stats.items()))
        if self.resumed:
            lines.append(f"resumed: {self.resumed} items were already staged by an interrupted run")
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _iter_items(cfg: BuildConfig) -> Iterator[RawItem]:
    for spec in cfg.sources:
        source = get_source(spec.name, spec.root, limit=spec.limit, repeat=spec.repeat, **spec.options)
        yield from source


def check_sources(cfg: BuildConfig, files: bool = False) -> list[SourceReport]:
    """Read every row of every source of ``cfg`` without decoding images (see
    :meth:`~regionmed.apps.curation.sources.Source.check`); ``files`` also checks that
    image files exist. Never raises for the data: a source that cannot be opened (missing
    folder, bad option) gets a report with the error. Used before every build, and by
    ``regionmed check-source`` / ``regionmed build --dry-run``."""
    reports = []
    for spec in cfg.sources:
        try:
            source = get_source(spec.name, spec.root, limit=spec.limit, repeat=spec.repeat, **spec.options)
        except RegionmedError as err:
            rep = SourceReport(spec.name, str(spec.root))
            rep.errors.append(str(err))
            reports.append(rep)
            continue
        rep = source.check(files=files)
        if rep.boxes and "annotation" not in (cfg.proposer.name, cfg.proposer.fallback):
            rep.warnings.append(f"{spec.name}: {rep.boxes} boxes are given but the proposer is {cfg.proposer.name!r} "
                                "without fallback 'annotation': they are not used")
        reports.append(rep)
    return reports


def _checked_sources(cfg: BuildConfig, log: Callable[[str], None]) -> list[SourceReport]:
    """:func:`check_sources`, logging notes and warnings; stops (SourceError) on any error."""
    reports = check_sources(cfg)
    errors = [e for rep in reports for e in rep.errors]
    for rep in reports:
        for note in rep.notes:
            log(f"note: {note}")
        for w in rep.warnings:
            log(f"WARNING: {w}")
    if errors:
        raise SourceError("the sources cannot be built as configured (run regionmed check-source for a full account):\n  "
                          + "\n  ".join(errors))
    return reports


def _read_staging(staging: Path) -> tuple[list[str], int]:
    """Valid staged ids, after cutting a half-written tail from index.jsonl and images.bin."""
    index, images = staging / "index.jsonl", staging / "images.bin"
    ids: list[str] = []
    good_bytes = 0
    img_end = 0
    img_size = images.stat().st_size if images.exists() else 0
    if index.exists():
        with open(index, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    break
                if entry.get("status") == "ok":
                    end = entry["offset"] + entry["size"]
                    if end > img_size:
                        break
                    img_end = max(img_end, end)
                ids.append(entry["id"])
                good_bytes += len(raw)
        with open(index, "r+b") as fh:
            fh.truncate(good_bytes)
    if images.exists():
        with open(images, "r+b") as fh:
            fh.truncate(img_end)
    return ids, len(ids)


def build(
    cfg: BuildConfig,
    force: bool = False,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> BuildSummary:
    """Build (or resume, or confirm) the dataset described by ``cfg``.

    ``stop_after`` processes at most that many new items and returns without
    finalizing (used to test resumption).
    """
    cfg.validate()
    if not cfg.out:
        raise ConfigError("no output folder (out) given")
    out = refuse_inside_inputs(cfg.out, inputs=[(f"the folder of source {s.name!r}", s.root) for s in cfg.sources], flag="out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists() and not (out / STAGING).exists():
        raise BuildError(f"{out} is not empty and holds no MedRegion dataset: choose an empty or new folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    chash = cfg.config_hash()
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file() and not force:
        try:
            prov = read_json(manifest_path, BuildError, "the dataset's manifest").get("provenance", {})
        except (BuildError, AttributeError):
            prov = {}
        if prov.get("config_hash") == chash and prov.get("complete"):
            _inputs_unchanged(cfg, out, prov, log)
            shutil.rmtree(out / STAGING, ignore_errors=True)
            summary = _summary_from_manifest(out, prov)
            log(summary.format())
            return summary
        raise BuildError(
            f"{out} already holds a dataset built with another config (hash {prov.get('config_hash')}, "
            f"this config {chash}); use --force to rebuild it"
        )
    try:  # every row of every source is read first: a source that cannot be built stops here
        reports = _checked_sources(cfg, log)
    except SourceError:
        if created:
            try:
                out.rmdir()  # only the empty folder this call made
            except OSError:
                pass
        raise
    staging = out / STAGING
    state_path = staging / "state.json"
    lines = ledger([i for rep in reports for i in rep.inputs])  # the inputs as checked now (no paths)
    files_digest = _files_digest(lines)
    resumed_ids: list[str] = []
    state = _read_state(state_path) if staging.is_dir() and not force else {}
    if state.get("config_hash") == chash and state.get("builder_version") == BUILDER_VERSION:
        resumed_ids, _ = _read_staging(staging)
        stale = _staged_inputs_changed(staging, lines) if state.get("inputs") == files_digest else ["a table or text file"]
        if resumed_ids and stale:
            log(f"not resuming: inputs changed since the interrupted run ({describe(stale)}): starting over")
            resumed_ids = []
            shutil.rmtree(staging, ignore_errors=True)
        elif resumed_ids:
            log(f"resuming: {len(resumed_ids)} items already staged")
    if not resumed_ids:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_json_atomic(state_path, {"config_hash": chash, "builder_version": BUILDER_VERSION, "inputs": files_digest})
    if force and manifest_path.exists():
        manifest_path.unlink()

    write_json_atomic(staging / CHECKS_NAME, [r.to_json() for r in reports])
    write_json_atomic(staging / INPUTS_NAME, lines)
    done = set(resumed_ids)
    total = sum(r.total for r in reports)
    seen: set[str] = set(done)
    dup_rejects: list[dict] = []
    window = max(8, max(1, cfg.workers) * cfg.chunksize * 4)
    sem = threading.BoundedSemaphore(window)

    def feed() -> Iterator[RawItem]:
        for item in _iter_items(cfg):
            if item.id in done:
                continue
            if item.id in seen:
                dup_rejects.append(_reject(item, "duplicate_id", "an earlier input has the same id"))
                continue
            seen.add(item.id)
            sem.acquire()
            yield item

    new = 0
    with open(staging / "images.bin", "ab") as img_fh, open(staging / "index.jsonl", "a", encoding="utf-8") as idx_fh:
        offset = img_fh.tell()

        def stage(res: dict) -> None:
            nonlocal offset
            if res["status"] == "ok":
                data = res.pop("image")
                img_fh.write(data)
                img_fh.flush()
                res["offset"], res["size"] = offset, len(data)
                offset += len(data)
            idx_fh.write(json.dumps(res, ensure_ascii=False) + "\n")
            idx_fh.flush()

        bar = tqdm(total=total, initial=len(done), desc="process", unit="img", disable=not cfg.progress, dynamic_ncols=True)
        if cfg.workers <= 1:
            _init_worker(cfg)
            results = map(process_item, feed())
            pool = None
        else:
            ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
            pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, True))
            results = pool.imap(process_item, feed(), chunksize=cfg.chunksize)
        try:
            for res in results:
                sem.release()
                stage(res)
                new += 1
                bar.update(1)
                while dup_rejects:
                    stage(dup_rejects.pop(0))
                    bar.update(1)
                if stop_after is not None and new >= stop_after:
                    break
            while dup_rejects:
                stage(dup_rejects.pop(0))
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
    if stop_after is not None and new >= stop_after:
        log(f"stopped after {new} new items (staged in {staging}); run again to resume")
        return BuildSummary(out=str(out), resumed=len(done))
    summary = finalize(cfg, out, chash, log)
    summary.resumed = len(done)
    log(summary.format())
    return summary


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def _files_digest(lines: list[dict]) -> str:
    """A digest of the ``file`` inputs (tables, JSON, text) as checked: their content."""
    rows = sorted((line["key"], line["sha256"]) for line in lines if line["kind"] == "file")
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _staged_inputs_changed(staging: Path, lines: list[dict]) -> list[str]:
    """The images staged by an interrupted run whose size or time differ now (``lines``:
    the inputs as checked now), or that this run no longer reads."""
    now = {line["key"]: line for line in lines}
    found = []
    if not (staging / "index.jsonl").is_file():
        return found
    for entry in _iter_index(staging):
        seen = entry.get("input")
        if not seen:
            continue
        line = now.get(seen["key"])
        if line is None or (line["size"], line["mtime_ns"]) != (seen["size"], seen["mtime_ns"]):
            found.append(f"{entry.get('source')}: image of {entry.get('ref') or entry.get('id')}")
    return found


def _inputs_unchanged(cfg: BuildConfig, out: Path, prov: dict, log: Callable[[str], None]) -> None:
    """Check that the inputs of a complete build with this config are those it was built
    from (:func:`~regionmed.apps.curation.inputs.changes`): reads every row of every source
    again (as check-source does: no image decoded) and stats each image. Raises
    :class:`BuildError` naming what changed and ``--force``; a build made before inputs
    were recorded is accepted with a warning."""
    recorded = read_ledger(out)
    if recorded is None and not prov.get("input_files"):
        log(f"WARNING: {out} was built before regionmed recorded the inputs of a build: a change to them since cannot "
            "be seen; run with --force to rebuild from the inputs as they are now")
        return
    try:
        reports = _checked_sources(cfg, lambda s: None)
    except SourceError as err:
        raise BuildError(f"{out} is complete, but its sources cannot be read as configured now, so whether it is up to "
                         f"date cannot be said: {err}") from None
    found = changes(recorded or [], [i for rep in reports for i in rep.inputs]) if recorded is not None else \
        [f"{LEDGER_NAME} is missing or unreadable"]
    if found:
        raise BuildError(f"{out} was built from inputs that changed since ({len(found)}): {describe(found)}. Nothing was "
                         "rebuilt or kept as up to date: run again with --force to rebuild from the inputs as they are now")


def _iter_index(staging: Path) -> Iterator[dict]:
    with open(staging / "index.jsonl", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def finalize(cfg: BuildConfig, out: Path, chash: str, log: Callable[[str], None] = print) -> BuildSummary:
    """Assign splits and write shards, rejects.jsonl and manifest.json from the staging folder."""
    staging = out / STAGING
    groups: list[str] = []
    hashes: list[int] = []
    official: list[str | None] = []
    for e in _iter_index(staging):
        if e["status"] == "ok":
            groups.append(e["record"]["group"])
            hashes.append(int(e["record"]["phash"], 16))
            official.append(e.get("official_split"))
    sp = cfg.split
    result = assign_splits(groups, hashes, official, (sp.train, sp.val, sp.test), sp.near_dup_threshold, sp.salt)
    del groups, hashes, official
    for old in list(out.glob("*.tar")):
        old.unlink()
    summary = BuildSummary(out=str(out))
    summary.split_stats = {"components": result.components, "near_duplicate_links": result.near_dup_links,
                           "moved_to_stricter_split": result.moved}
    checks_path = staging / CHECKS_NAME
    reports = [SourceReport.from_json(r) for r in json.loads(checks_path.read_text(encoding="utf-8"))] if checks_path.is_file() else []
    per_source: dict[str, dict[str, Any]] = {s.name: {"inputs": 0, "built": 0, "rejected": Counter()} for s in cfg.sources}
    kept_given: Counter = Counter()  # per source: regions kept from given boxes
    writers: dict[str, MedRegionWriter] = {}
    k = 0
    total = len(result.splits)
    bar = tqdm(total=None, desc="write shards", unit="rec", disable=not cfg.progress, dynamic_ncols=True)
    with open(staging / "images.bin", "rb") as img_fh, open(out / REJECTS_NAME, "w", encoding="utf-8") as rej_fh:
        for e in _iter_index(staging):
            src = per_source.setdefault(e["source"], {"inputs": 0, "built": 0, "rejected": Counter()})
            src["inputs"] += 1
            summary.inputs += 1
            if e["status"] == "ok":
                split = result.splits[k]
                k += 1
                rec = e["record"]
                rec["split"] = split
                img_fh.seek(e["offset"])
                data = img_fh.read(e["size"])
                w = writers.get(split)
                if w is None:
                    w = writers[split] = MedRegionWriter(out, split, cfg.shards.max_count, cfg.shards.max_size)
                w.write(rec, data, e["ext"])
                src["built"] += 1
                summary.built += 1
                summary.regions += len(rec["regions"])
                kept_given[e["source"]] += sum(g.get("source") == "annotation" for g in rec["regions"])
                for rr in e.get("region_rejects", []):
                    summary.region_rejects[rr["reason"]] += 1
                    rej_fh.write(json.dumps({"level": "region", **{x: rr[x] for x in ("id", "source", "region", "label", "reason", "detail")}}) + "\n")
            else:
                src["rejected"][e["reason"]] += 1
                summary.rejected[e["reason"]] += 1
                rej_fh.write(json.dumps({"level": "item", **{x: e.get(x, "") for x in ("id", "source", "ref", "reason", "detail")}}) + "\n")
            bar.update(1)
        for rep in reports:  # boxes that reach no item: region-level rejects without an item id
            for o in rep.orphans:
                summary.region_rejects[o["reason"]] += 1
                rej_fh.write(json.dumps({"level": "region", **{x: o.get(x) for x in ("id", "source", "ref", "region", "label", "reason", "detail")}}) + "\n")
    bar.close()
    assert k == total
    for rep in reports:
        summary.warnings += rep.warnings
        if rep.boxes and not kept_given[rep.source]:
            dropped = Counter(rep.box_problems)
            summary.warnings.append(
                f"{rep.source}: {rep.boxes} boxes were given but NONE was kept as a region"
                + (f" (read-time rejects: {', '.join(f'{k}={v}' for k, v in sorted(dropped.items()))})" if dropped else "")
                + "; see rejects.jsonl (level region) and check box_format, coordinates and how boxes join images")
    splits = {}
    for name, w in sorted(writers.items()):
        w.close()
        splits[name] = w.summary()
        summary.splits[name] = w.samples
    summary.per_source = per_source
    provenance = {
        "builder": "regionmed.apps.curation",
        "builder_version": BUILDER_VERSION,
        "config_hash": chash,
        "complete": True,
        "sources": [
            {"name": s.name, "root_name": Path(s.root).name, "limit": s.limit, "repeat": s.repeat,
             "inputs": per_source[s.name]["inputs"], "built": per_source[s.name]["built"],
             "rejected": dict(per_source[s.name]["rejected"])}
            for s in cfg.sources
        ],
        "proposer": cfg.proposer.name + (f"+{cfg.proposer.fallback}" if cfg.proposer.fallback else ""),
        "inputs": summary.inputs,
        "built": summary.built,
        "rejected": dict(summary.rejected),
        "region_rejects": dict(summary.region_rejects),
        "regions": summary.regions,
        "split_stats": summary.split_stats,
        "warnings": summary.warnings,
        "source_checks": [{"name": r.source, "rows": r.rows, "boxes": r.boxes, "problems": dict(r.problems),
                           "box_problems": dict(r.box_problems), "labels": dict(r.labels),
                           "uncertain_labels": r.uncertain_policy, "columns_read": r.columns_read,
                           "columns_unused": r.columns_unused} for r in reports],
        "image_decoding": DECODING_POLICY,
        "reject_reasons": {k: REJECT_REASONS.get(k, k) for k in set(summary.rejected) | set(summary.region_rejects)},
    }
    inputs_path = staging / INPUTS_NAME
    lines = json.loads(inputs_path.read_text(encoding="utf-8")) if inputs_path.is_file() else []
    read = {e["input"]["key"]: e["input"] for e in _iter_index(staging) if e.get("input")}
    for line in lines:  # an image as the worker read it: size and time before, hash of the bytes decoded
        if line["kind"] == "image" and line["key"] in read:
            line.update({k: read[line["key"]][k] for k in ("size", "mtime_ns", "sha256")})
    provenance["input_files"] = {"file": LEDGER_NAME, "count": len(lines), "sha256": write_ledger(out, lines)}
    write_manifest(out, splits, provenance)
    if not cfg.keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _summary_from_manifest(out: Path, prov: dict) -> BuildSummary:
    manifest = read_json(out / MANIFEST_NAME, BuildError, "the dataset's manifest")
    s = BuildSummary(out=str(out), up_to_date=True)
    s.inputs, s.built = prov.get("inputs", 0), prov.get("built", 0)
    s.rejected = Counter(prov.get("rejected", {}))
    s.region_rejects = Counter(prov.get("region_rejects", {}))
    s.regions = prov.get("regions", 0)
    s.split_stats = prov.get("split_stats", {})
    s.warnings = list(prov.get("warnings", []))
    s.splits = {k: v.get("samples", 0) for k, v in manifest.get("splits", {}).items()}
    s.per_source = {x["name"]: {"inputs": x["inputs"], "built": x["built"], "rejected": Counter(x["rejected"])} for x in prov.get("sources", [])}
    return s
