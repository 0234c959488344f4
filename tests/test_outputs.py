"""regionmed.outputs: folders written as a whole, one writer at a time, never into an input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import regionmed
from regionmed import outputs
from regionmed.outputs import OutputError, check_output, read_folder, replace_file, replace_folder, writer_lock

SRC = str(Path(regionmed.__file__).resolve().parents[1])


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_a_folder_is_replaced_as_a_whole_or_not_at_all(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without RENAME_EXCHANGE: the fallback
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    with replace_folder(dest) as tmp:
        _write(tmp, {"a.txt": "old a", "b.txt": "old b"})
    assert _contents(dest) == {"a.txt": "old a", "b.txt": "old b"}

    with pytest.raises(RuntimeError, match="stopped"), replace_folder(dest, owned=lambda d: True) as tmp:
        _write(tmp, {"a.txt": "new a"})
        raise RuntimeError("stopped between two files")
    assert _contents(dest) == {"a.txt": "old a", "b.txt": "old b"}  # the old folder, whole
    assert _leftovers(tmp_path) == []

    with replace_folder(dest, owned=lambda d: True) as tmp:
        _write(tmp, {"a.txt": "new a", "c.txt": "new c"})
    assert _contents(dest) == {"a.txt": "new a", "c.txt": "new c"}  # the new folder, whole (b.txt gone)
    assert _leftovers(tmp_path) == []


def test_a_writer_killed_between_the_two_renames_is_undone_by_the_next_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    with replace_folder(dest) as tmp:
        _write(tmp, {"a.txt": "old"})
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # dest -> .out.old done, .out.new -> dest not yet: the process dies here
            raise KeyboardInterrupt
        real_rename(a, b)

    monkeypatch.setattr(outputs.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt), replace_folder(dest, owned=lambda d: True) as tmp:
        _write(tmp, {"a.txt": "new"})
    monkeypatch.setattr(outputs.os, "rename", real_rename)
    assert not dest.exists() and (tmp_path / ".out.old").is_dir()
    assert read_folder(dest, lambda: _contents(dest)) == {"a.txt": "old"}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case, setup, kind, owned, match", [
    ("folder output is a file", lambda d: d.write_text("x"), "folder", None, "is an existing file, not a folder"),
    ("file output is a folder", lambda d: d.mkdir(), "file", None, "is an existing folder, not a file"),
    ("folder of other files", lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), "folder", lambda d: False,
     "already holds files that are not a"),
])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, case, setup, kind, owned, match):
    dest = tmp_path / "out"
    setup(dest)
    with pytest.raises(OutputError, match=match):
        check_output(dest, kind=kind, owned=owned)
    if kind == "folder":
        with pytest.raises(OutputError, match=match), replace_folder(dest, owned=owned):
            pass
    assert dest.exists() and (not dest.is_dir() or sorted(p.name for p in dest.iterdir()) in ([], ["notes.txt"]))


@pytest.mark.parametrize("case, out, given, kind, match", [
    ("is the input", "data", "data", "folder", "is input"),
    ("inside the input", "data/out", "data", "folder", "lies inside input"),
    ("holds the input", ".", "data", "folder", "holds input"),
    ("file is the input file", "data/a.png", "data/a.png", "file", "is input"),
    ("file inside the input", "data/scores.csv", "data", "file", "lies inside input"),
    ("through a symbolic link", "link", "data", "folder", "is input"),
])
def test_an_output_that_overlaps_an_input_is_refused(tmp_path, monkeypatch, case, out, given, kind, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"png")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(OutputError, match=match):
        check_output(out, kind=kind, inputs=[("input", given)])
    check_output("elsewhere", kind=kind, inputs=[("input", given)])  # a separate output is fine


def test_replace_file_is_atomic(tmp_path):
    dest = tmp_path / "scores.csv"
    dest.write_text("old")
    with pytest.raises(ValueError), replace_file(dest) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert dest.read_text() == "old" and _leftovers(tmp_path) == []
    with replace_file(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and _leftovers(tmp_path) == []


# A writer of a shared file that reads, waits, then writes: without the lock, two at once lose one update.
_COUNTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from regionmed.outputs import writer_lock
    path = Path(sys.argv[1])
    with writer_lock(path):
        n = int(path.read_text())
        time.sleep(0.3)
        path.write_text(str(n + 1))
""")


def test_writers_in_separate_processes_take_turns(tmp_path):
    counter = tmp_path / "count.txt"
    counter.write_text("0")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", _COUNTER, str(counter)], env=env) for _ in range(4)]
    assert [p.wait(60) for p in procs] == [0] * 4
    assert counter.read_text() == "4"
    assert _leftovers(tmp_path) == []  # the lock file goes with its last holder


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path):
    target = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom regionmed.outputs import writer_lock\n"
                               "with writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n",
                               str(target)], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match="being written by another process"), writer_lock(target, wait=0.2):
        pass
    holder.kill()
    holder.wait(10)
    with writer_lock(target, wait=5):  # the kernel released the dead process's lock
        pass


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with writer_lock(tmp_path / "x"), writer_lock(tmp_path / "x"), replace_folder(tmp_path / "x") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "x" / "f").read_text() == "1"


def test_build_eval_and_train_never_write_into_their_inputs(tmp_path, phantom_data):
    """The builder (out inside a source folder), evaluation (--out inside the --medregion dataset or
    the model folder) and training (output_dir inside data.train) refuse before writing anything."""
    from conftest import tiny_run_config
    from regionmed.apps.cli import main
    from regionmed.apps.curation.builder import build
    from regionmed.apps.curation.config import BuildConfig, SourceSpec
    from regionmed.apps.train.trainer import Trainer

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.jpg").write_bytes(b"not read: refused first")
    before = sorted(p.name for p in src.rglob("*"))
    cfg = BuildConfig(out=str(src / "out"), workers=0, progress=False, sources=[SourceSpec("detection", str(src))])
    with pytest.raises(OutputError, match="never writes into its own input"):
        build(cfg, log=lambda s: None)
    assert sorted(p.name for p in src.rglob("*")) == before
    # the command line: one line, exit 2
    assert main(["build", "--source", "detection", "--input", str(src), "--out", str(src / "out"), "--no-progress"]) == 2
    assert not (src / "out").exists()
    # evaluation into its dataset or into its model folder
    data_before = sorted(p.name for p in phantom_data.rglob("*"))
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(OutputError, match="lies inside the --medregion dataset"):
        check_output(str(phantom_data / "eval"), inputs=[("the --medregion dataset", str(phantom_data))])
    assert main(["eval", str(model), "--medregion", str(phantom_data), "--out", str(phantom_data / "eval")]) == 2
    assert not (phantom_data / "eval").exists()
    assert main(["eval", str(model), "--medregion", str(phantom_data), "--out", str(model / "eval")]) == 2
    assert not (model / "eval").exists()
    # training into its data
    run = tiny_run_config(str(phantom_data), str(phantom_data / "run"))
    with pytest.raises(OutputError, match="train.output_dir"):
        Trainer(run, progress=False)
    assert sorted(p.name for p in phantom_data.rglob("*")) == data_before
