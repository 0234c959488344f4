"""Every benchmark runs: ``benchmarks/bench_*.py --smoke`` end to end, in seconds, printing its table.

The smoke settings shrink sizes only (figures meaningless); the code paths are the full
runs'. Each script runs as a subprocess with one thread, its working directory in the
test's tmp_path and ``TMPDIR`` a fresh folder; it must exit 0, print the lines its table is made of
(``CHECKS``: one real property of each output, not just the exit code) and leave nothing
behind in ``TMPDIR`` or its working directory. A new benchmark without ``--smoke`` or without an entry in ``CHECKS``
fails here. Those that read the shared data (``$REGIONMED_DATA``) fail, as the builder
tests do, when it lacks what they read.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import regionmed
from regionmed.apps import DATA_ENV, data_root
from regionmed.errors import RegionmedError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("bench_*.py"))
SRC = Path(regionmed.__file__).resolve().parents[1]  # the regionmed this test imports, for the subprocess too
TIMEOUT_S = 300


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no line matching {pattern!r}"
    return float(m.group(1).replace(",", ""))


def _check_build(out: str) -> None:
    assert _num(r"^slake x2: (\d+) images", out) == 2 * _num(r"^slake x1: (\d+) images", out)
    assert 0 <= _num(r"recall@0\.5 = ([0-9.]+)", out) <= _num(r"recall@0\.3 = ([0-9.]+)", out) <= 1


def _check_dist(out: str) -> None:  # two ranks of 4 images, K = 2: 8 local region rows against 16 gathered
    assert re.search(r"^\| 2 \| 8 \| 8×16 / 16×16 \| [0-9.]+ \(", out, re.MULTILINE)


def _check_eval(out: str) -> None:
    assert _num(r"^retrieval ([0-9,]+) x", out) == 2000
    assert _num(r"i2t_R@1 ([0-9.]+)", out) <= _num(r"i2t_R@10 ([0-9.]+)", out)
    assert _num(r"^embedding (\d+) images", out) == 8 and _num(r"eval/plain = ([0-9.]+)", out) > 0


def _check_ground_memory(out: str) -> None:
    assert re.search(r"^path cli, 2 phrases; floor \(64 x 64 image\): \d+ MB", out, re.MULTILINE)
    assert re.search(r"^\s+256\s+65,536\s+\d+\s+\d+\s+-?\d+", out, re.MULTILINE)


def _check_infer(out: str) -> None:
    assert "(same embeddings: True)" in out  # the command path embeds as the plain forward does
    assert re.search(r"IVF nprobe=32: .* recall@10 vs exact 1\.000", out)  # nprobe >= nlist: exact


def _check_inputs(out: str) -> None:
    assert re.search(r"^build of \d+ inputs: .* re-run, inputs checked, up to date", out, re.MULTILINE)
    assert re.search(r"^split train: \d+ shards, open [0-9.]+ ms", out, re.MULTILINE)


def _check_loader(out: str) -> None:
    for reader in ("indexed", "streaming"):
        assert re.search(rf"^{reader}\s+200\s+[0-9.]+\s+[0-9.]+\s+\d+", out, re.MULTILINE), reader
        assert re.search(rf"^\s+{reader}\s+loader: \d+ samples/s per worker", out, re.MULTILINE), reader


def _check_locked(out: str) -> None:
    for recipe in ("cpu_pretrained.yaml", "cpu_grounding.yaml"):
        assert _num(rf"^{re.escape(recipe)} \(.*?\)\s+([0-9.]+)", out) > 0, recipe
    assert re.search(r"^ratio \(locked / trainable steps per CPU-minute\): [0-9.]+x", out, re.MULTILINE)


def _check_near_dup(out: str) -> None:
    assert _num(r"^covid_cxr: (\d+) films", out) == 60
    assert out.count("<- used") == 2  # the threshold row of each hash
    assert out.count("recall at") == 2


def _check_serve(out: str) -> None:
    for path in ("in-process, PNG", "in-process, DICOM", "HTTP API, PNG", "HTTP API, DICOM"):
        assert re.search(rf"^{path}\s+[0-9.]+s\s+[0-9.]+s", out, re.MULTILINE), path


def _check_step(out: str) -> None:
    for variant in ("align, same losses", "crop, full method"):
        assert _num(rf"^\| {variant} \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|", out) > 0, variant


def _check_text(out: str) -> None:
    rows = re.findall(r"^\| (refine stage|full method) .*\| ([0-9.e+-]+) \|$", out, re.MULTILINE)
    assert len(rows) == 4, rows
    assert all(float(diff) < 1e-4 for _, diff in rows)  # old and new plans give the same embeddings


def _check_threads(out: str) -> None:  # alone and beside another one-thread job, the auto policy
    m = re.search(r"^\| auto \(regionmed\.threads\) \| (\d+) \| ([0-9.]+) \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \|", out, re.MULTILINE)
    assert m, "no auto row"
    assert int(m.group(3)) <= int(m.group(1))  # never more threads beside a busy job than alone
    assert float(m.group(5)) == pytest.approx(float(m.group(4)) / float(m.group(2)), abs=0.01)


def _check_index(out: str) -> None:
    assert re.search(r"^ivf build .*; \d+ cells; nprobe \d+ \(recorded recall@10 ([0-9.]+)", out, re.MULTILINE)
    assert _num(r"recorded recall@10 ([0-9.]+)", out) >= 0.95  # the tuning reached its target
    assert 0 <= _num(r"^\| ivf \(IndexIVFFlat\) \| [0-9.]+ \| ([0-9.]+) \|", out) <= 1


# script -> (datasets under $REGIONMED_DATA it reads, the check of its output)
CHECKS = {
    "bench_build": (("slake",), _check_build),
    "bench_dist": ((), _check_dist),
    "bench_eval": ((), _check_eval),  # SLAKE images when present, else synthetic ones
    "bench_ground_memory": ((), _check_ground_memory),
    "bench_infer": (("covid_cxr",), _check_infer),
    "bench_inputs": (("slake", "vqa_rad", "covid_cxr"), _check_inputs),
    "bench_loader": ((), _check_loader),
    "bench_locked": ((), _check_locked),
    "bench_near_dup": (("covid_cxr",), _check_near_dup),
    "bench_serve": (("covid_cxr",), _check_serve),
    "bench_step": ((), _check_step),
    "bench_text": ((), _check_text),
    "bench_threads": ((), _check_threads),
    "bench_index": (("covid_cxr",), _check_index),
}


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if text.strip() else "(empty)"


def test_benchmarks_found():
    assert len(SCRIPTS) >= 12, [p.name for p in SCRIPTS]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_smoke(script: Path, tmp_path):
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    assert "--smoke" in doc, f"{script.name}: its docstring does not document --smoke"
    assert script.stem in CHECKS, f"{script.name}: add its smoke check to CHECKS in {Path(__file__).name}"
    datasets, check = CHECKS[script.stem]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if datasets:
        try:
            root = data_root()
        except RegionmedError as err:
            pytest.fail(f"{script.name} reads the shared data: {err} (see ../shared/data/README.md)", pytrace=False)
        missing = [n for n in datasets if not (root / n).is_dir()]
        if missing:
            pytest.fail(f"{script.name} reads {list(datasets)}: {root} lacks {missing}. Set {DATA_ENV} to the shared "
                        "data folder (see ../shared/data/README.md).", pytrace=False)
        env[DATA_ENV] = str(root.resolve())
    # a short TMPDIR of its own (not under tmp_path: Unix socket paths in it, such as multiprocessing's, must stay
    # under 108 bytes), checked empty at the end
    tmpdir = Path(tempfile.mkdtemp(prefix="bench-"))
    env["TMPDIR"] = str(tmpdir)
    work = tmp_path / "cwd"
    work.mkdir()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        left = sorted(p.name for p in tmpdir.iterdir())
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{script.name} --smoke ran past {TIMEOUT_S} s; stderr tail:\n{_tail(err.stderr or '')}", pytrace=False)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    print(f"{script.name} --smoke: {wall:.1f} s")
    if proc.returncode != 0:
        pytest.fail(f"{script.name} --smoke exited {proc.returncode} after {wall:.0f} s; stderr tail:\n{_tail(proc.stderr)}"
                    f"\nstdout tail:\n{_tail(proc.stdout, 1500)}", pytrace=False)
    try:
        check(proc.stdout)
    except AssertionError as err:
        pytest.fail(f"{script.name} --smoke exited 0 but its output lacks its table ({err}); stdout:\n{_tail(proc.stdout)}"
                    f"\nstderr tail:\n{_tail(proc.stderr, 1500)}", pytrace=False)
    assert not left, f"{script.name} --smoke left temporary files behind in TMPDIR: {left}"
    written = sorted(p.name for p in work.iterdir())
    assert not written, f"{script.name} --smoke wrote into its working directory: {written}"
