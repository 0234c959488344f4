"""DICOM display, by the standard (issue 19, item 3, and the colour encodings of item 5).

Every attribute of DICOM PS3.3 that changes how stored values map to displayed grey
levels, in the order PS3.4 N.2 applies them: stored values (Bits Stored, High Bit, Pixel
Representation) -> Modality LUT (Rescale Slope/Intercept, Modality LUT Sequence) -> VOI
LUT (Window Center/Width with VOI LUT Function LINEAR / LINEAR_EXACT / SIGMOID, several
windows, VOI LUT Sequence) -> Presentation LUT (Shape IDENTITY / INVERSE, Sequence) or
MONOCHROME1. Each case is a synthetic file written with pydicom and the display values
the standard's formulas give, computed here by hand. Colour: YBR_FULL, YBR_FULL_422 and
PALETTE COLOR become RGB.
"""

from __future__ import annotations

import numpy as np
import pytest

from infer_helpers import dicom_bytes, dicom_dataset
from regionmed.data.dicom import DicomError, read_dicom

STORED = np.arange(0, 4096, 64, dtype=np.int64).reshape(4, 16)  # 12-bit stored values 0..4032


def _lut_item(lut, first_map=0, bits=16):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [len(lut), first_map, bits]
    item["LUTDescriptor"].VR = "US"
    item.LUTData = [int(v) for v in lut]  # one entry per 16-bit word, also for 8-bit entries
    item["LUTData"].VR = "US"
    return item


def grey(stored=STORED, *, bits_stored=12, high_bit=None, signed=False, photometric="MONOCHROME2", raw=None, **attrs):
    """A single-frame grey DICOM file of ``stored`` values (``raw``: the 16-bit words as written)."""
    ds = dicom_dataset("CT")
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored = 16, bits_stored
    ds.HighBit = bits_stored - 1 if high_bit is None else high_bit
    ds.PixelRepresentation = int(signed)
    for name, value in attrs.items():
        if name.endswith("Sequence"):
            value = [_lut_item(*value)]
        setattr(ds, name, value)
    words = raw if raw is not None else stored.astype(np.int16 if signed else np.uint16)
    ds.PixelData = words.astype("<u2" if not signed else "<i2").tobytes()
    return dicom_bytes(ds)


def u8(values) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


def minmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.min()) / (x.max() - x.min())


def linear(x, c, w):  # PS3.3 C.11.2.1.2.1
    return np.clip((np.asarray(x, np.float64) - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


def linear_exact(x, c, w):  # C.11.2.1.3.2
    return np.clip((np.asarray(x, np.float64) - c) / w + 0.5, 0, 1)


def sigmoid(x, c, w):  # C.11.2.1.3.1
    return 1 / (1 + np.exp(-4 * (np.asarray(x, np.float64) - c) / w))


MODALITY_LUT = np.minimum(np.arange(4096) // 2, 2047)  # 11-bit output
VOI_LUT_8 = (np.sqrt(np.arange(4096) / 4095) * 255).astype(int)  # 8-bit entries, non-linear
SIGNED = np.arange(-2048, 2048, 64, dtype=np.int64).reshape(4, 16)
WORDS_WITH_OVERLAY = STORED | 0xF000  # unused high bits set (old overlay-in-pixel files)

# case -> (file, expected display values in [0, 1] (before the 8-bit rounding), words the mapping holds)
CASES = {
    "no VOI: min-max of the stored values": (grey(), minmax(STORED), "min-max 0..4032"),
    "rescale slope/intercept, then LINEAR window on the rescaled values": (
        grey(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=2000, WindowWidth=2001),
        linear(STORED * 2 - 1024, 2000, 2001), "rescale x2 -1024; window C=2000 W=2001 LINEAR"),
    "Modality LUT sequence": (grey(ModalityLUTSequence=(MODALITY_LUT, 0, 16)),
                              minmax(MODALITY_LUT[STORED]), "Modality LUT sequence"),
    "LINEAR_EXACT window": (grey(WindowCenter=2048, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT"),
                            linear_exact(STORED, 2048, 1000), "LINEAR_EXACT"),
    "SIGMOID window": (grey(WindowCenter=1500, WindowWidth=800, VOILUTFunction="SIGMOID"),
                       sigmoid(STORED, 1500, 800), "SIGMOID"),
    "several windows: the first": (grey(WindowCenter=[1000, 3000], WindowWidth=[401, 2000]),
                                   linear(STORED, 1000, 401), "(the first of 2)"),
    "VOI LUT sequence of 8-bit entries: scaled by its range": (
        grey(VOILUTSequence=(VOI_LUT_8, 0, 8)), VOI_LUT_8[STORED] / 255, "VOI LUT sequence"),
    "VOI LUT sequence preferred to a window": (
        grey(VOILUTSequence=(VOI_LUT_8, 0, 8), WindowCenter=100, WindowWidth=10), VOI_LUT_8[STORED] / 255,
        "VOI LUT sequence"),
    "MONOCHROME1 is inverted": (grey(photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=2049),
                                1 - linear(STORED, 2048, 2049), "MONOCHROME1 inverted"),
    "Presentation LUT Shape INVERSE": (grey(PresentationLUTShape="INVERSE"), 1 - minmax(STORED),
                                       "Presentation LUT Shape INVERSE"),
    "Presentation LUT Shape IDENTITY": (grey(PresentationLUTShape="IDENTITY"), minmax(STORED),
                                        "Presentation LUT Shape IDENTITY"),
    "MONOCHROME1 with INVERSE: inverted once": (grey(photometric="MONOCHROME1", PresentationLUTShape="INVERSE"),
                                               1 - minmax(STORED), "Presentation LUT Shape INVERSE"),
    "Presentation LUT sequence": (grey(PresentationLUTSequence=(np.arange(256)[::-1] * 257, 0, 16)),
                                  (255 - np.round(minmax(STORED) * 255).astype(int)) * 257 / 65535,
                                  "Presentation LUT sequence"),
    "signed Pixel Representation, window on signed values": (
        grey(SIGNED, signed=True, WindowCenter=0, WindowWidth=1001), linear(SIGNED, 0, 1001), "window C=0 W=1001"),
    "Bits Stored 12: unused high bits ignored": (grey(raw=WORDS_WITH_OVERLAY), minmax(STORED), "min-max 0..4032"),
    "signed 12 bits stored without sign extension": (
        grey(SIGNED, signed=True, raw=(SIGNED & 0x0FFF)), minmax(SIGNED), "min-max -2048..1984"),
    "High Bit 15 with Bits Stored 12: the bits up to the high bit": (
        grey(raw=STORED << 4 | 0x5, high_bit=15), minmax(STORED), "min-max 0..4032"),
    "LINEAR window narrower than 1: not allowed, min-max instead": (
        grey(WindowCenter=100, WindowWidth=0.5), minmax(STORED), "VOI LUT not usable"),
}


@pytest.mark.parametrize("case", CASES)
def test_grey_display_follows_the_standard(case):
    raw, expected, words = CASES[case]
    img = read_dicom(raw, max_pixels=10**6)
    assert img.array.dtype == np.uint8 and img.array.shape == STORED.shape
    diff = np.abs(img.array.astype(int) - u8(expected).astype(int))
    assert diff.max() <= 1, (case, img.meta["decode_mapping"])  # 1: float rounding at .5
    assert words in img.meta["decode_mapping"], img.meta["decode_mapping"]


def test_window_minmax_option_ignores_the_files_window():
    img = read_dicom(grey(WindowCenter=100, WindowWidth=10), max_pixels=10**6, window="minmax")
    assert np.array_equal(img.array, u8(minmax(STORED))) and "window" not in img.meta["decode_mapping"]


def test_an_unknown_presentation_lut_shape_is_refused_with_its_reason():
    with pytest.raises(DicomError) as err:
        read_dicom(grey(PresentationLUTShape="LOG"), max_pixels=10**6)
    assert err.value.reason == "unsupported_dicom" and "Presentation LUT" in err.value.detail


# --------------------------------------------------------------------------- colour encodings

RGB = np.zeros((6, 8, 3), dtype=np.uint8)
RGB[..., 0] = np.linspace(0, 255, 8).astype(np.uint8)
RGB[:3, :, 1] = 200
RGB[..., 2] = 40


def colour(photometric: str, data: bytes, **attrs) -> bytes:
    ds = dicom_dataset("XC")
    ds.Rows, ds.Columns = RGB.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1 if photometric == "PALETTE COLOR" else 3
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    for name, value in attrs.items():
        setattr(ds, name, value)
    ds.PixelData = data
    return dicom_bytes(ds)


def _ybr(rgb: np.ndarray) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    return convert_color_space(rgb, "RGB", "YBR_FULL")


def _ybr_422(rgb: np.ndarray) -> bytes:
    """YBR_FULL_422 as PS3.5 8.2.1 lays it out: Y1 Y2 Cb Cr for each pair of pixels of a row
    (the chroma of the pair's first pixel; the test image's colour is constant over pairs)."""
    ybr = _ybr(rgb)
    out = []
    for r in range(ybr.shape[0]):
        for c in range(0, ybr.shape[1], 2):
            out += [ybr[r, c, 0], ybr[r, c + 1, 0], ybr[r, c, 1], ybr[r, c, 2]]
    return bytes(np.array(out, dtype=np.uint8))


PAIRED = RGB.copy()
PAIRED[:, 1::2] = PAIRED[:, ::2]  # constant colour over each pair of columns, as 4:2:2 keeps it
PALETTE = np.stack([np.arange(256), 255 - np.arange(256), np.full(256, 128)], axis=1)  # index -> RGB
INDICES = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5

COLOUR_CASES = {
    "RGB": (colour("RGB", RGB.tobytes()), RGB, "RGB, 8 bits stored"),
    "YBR_FULL": (colour("YBR_FULL", _ybr(RGB).tobytes()), RGB, "YBR_FULL converted to RGB"),
    "YBR_FULL_422": (colour("YBR_FULL_422", _ybr_422(PAIRED)), PAIRED, "YBR_FULL_422 converted to RGB"),
    "PALETTE COLOR, 8-bit palette": (
        colour("PALETTE COLOR", INDICES.tobytes(), **{
            f"{c}PaletteColorLookupTableDescriptor": [256, 0, 8] for c in ("Red", "Green", "Blue")}, **{
            f"{c}PaletteColorLookupTableData": bytes(PALETTE[:, k].astype(np.uint8))
            for k, c in enumerate(("Red", "Green", "Blue"))}),
        PALETTE[INDICES].astype(np.uint8), "PALETTE COLOR through its 8-bit palette"),
    "PALETTE COLOR, 16-bit palette": (
        colour("PALETTE COLOR", INDICES.tobytes(), **{
            f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}, **{
            f"{c}PaletteColorLookupTableData": (PALETTE[:, k] * 257).astype("<u2").tobytes()
            for k, c in enumerate(("Red", "Green", "Blue"))}),
        PALETTE[INDICES].astype(np.uint8), "PALETTE COLOR through its 16-bit palette"),
}


@pytest.mark.parametrize("case", COLOUR_CASES)
def test_colour_encodings_become_rgb(case):
    raw, expected, words = COLOUR_CASES[case]
    img = read_dicom(raw, max_pixels=10**6)
    assert img.array.shape == expected.shape and img.array.dtype == np.uint8
    # YCbCr -> RGB in 8 bits is exact to +-2 (PS3.3 C.7.6.3.1.2 gives the equations, rounded)
    assert np.abs(img.array.astype(int) - expected.astype(int)).max() <= 2, case
    assert words in img.meta["decode_mapping"]


def test_palette_color_without_a_palette_is_refused_with_its_reason():
    with pytest.raises(DicomError) as err:
        read_dicom(colour("PALETTE COLOR", INDICES.tobytes()), max_pixels=10**6)
    assert err.value.reason == "unsupported_dicom" and "palette" in err.value.detail


def test_colour_dicom_builds_and_infers(tmp_path):
    """The builder and inference read colour DICOM through the same reader: RGB out."""
    from regionmed.apps.curation.builder import build
    from regionmed.apps.curation.config import BuildConfig, SourceSpec
    from regionmed.inference import load_image
    from test_build_dicom import read_all_records

    root = tmp_path / "dcm"
    root.mkdir()
    (root / "a.dcm").write_bytes(COLOUR_CASES["YBR_FULL"][0])
    (root / "a.txt").write_text("small nodule in the right upper zone")
    cfg = BuildConfig(out=str(tmp_path / "out"), workers=0, progress=False, sources=[SourceSpec("dicom", str(root))])
    summary = build(cfg, log=lambda s: None)
    assert summary.built == 1, summary.rejected
    (rec,) = read_all_records(tmp_path / "out")
    assert "YBR_FULL converted to RGB" in rec["meta"]["decode_mapping"]
    image = load_image(root / "a.dcm")
    image = image[0] if isinstance(image, tuple) else image
    assert image.mode == "RGB" and np.abs(np.asarray(image).astype(int) - RGB.astype(int)).max() <= 2
