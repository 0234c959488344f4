"""Patient grouping (issue 10, kind 8): a hashed patient key groups the splits for every source
that has one (DICOM PatientID included), and the near-duplicate check does not merge patients."""

from __future__ import annotations

import csv
import io
import random
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from conftest_build import data_dir, read_all_records  # noqa: F401
from regionmed.apps.curation.builder import build
from regionmed.apps.curation.config import BuildConfig, SourceSpec, SplitConfig
from regionmed.apps.curation.dicom import read_dicom
from regionmed.apps.curation.images import NEAR_DUP_THRESHOLD, PHASH_BITS, phash
from regionmed.apps.curation.leakage import find_overlaps
from regionmed.apps.curation.splits import assign_splits, near_duplicate_pairs
from regionmed.data.decode import decode_image
from regionmed.data.shards import MedRegionWriter, write_manifest
from test_build_dicom import PHI_STRINGS, make_dicom


def _film(seed: int, size=96) -> np.ndarray:
    """A distinct 12-bit 'film' per seed (smooth random blobs: distinct perceptual hashes)."""
    rng = np.random.default_rng(seed)
    small = rng.random((6, 6))
    big = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float64)
    return (big / 255 * 4000).astype(np.uint16)


def _dicom_with_patient(arr: np.ndarray, patient_id: str) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(arr)))
    ds.PatientID = patient_id
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom_export(tmp_path, patients: dict[str, int]):
    """``patients``: PatientID -> number of files; returns (folder, {file stem: PatientID})."""
    src = tmp_path / "export"
    src.mkdir()
    owner, seed = {}, 0
    for pid, n in patients.items():
        for k in range(n):
            stem = f"f{seed:03d}"
            (src / f"{stem}.dcm").write_bytes(_dicom_with_patient(_film(seed), pid))
            (src / f"{stem}.txt").write_text(f"Chest film {k} of a patient. Clear lungs.")
            owner[stem] = pid
            seed += 1
    return src, owner


def _records_by_patient(out, src, owner) -> dict[str, list[dict]]:
    from regionmed.apps.curation.sources import get_source

    id_to_stem = {item.id: item.image_path.rsplit("/", 1)[-1][:-4] for item in get_source("dicom", str(src))}
    by = defaultdict(list)
    for r in read_all_records(out):
        by[owner[id_to_stem[r["id"]]]].append(r)
    return by


def test_four_dicom_files_of_one_patient_land_in_one_split(tmp_path, capsys):
    patients = {"MRN-83612047": 4, **{f"OTHER-{k:02d}": 1 for k in range(12)}}
    src, owner = _dicom_export(tmp_path, patients)
    out = tmp_path / "out"
    logged: list[str] = []
    cfg = BuildConfig(out=str(out), workers=0, progress=False, sources=[SourceSpec("dicom", str(src))],
                      split=SplitConfig(train=0.34, val=0.33, test=0.33))
    summary = build(cfg, log=logged.append)
    assert summary.built == 16
    by = _records_by_patient(out, src, owner)
    four = by["MRN-83612047"]
    assert len(four) == 4
    assert len({r["group"] for r in four}) == 1 and len({r["split"] for r in four}) == 1
    others = {r["group"] for pid, recs in by.items() if pid != "MRN-83612047" for r in recs}
    assert len(others) == 12 and four[0]["group"] not in others  # one group per patient, not merged
    assert len({r["split"] for recs in by.values() for r in recs}) == 3  # the ratios do spread the patients
    # the identifier is nowhere: not in any output file, not in the logs
    blobs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    text = "\n".join(logged) + capsys.readouterr().out
    for s in ["MRN-83612047", "83612047", *PHI_STRINGS]:
        assert s.encode() not in blobs and s not in text
    assert find_overlaps(out) == []  # check-leakage: no image and no patient group across splits


def test_patient_key_is_a_salted_hash_and_placeholders_do_not_merge(tmp_path):
    a = read_dicom(_dicom_with_patient(_film(1), "MRN-83612047"), max_pixels=10**7)
    b = read_dicom(_dicom_with_patient(_film(2), "MRN-83612047"), max_pixels=10**7)
    c = read_dicom(_dicom_with_patient(_film(3), "MRN-83612048"), max_pixels=10**7)
    assert a.patient_key == b.patient_key != c.patient_key
    assert "83612047" not in a.patient_key and a.patient_key.startswith("dicom/patient/")
    for placeholder in ("ANONYMOUS", "", "  ", "0000", "Unknown"):
        assert read_dicom(_dicom_with_patient(_film(4), placeholder), max_pixels=10**7).patient_key is None
    # a build of an anonymised export: every file its own group (not one giant patient)
    src, owner = _dicom_export(tmp_path, {"ANONYMOUS": 5})
    out = tmp_path / "out"
    build(BuildConfig(out=str(out), workers=0, progress=False, sources=[SourceSpec("dicom", str(src))]), log=lambda s: None)
    assert len({r["group"] for r in read_all_records(out)}) == 5


def test_table_patient_column_wins_over_dicom_patient_id(tmp_path):
    """With a table, the row's patient_id groups; files without one fall back to PatientID."""
    src = tmp_path / "export"
    src.mkdir()
    rows = []
    for k in range(4):
        (src / f"f{k}.dcm").write_bytes(_dicom_with_patient(_film(10 + k), f"DICOM-{k}"))
        rows.append({"image": f"f{k}.dcm", "report": "Clear lungs.", "patient_id": "T1" if k < 2 else ""})
    with open(src / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "report", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    build(BuildConfig(out=str(out), workers=0, progress=False, sources=[SourceSpec("dicom", str(src))]), log=lambda s: None)
    groups = sorted(r["group"] for r in read_all_records(out))
    assert len(groups) == 4 and len(set(groups)) == 3  # f0+f1 share T1; f2, f3 their own PatientIDs


# --------------------------------------------------------------------------- near duplicates


def test_near_duplicate_pairs_is_exact():
    rng = random.Random(3)
    for bits, threshold in ((PHASH_BITS, NEAR_DUP_THRESHOLD), (64, 4), (PHASH_BITS, 0)):
        hashes = []
        for _ in range(30):
            base = rng.getrandbits(bits)
            for _ in range(4):
                h = base
                for _ in range(rng.randrange(threshold + 10)):
                    h ^= 1 << rng.randrange(bits)
                hashes.append(h)
        brute = [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                 if (hashes[i] ^ hashes[j]).bit_count() <= threshold]
        assert near_duplicate_pairs(hashes, threshold, bits) == brute
    assert near_duplicate_pairs([1, 1], -1) == []


def _covid_films(root, n):
    """The first film of each of the first ``n`` patients of covid_cxr (sorted by file name)."""
    folder = root / "covid_cxr"
    first = {}
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as fh:
        for row in sorted(csv.DictReader(fh), key=lambda r: r["filename"]):
            pid = (row.get("patientid") or "").strip()
            if pid and pid not in first and (folder / "images" / row["filename"]).is_file():
                first[pid] = folder / "images" / row["filename"]
    return [decode_image(p)[0] for p in list(first.values())[:n]]


@pytest.mark.parametrize("n", [80])
def test_real_films_of_distinct_patients_are_not_linked_but_copies_are(data_dir, n):  # noqa: F811
    films = _covid_films(data_dir, n)
    hashes = [phash(im) for im in films]
    links = near_duplicate_pairs(hashes, NEAR_DUP_THRESHOLD)
    assert links == []  # no false link between distinct patients (the 64-bit hash at 4 bits linked some)
    assert min((hashes[i] ^ hashes[j]).bit_count() for i in range(n) for j in range(i + 1, n)) > NEAR_DUP_THRESHOLD + 8
    copies = []
    for im in films[:10]:
        buf = io.BytesIO()
        im.convert("L").resize((im.width // 2, im.height // 2), Image.BICUBIC).save(buf, format="JPEG", quality=70)
        copies.append(phash(decode_image(buf.getvalue())[0]))
    assert all((h ^ c).bit_count() <= NEAR_DUP_THRESHOLD for h, c in zip(hashes, copies))
    # split assignment: each copy follows its original, though each has its own group
    res = assign_splits([f"g{i}" for i in range(n)] + [f"c{i}" for i in range(10)], hashes + copies, [None] * (n + 10))
    assert res.near_dup_links == 10
    assert all(res.splits[i] == res.splits[n + i] for i in range(10))


def test_check_leakage_names_a_patient_group_across_splits(tmp_path):
    def rec(i, split, group):
        return {"schema_version": 1, "id": f"s{i}", "split": split, "source": "t", "modality": "xray", "width": 96,
                "height": 96, "summary": "Clear.", "report": "Clear.", "negatives": [], "regions": [], "group": group}

    splits = {}
    for split, recs in {"train": [rec(0, "train", "g-a"), rec(1, "train", "g-b")], "test": [rec(2, "test", "g-a")]}.items():
        with MedRegionWriter(tmp_path, split) as w:
            for r in recs:
                buf = io.BytesIO()
                Image.fromarray((_film(100 + int(r["id"][1:])) // 16).astype(np.uint8)).save(buf, format="PNG")
                w.write(r, buf.getvalue(), "png")
        splits[split] = w.summary()
    write_manifest(tmp_path, splits)
    rows = find_overlaps(tmp_path)
    assert [(r["kind"], {r["a_id"], r["b_id"]}) for r in rows] == [("group", {"s0", "s2"})]
