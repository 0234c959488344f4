"""Shared helpers of the inference tests: real images from the shared data, a tiny saved
model, and small synthetic DICOM files carrying made-up identifiers (which must never
reach an output)."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(os.environ.get("REGIONMED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

PHI = {
    "PatientName": "Marchbanks^Ottoline",
    "PatientID": "MRN-55120931",
    "PatientBirthDate": "19520304",
    "StudyDate": "20240117",
    "InstitutionName": "Greywater Cottage Hospital",
    "ReferringPhysicianName": "Fairweather^Ignatius",
    "AccessionNumber": "ACC7731905",
}
PHI_STRINGS = ["Marchbanks", "Ottoline", "MRN-55120931", "55120931", "19520304", "20240117", "Greywater",
               "Fairweather", "Ignatius", "ACC7731905"]


def slake_image(i: int) -> Path:
    path = DATA / "slake" / "imgs" / f"xmlab{i}" / "source.jpg"
    if not path.is_file():
        pytest.fail(f"real test image {path} is missing (set REGIONMED_DATA to the shared data folder)")
    return path


def covid_images(n: int) -> list[Path]:
    folder = DATA / "covid_cxr" / "images"
    found = sorted(folder.iterdir())[:n]
    if len(found) < n:
        pytest.fail(f"{folder} lacks real test images")
    return found


def save_tiny_model(folder: Path, seed: int = 0, **roi) -> Path:
    from conftest import tiny_model_config
    from regionmed.model.clip import create_model

    torch.manual_seed(seed)
    model = create_model(tiny_model_config(**roi))
    if model.roi_processor is not None:  # open the gates (0 at init: the ROI path would change nothing)
        with torch.no_grad():
            model.roi_processor.region_gate.fill_(0.5)
            model.roi_processor.global_gate.fill_(0.5)
    model.save_pretrained(folder)
    return folder


def make_dicom(arr: np.ndarray | None, frames: int = 1, window: tuple[float, float] | None = (2048, 4096), *,
               pixels: bool = True, identifiers: bool = True) -> bytes:
    """A DICOM part-10 file (explicit VR little endian, 16-bit MONOCHROME2, 12 bits stored).

    ``arr``: (rows, columns) values in 0..4095, or None: no image attributes and no pixel
    data; ``frames`` > 1: a multi-frame file (``arr`` repeated); ``window``: (centre,
    width) of the VOI window, None: none written; ``pixels=False``: the image attributes
    without the pixel data; ``identifiers``: the made-up :data:`PHI` values are written
    (which must never reach an output)."""
    ds = dicom_dataset("CR")
    for k, v in (PHI.items() if identifiers else ()):
        setattr(ds, k, v)
    if arr is not None:
        ds.Rows, ds.Columns = arr.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if frames > 1:
            ds.NumberOfFrames = frames
            arr = np.stack([arr] * frames)
        if pixels:
            ds.PixelData = arr.astype("<u2").tobytes()
    return dicom_bytes(ds)


def dicom_dataset(modality: str, syntax=None):
    """An empty secondary-capture DICOM dataset with its file meta; ``syntax``: the transfer
    syntax UID (default explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def dicom_bytes(ds) -> bytes:
    """``ds`` as a DICOM part-10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ramp(h: int = 48, w: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0, 4095, w), (h, 1)).astype(np.uint16)


def assert_no_phi(folder_or_text) -> None:
    if isinstance(folder_or_text, str):
        texts = {"<text>": folder_or_text}
    else:
        texts = {str(p): p.read_bytes().decode("latin-1") for p in Path(folder_or_text).rglob("*") if p.is_file()}
    for where, text in texts.items():
        for s in PHI_STRINGS:
            assert s not in text, f"identifier {s!r} found in {where}"
