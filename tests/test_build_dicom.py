"""DICOM input: windowing, MONOCHROME1, 16-bit, rejects, and no PHI anywhere in the output."""

from __future__ import annotations

import json

import numpy as np
import pydicom  # noqa: E402,F401 - the "build" extra; missing means the test fails, not skips
import pytest
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless  # noqa: E402

from conftest_build import read_all_records, read_rejects
from infer_helpers import dicom_bytes, dicom_dataset
from regionmed.apps.curation.builder import build  # noqa: E402
from regionmed.apps.curation.config import BuildConfig, SourceSpec  # noqa: E402
from regionmed.apps.curation.dicom import decode_dicom  # noqa: E402
from regionmed.apps.curation.images import ItemReject  # noqa: E402

PHI = {
    "PatientName": "Quixbury^Henrietta",
    "PatientID": "MRN-83612047",
    "PatientBirthDate": "19470815",
    "StudyDate": "20230611",
    "SeriesDate": "20230611",
    "AcquisitionDate": "20230611",
    "InstitutionName": "Saint Ormsby Memorial Infirmary",
    "InstitutionAddress": "42 Larkspur Lane, Fenwick",
    "ReferringPhysicianName": "Thistlewood^Bartholomew",
    "AccessionNumber": "ACC99177342",
    "StudyDescription": "CHEST PA Quixbury",
    "OtherPatientIDs": "ALT-5550199",
}
PHI_STRINGS = ["Quixbury", "Henrietta", "MRN-83612047", "83612047", "19470815", "20230611", "2023-06-11",
               "Ormsby", "Larkspur", "Thistlewood", "Bartholomew", "ACC99177342", "5550199"]


def make_dicom(arr: np.ndarray, photometric="MONOCHROME2", window=None, frames=1, syntax=ExplicitVRLittleEndian,
               bits_stored=12, spacing=(0.2, 0.2)) -> bytes:
    ds = dicom_dataset("CR", syntax)
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if spacing:
        ds.PixelSpacing = list(spacing)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = arr.astype("<u2").tobytes()
    else:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    return dicom_bytes(ds)


def ramp(h=64, w=96, top=4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, w), (h, 1)).astype(np.uint16)


def test_window_and_16_bit():
    arr = ramp()
    img, meta, spacing = decode_dicom(make_dicom(arr, window=(2048, 1024)), max_pixels=10**7)
    assert img.dtype == np.uint8 and img.shape == arr.shape
    row = img[0]
    assert row[0] == 0 and row[-1] == 255  # outside the window: clipped
    mid = np.where((arr[0] > 1600) & (arr[0] < 2500))[0]
    assert 0 < row[mid].min() < row[mid].max() < 255  # inside the window: graded
    assert spacing == (0.2, 0.2)
    assert meta["Modality"] == "CR" and meta["ViewPosition"] == "PA"
    assert not any(s in json.dumps(meta) for s in PHI_STRINGS)


def test_monochrome1_is_inverted():
    arr = ramp()
    mono2, _, _ = decode_dicom(make_dicom(arr), max_pixels=10**7)
    mono1, _, _ = decode_dicom(make_dicom(arr, photometric="MONOCHROME1"), max_pixels=10**7)
    assert mono2[0, 0] == 0 and mono1[0, 0] == 255
    assert np.array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_multiframe_and_compressed_are_rejected_with_reason():
    with pytest.raises(ItemReject) as err:
        decode_dicom(make_dicom(np.stack([ramp(), ramp()]), frames=2), max_pixels=10**7)
    assert err.value.reason == "unsupported_dicom" and "multi-frame" in err.value.detail
    with pytest.raises(ItemReject) as err:
        decode_dicom(make_dicom(ramp(), syntax=JPEG2000Lossless), max_pixels=10**7)
    assert err.value.reason == "unsupported_dicom" and "transfer syntax" in err.value.detail


def test_no_phi_anywhere_in_output_or_logs(tmp_path, capsys):
    src = tmp_path / "export"
    src.mkdir()
    (src / "a.dcm").write_bytes(make_dicom(ramp(128, 128), window=(2048, 4096)))
    (src / "a.txt").write_text("PA chest radiograph. Small nodule in the right upper zone. No pleural effusion.")
    (src / "b.dcm").write_bytes(make_dicom(ramp(128, 128), photometric="MONOCHROME1"))
    (src / "b.txt").write_text("Clear lungs. Impression: no acute cardiopulmonary process.")
    (src / "c.dcm").write_bytes(make_dicom(np.stack([ramp(), ramp()]), frames=2))
    (src / "c.txt").write_text("Multi-frame study.")
    (src / "d.dcm").write_bytes(make_dicom(ramp(), syntax=JPEG2000Lossless))
    (src / "d.txt").write_text("Compressed study.")
    out = tmp_path / "out"
    cfg = BuildConfig(out=str(out), workers=2, sources=[SourceSpec("dicom", str(src))])
    logged: list[str] = []
    summary = build(cfg, log=logged.append)
    captured = capsys.readouterr()
    assert summary.built == 2 and summary.rejected == {"unsupported_dicom": 2}
    recs = read_all_records(out)
    assert {r["modality"] for r in recs} == {"xray"}
    assert all(set(r["meta"]) <= {"Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation", "BitsStored", "Rows", "Columns",
                                  "decode_mapping"} for r in recs)
    assert {r["reason"] for r in read_rejects(out)} == {"unsupported_dicom"}
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    assert blobs
    logs = "\n".join(logged) + captured.out + captured.err
    for s in PHI_STRINGS:
        for blob in blobs:
            assert s.encode() not in blob and s.lower().encode() not in blob.lower()
        assert s.lower() not in logs.lower()
    # stored images are decoded pixels (PNG), not the DICOM file
    for blob in blobs:
        assert b"DICM" not in blob
