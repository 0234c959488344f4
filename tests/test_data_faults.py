"""Faults on the data path: unreadable sources end in a clear error instead of an
endless loop, a missing shard index falls back to the tar headers, unreadable records
are recorded at index time and reported by the trainer, and the DICOM modality LUT is
applied before the VOI LUT."""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import http_server
from infer_helpers import dicom_bytes, dicom_dataset
from regionmed.data.shards import DatasetError
from regionmed.data.stream import MedRegionStream, StreamSource, make_stream_loader
from regionmed.data.transforms import Preprocessor

PRE = Preprocessor(image_size=32, roi_size=16, max_rois=3)


@contextmanager
def time_limit(seconds: int):
    """Fail the test (instead of hanging) when the block runs longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """16 phantoms in 4 shards of 4."""
    from regionmed.apps.curation.phantoms import PhantomConfig, write_phantom_dataset

    out = tmp_path_factory.mktemp("sharded")
    write_phantom_dataset(out, n_train=16, n_test=0, seed=3, config=PhantomConfig(image_size=64), shard_max_count=4,
                          progress=False)
    return out


@pytest.mark.parametrize("resampled", [False, True])
def test_a_stream_whose_shards_all_fail_raises_naming_the_source(tmp_path, resampled):
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"this is not a tar archive" * 40)
    urls = [str(tmp_path / f"missing-{i}.tar") for i in range(3)] + [str(corrupt)]
    stream = MedRegionStream([StreamSource.from_urls("broken", urls)], PRE, 2, shuffle_buffer=0, resampled=resampled)
    with time_limit(60), pytest.raises(DatasetError) as err:
        next(iter(make_stream_loader(stream)))
    msg = str(err.value)
    assert "'broken'" in msg and "in a row" in msg and ("missing-" in msg or "corrupt.tar" in msg)


def test_a_stream_with_two_workers_over_unreadable_shards_raises(tmp_path):
    urls = [str(tmp_path / f"missing-{i}.tar") for i in range(4)]
    stream = MedRegionStream([StreamSource.from_urls("gone", urls)], PRE, 2, shuffle_buffer=0, num_workers=2)
    with time_limit(120), pytest.raises(Exception) as err:  # re-raised by the DataLoader from its worker
        next(iter(make_stream_loader(stream)))
    assert "'gone'" in str(err.value) and "in a row" in str(err.value)


def test_unreadable_shards_between_readable_ones_are_named_in_later_batches(sharded, tmp_path):
    missing = [str(tmp_path / f"missing-{i}.tar") for i in range(3)]
    urls = [str(p) for p in sorted(sharded.glob("train-*.tar"))] + missing
    stream = MedRegionStream([StreamSource.from_urls("mixed", urls)], PRE, 2, shuffle_buffer=0)
    with time_limit(120):
        # the 16 samples of the first pass, and one batch of the second (after the pass's last shards)
        batches = [b for _, b in zip(range(9), make_stream_loader(stream))]
    named = [w for b in batches for _, w, _ in b.bad_samples]
    assert set(named) == set(missing)  # every one, also those met after the first batch
    assert all(len(b) == 2 for b in batches)


# ------------------------------------------------------------------ the indexed reader
def test_a_missing_index_file_falls_back_to_the_tar_headers_with_a_warning(tmp_path, caplog):
    from regionmed.data.shards import MedRegionDataset, SplitIndex
    from test_reader_index import write_dataset

    root = write_dataset(tmp_path / "d", 7, max_count=3)
    (root / "train-index.npz").unlink()
    with caplog.at_level(logging.WARNING, logger="regionmed"):
        ds = MedRegionDataset(root, "train")
    assert len(ds) == 7 and not ds.indexed and ds.record(6)["id"] == "train-6"
    assert "train-index.npz" in caplog.text and "missing" in caplog.text and f"regionmed index-shards {root}" in caplog.text
    walked = SplitIndex.from_headers(root, ds.index.shard_names)
    assert np.array_equal(walked.json_offset, ds.index.json_offset)


def test_index_dataset_counts_unreadable_records_and_writes_the_manifest_once(tmp_path, monkeypatch):
    from regionmed.data import shards
    from test_run_robustness import write_split

    root = write_split(tmp_path / "d", "train", 6, bad_json={1, 4}, regions=True)
    writes = []
    real = shards.write_json_atomic
    monkeypatch.setattr(shards, "write_json_atomic", lambda path, data: (writes.append(path), real(path, data)))
    done = shards.index_dataset(root)
    assert done == {"train": {"samples": 6, "records_unreadable": 2, "changes": []}} and len(writes) == 1
    stats = shards.read_manifest(root)["splits"]["train"]["stats"]
    assert stats["samples"] == 4 and stats["records_unreadable"] == 2
    assert [w.rsplit(":", 1)[1] for w, _ in stats["records_unreadable_examples"]] == ["train1", "train4"]
    counts = shards.counts_from_stats(stats, 2, 3, 2)
    assert counts["records_unreadable"] == 2 and counts["samples"] == 4


def test_index_dataset_that_fails_leaves_the_manifest_as_it_was(tmp_path):
    from regionmed.data import shards
    from test_run_robustness import write_split

    root = write_split(tmp_path / "d", "train", 4)
    write_split(root, "test", 4)
    (root / "test-000000.tar").unlink()
    before = (root / "manifest.json").read_bytes()
    with pytest.raises(DatasetError, match="test-000000.tar"):
        shards.index_dataset(root)
    assert (root / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("limit", [1, 2])
def test_the_trainer_reports_unreadable_records_counted_at_index_time(tmp_path, limit, caplog):
    from regionmed.apps.train.trainer import Trainer, TrainingError
    from regionmed.data import shards
    from test_run_robustness import small_config, write_split

    root = write_split(tmp_path / "d", "train", 8, bad_json={1, 3}, regions=True)
    shards.index_dataset(root)
    cfg = small_config(root, tmp_path / "run", steps=(1, 1), mode="crop")
    cfg.data.max_bad_samples = limit
    trainer = Trainer(cfg, progress=False)
    assert trainer.counts_from == "manifest" and trainer.audit["records_unreadable"] == 2
    assert [w.rsplit(":", 1)[1] for w, _ in trainer.unreadable_records] == ["train1", "train3"]
    if limit == 1:
        with pytest.raises(TrainingError, match=r"2 record\(s\) of .* cannot be read, more than data.max_bad_samples = 1"):
            trainer.fit()
    else:
        with caplog.at_level(logging.WARNING):
            trainer.fit()
        assert "2 record(s) cannot be read and will be skipped when met" in caplog.text


# ------------------------------------------------------------------ DICOM LUT order
def _rescaled_dicom(stored: np.ndarray, slope: float, intercept: float, window=None, voi_lut=None) -> bytes:
    from pydicom.dataset import Dataset

    ds = dicom_dataset("CT")
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        first_map, lut = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(lut), first_map, 16]
        item["LUTDescriptor"].VR = "US"
        item.LUTData = [int(v) for v in lut]
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = [item]
    ds.PixelData = stored.astype("<u2").tobytes()
    return dicom_bytes(ds)


STORED = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (4, 1))  # 4 x 100 stored values
SLOPE, INTERCEPT = 2.0, 100.0  # modality values 100..2080


def test_dicom_window_applies_to_rescaled_values():
    from regionmed.data.dicom import read_dicom

    c, w = 1000.0, 801.0
    img = read_dicom(_rescaled_dicom(STORED, SLOPE, INTERCEPT, window=(c, w)), max_pixels=10**6).array
    m = STORED * SLOPE + INTERCEPT  # DICOM PS3.3 C.11.1 then C.11.2.1.2.1, by hand
    expected = np.round(np.clip((m - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(img, expected)


def test_dicom_voi_lut_sequence_maps_the_modality_lut_output():
    from regionmed.data.dicom import read_dicom

    lut = np.array([(k * k) >> 8 for k in range(4096)])  # non-linear: the input values matter after min-max
    img = read_dicom(_rescaled_dicom(STORED, SLOPE, INTERCEPT, voi_lut=(0, lut)), max_pixels=10**6)
    m = (STORED * SLOPE + INTERCEPT).astype(np.int64)
    voi = lut[np.clip(m, 0, len(lut) - 1)].astype(np.float64)
    expected = np.round(voi / (2**16 - 1) * 255).astype(np.uint8)  # the LUT's 16-bit output range (PS3.3 C.11.2.1.1)
    assert img.meta["decode_mapping"] == "DICOM rescale x2 +100; VOI LUT sequence -> 0..255"
    assert np.array_equal(img.array, expected)
    stored_voi = lut[STORED.astype(np.int64)].astype(np.float64)  # the former order: LUT on stored values
    assert not np.array_equal(img.array, np.round(stored_voi / (2**16 - 1) * 255).astype(np.uint8))


# ------------------------------------------------------------------ writer offsets checked
def test_the_writer_checks_recorded_offsets_against_each_closed_shard(tmp_path):
    from regionmed.data.shards import MedRegionDataset, MedRegionWriter, SplitIndex, write_manifest
    from test_reader_index import _png, _record

    with MedRegionWriter(tmp_path / "ok", "train", max_count=2) as w:  # 3 shards, a 124-character key in the 2nd
        for i in range(5):
            w.write(_record(i), _png(i))
    assert w._verified == {0, 1, 2}
    write_manifest(tmp_path / "ok", {"train": w.summary()})
    ds = MedRegionDataset(tmp_path / "ok", "train")
    assert np.array_equal(ds.index.json_offset, SplitIndex.from_headers(ds.root, ds.index.shard_names).json_offset)

    w = MedRegionWriter(tmp_path / "bad", "train", max_count=2)
    w.write(_record(0), _png(0))
    w.write(_record(1), _png(1))
    w._index.cols["json_offset"][1] += 512  # as if the tar stream's offsets were read otherwise
    with pytest.raises(DatasetError, match=r"shard .*train-000000.tar: the offset recorded for member train-1.json"):
        w.write(_record(2), _png(2))  # opens the next shard: the first one is closed and checked
    w._writer.close()


# ------------------------------------------------------------------ URLs that cannot be fetched

@pytest.fixture
def served(sharded):
    with http_server(sharded) as url:
        yield url


def test_a_manifest_or_shard_url_that_gives_an_http_error_is_named_in_one_clear_line(served):
    with pytest.raises(DatasetError) as err:
        StreamSource.from_dataset("gone", f"{served}/no-such-dataset", "train")
    assert str(err.value) == f"{served}/no-such-dataset/manifest.json: cannot be read (curl exit 22 (an HTTP error such as 404))"
    missing = f"{served}/train-999999.tar"
    urls = [f"{served}/train-00000{i}.tar" for i in range(4)] + [missing]
    stream = MedRegionStream([StreamSource.from_urls("web", urls)], PRE, 2, shuffle_buffer=0)
    with time_limit(120):
        batches = [b for _, b in zip(range(9), make_stream_loader(stream))]
    reasons = {r for b in batches for _, w, r in b.bad_samples if w == missing}
    assert reasons and all("curl exit 22 (an HTTP error such as 404)" in r or "an HTTP error such as 404?" in r for r in reasons)
    assert not any("Pipe object" in r or "['curl'" in r for r in reasons)


@pytest.mark.parametrize("code, meaning", [(6, "could not resolve the host"), (7, "connection refused"), (28, "timed out"),
                                           (35, "see 'man curl', EXIT CODES")])
def test_curl_exit_statuses_are_explained(code, meaning):
    from regionmed.data.stream import read_error_reason

    # webdataset.gopen.Pipe's message for a failed curl, and tar_file_expander's re-raise with the stream and the URL
    err = OSError(f"((['curl', '-f', 'http://h/a.tar'],), {{'bufsize': 8192}}): exit {code} (read) {{}}", object(), "http://h/a.tar")
    assert read_error_reason("http://h/a.tar", err) == f"curl exit {code} ({meaning})"
