"""DICOM decoding for the builder: the library's PHI-safe reader
(:mod:`regionmed.data.dicom`) with its errors turned into the builder's rejects.

Only an allow-list of non-identifying attributes leaves the reader; patient,
study, institution and date attributes are never read into records or logs.
The one exception is PatientID, which leaves only as a salted hash
(:func:`patient_key`): the builder groups a patient's files into one split by it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from regionmed.apps.curation.items import ItemReject
from regionmed.data.dicom import (  # noqa: F401 - re-exported for the builder and its tests
    ALLOWED_ATTRIBUTES,
    PATIENT_SALT,
    PLACEHOLDER_PATIENT_IDS,
    DicomError,
    DicomImage,
    allowed_meta,
    patient_key,
)
from regionmed.data.dicom import read_dicom as _read_dicom


def decode_dicom(
    raw: bytes,
    max_pixels: int,
    window: str = "auto",
) -> tuple[np.ndarray, dict[str, Any], tuple[float, float] | None]:
    """Return ``(uint8 array, allow-listed meta, pixel spacing mm)`` or raise :class:`ItemReject`
    (:func:`read_dicom` without the patient key)."""
    d = read_dicom(raw, max_pixels, window)
    return d.array, d.meta, d.spacing


def read_dicom(raw: bytes, max_pixels: int, window: str = "auto") -> DicomImage:
    """:func:`regionmed.data.dicom.read_dicom`, raising :class:`ItemReject` (same reason) instead
    of :class:`~regionmed.data.dicom.DicomError`."""
    try:
        return _read_dicom(raw, max_pixels, window)
    except DicomError as err:
        raise ItemReject(err.reason, err.detail) from err
