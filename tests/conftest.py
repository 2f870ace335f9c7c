"""Shared fixtures: tiny models built from configs and tiny datasets, all offline."""

from __future__ import annotations

import os

# The whole test session runs offline: nothing may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs one worker per core (-n 2 on the 2-core CI machine): each worker, and every process it
    # starts, computes on one thread instead of each oversubscribing both cores.
    os.environ["OMP_NUM_THREADS"] = "1"

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402
    make_imagefolder,
    make_parquet_dataset,
    tiny_cait,
    tiny_deit,
    tiny_lift,
    tiny_swin,
    tiny_vit,
    tiny_widelast,
)


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def deit():
    return tiny_deit()


@pytest.fixture
def swin():
    return tiny_swin()


@pytest.fixture
def cait():
    return tiny_cait()


@pytest.fixture
def lift():
    return tiny_lift()


@pytest.fixture
def widelast():
    return tiny_widelast()


@pytest.fixture
def pixel_values():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=generator)


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory):
    return make_parquet_dataset(tmp_path_factory.mktemp("parquet"))


@pytest.fixture(scope="session")
def parquet_dataset_48(tmp_path_factory):
    """48 training images: fewer passes over the stream for long runs (each pass end costs datasets ~5 s)."""
    return make_parquet_dataset(tmp_path_factory.mktemp("parquet48"), per_class=16)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """A tiny CaiT teacher (timm wrapper) and a tiny ViT student config, saved to disk."""
    root = tmp_path_factory.mktemp("models")
    teacher = tiny_cait(num_labels=3)
    teacher.save_pretrained(root / "teacher")
    student_config = tiny_vit(num_labels=3).config
    student_config.save_pretrained(root / "student_config")
    return {"teacher": str(root / "teacher"), "student_config": str(root / "student_config" / "config.json")}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
