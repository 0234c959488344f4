"""Torch threads that fit the machine (regionmed.threads; issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from regionmed.apps.cli import main
from regionmed.config import ConfigError
from regionmed.threads import ENV, ThreadsError, _cgroup_cpus, busy_cores, choose_threads


def test_the_option_then_the_environment_then_the_cores():
    env = {ENV: "3", "OMP_NUM_THREADS": "5"}
    assert choose_threads(2, environ=env).threads == 2 and choose_threads(2, environ=env).source == "option"
    assert choose_threads(environ=env).threads == 3 and choose_threads(environ=env).source == ENV
    assert choose_threads(environ={"OMP_NUM_THREADS": "5"}).threads == 5
    # cores shared among the local ranks (torchrun's LOCAL_WORLD_SIZE); other processes' busy cores left
    # to them for a single process only (a launch's siblings are the ranks)
    assert choose_threads(environ={"LOCAL_WORLD_SIZE": "4"}, cores=8, busy=0).threads == 2
    assert choose_threads(environ={"LOCAL_WORLD_SIZE": "4"}, cores=8, busy=6.0).threads == 2
    assert choose_threads(environ={}, cores=8, busy=0.3).threads == 8
    assert choose_threads(environ={}, cores=2, busy=1.0).threads == 1  # beside one busy job on two cores
    assert choose_threads(environ={}, cores=2, busy=3.0).threads == 1  # never fewer than one
    assert choose_threads(environ={}, local_ranks=3, cores=2, busy=0).threads == 1
    plan = choose_threads(environ={}, cores=16, busy=2.0)
    assert plan.threads == 14 and "16 core(s) available" in plan.describe()
    # torchrun sets OMP_NUM_THREADS=1 for every rank when nproc_per_node > 1: its default, not a choice
    torchrun = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}
    assert choose_threads(environ=torchrun, cores=8).threads == 4
    assert choose_threads(environ={**torchrun, "OMP_NUM_THREADS": "3"}, cores=8).threads == 3  # a user's value
    assert choose_threads(environ={**torchrun, ENV: "1"}, cores=8).threads == 1
    with pytest.raises(ThreadsError, match="LOCAL_WORLD_SIZE='two'"):
        choose_threads(environ={"LOCAL_WORLD_SIZE": "two"}, cores=8)


@pytest.mark.parametrize("env, match", [({ENV: "two"}, "REGIONMED_THREADS='two' is not a whole number"),
                                        ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS must be >= 1")])
def test_a_bad_count_names_where_it_came_from(env, match):
    with pytest.raises(ThreadsError, match=match):
        choose_threads(environ=env)
    with pytest.raises(ThreadsError, match="threads must be >= 1"):
        choose_threads(0, environ={})


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpus(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_cpus(tmp_path) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat")
def test_busy_cores_sees_another_process_and_not_this_one():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        other = busy_cores(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert other >= 0.6  # the spinning process: about one core

    def own_spin():  # this process busy while it samples: not counted
        t = time.time()
        while time.time() - t < 0.4:
            pass

    import threading

    worker = threading.Thread(target=own_spin)
    before = busy_cores(0.3)
    worker.start()
    during = busy_cores(0.3)
    worker.join()
    assert during < before + 0.6


@pytest.mark.parametrize("torch_first", [False, True])
def test_a_worker_gets_one_thread(torch_first):
    """A pool worker that has not imported torch does not import it for this; one forked from a
    parent that had (the builder's fork) gets torch.set_num_threads(1)."""
    before = "import torch; torch.set_num_threads(2); " if torch_first else ""
    check = "" if torch_first else "assert 'torch' not in sys.modules; "
    code = (f"import sys; {before}from regionmed.threads import one_thread; one_thread(); {check}"
            "import torch; print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", ENV)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_the_cli_option_sets_this_process_and_its_children(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "models"]) == 0
        assert torch.get_num_threads() == 1 and os.environ[ENV] == "1"
    finally:
        torch.set_num_threads(before)
        os.environ.pop(ENV, None)
    assert main(["--threads", "0", "models"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    # a child process started by a command inherits the choice
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", ENV)}
    code = ("import os, torch; from regionmed.apps.cli import main; main(['--threads', '1', 'models']); "
            "import subprocess, sys; print(subprocess.run([sys.executable, '-c', 'import torch; from regionmed.threads "
            "import set_threads; print(set_threads().threads)'], capture_output=True, text=True).stdout.strip())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_train_threads_is_checked_and_free_on_resume(tmp_path):
    from conftest import tiny_run_config
    from regionmed.apps.train.config import RESUME_NEUTRAL_FIELDS, validate_run_config

    cfg = tiny_run_config(str(tmp_path), str(tmp_path / "out"))
    cfg.train.threads = -1
    with pytest.raises(ConfigError, match="train.threads"):
        validate_run_config(cfg)
    assert "train.threads" in RESUME_NEUTRAL_FIELDS
