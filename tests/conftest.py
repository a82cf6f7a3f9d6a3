"""Shared fixtures: a tiny randomly initialised BERT, tiny labelled data, and a project directory to run in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import synthetic_rows, tiny_model, tiny_params, write_csv

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from more threads; one each keeps parallel test processes from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the real MiniLM tokenizer (fast, offline)."""
    return tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A working directory with params.yaml and tiny data; stages run in-process against it."""

    def make(n_rows: int = 150, **overrides) -> Path:
        write_csv(tmp_path / "data/raw/train.csv", synthetic_rows(n_rows))
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir, **overrides)))
        return tmp_path

    monkeypatch.chdir(tmp_path)
    return make


@pytest.fixture(autouse=True)
def _fresh_tracking_env():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: keep one test's (or a module fixture's) store from
    leaking into the next. Not through monkeypatch: its undo (at teardown, or a test's own monkeypatch.undo()) would
    put back a value a module-scoped fixture had left, pointing the test at another project's store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
