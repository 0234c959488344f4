"""Shared fixtures: a small phantom dataset and the tiny model (fast on CPU: the named model
``tiny-vit-minilm``, regionmed models tiny-vit-minilm)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from regionmed.apps.train.config import RunConfig, StageConfig  # noqa: E402
from regionmed.model.config import ModelConfig  # noqa: E402
from regionmed.model.registry import model_config, resolve_model_mapping  # noqa: E402

TINY = "tiny-vit-minilm"  # ViT-Tiny depth 2 @ 64 px + a 2-layer MiniLM without dropout (deterministic across processes)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_model_config(**roi) -> ModelConfig:
    """The tiny model with the ROI fields ``roi`` changed."""
    return model_config(TINY, {"roi": roi})


def tiny_model_mapping(**fields) -> dict:
    """The tiny model's complete config mapping (a fresh copy), with ``fields`` laid over it."""
    return resolve_model_mapping({"name": TINY, **fields})


def tiny_run_config(data_dir: str, output_dir: str, mode: str = "crop", steps: tuple[int, ...] = (2, 2), batch_size: int = 8) -> RunConfig:
    """Two stages: global only, then everything with ROIs."""
    cfg = RunConfig(seed=0, model=tiny_model_config(mode=mode))
    cfg.data.train = data_dir
    cfg.train.batch_size = batch_size
    cfg.train.output_dir = output_dir
    cfg.train.tensorboard = False
    cfg.train.stages = [
        StageConfig(name="warmup", steps=steps[0], lr=1e-3, losses={"global": 1.0}),
        StageConfig(name="region", steps=steps[1], lr=1e-3, use_rois=mode != "none",
                    losses={"global": 1.0, "summary": 0.5, **({"region": 1.0, "hard_negative": 1.0} if mode != "none" else {})}),
    ]
    return cfg


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory):
    from regionmed.apps.curation.phantoms import PhantomConfig, write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, n_train=48, n_test=16, seed=0, config=PhantomConfig(image_size=128), progress=False)
    return out


@contextlib.contextmanager
def http_server(folder):
    """Serve ``folder`` with Python's http.server on a free loopback port; yields the base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)
