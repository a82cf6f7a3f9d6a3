"""Task families. Everything that differs between text classification, NER and whatever comes next lives in
tasks/<name>/, behind the Task interface below: the stages, the training loop, export and promotion only call
these methods. Adding a task family is adding a folder whose __init__.py defines `TASK`.

The task is chosen once, by params.yaml's `task` at training time; finetune records it in the model's own
metadata (models/model/training_info.json) and every later step reads it back from there.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunepipe.errors import UserError

if TYPE_CHECKING:
    import datasets
    import numpy as np
    import pandas as pd

    from tunepipe.params import Params, PromoteParams


@dataclass(frozen=True)
class Prepared:
    """What prepare produced: the task's own rows per split, the data report, and how to write the splits."""

    splits: dict[str, Any]
    report: dict  # reports/data.json; holds at least labels, hashes (per split) and data_hash
    write: Callable[[dict[str, Any], Path], None]


@dataclass(frozen=True)
class Evaluation:
    """What evaluate produced on the test split."""

    metrics: dict  # reports/metrics.json
    per_label_f1: dict[str, float]  # logged to MLflow as test_f1_<label>
    artifacts: list[Path]  # report files logged with the run


class Task:
    """The interface every task family implements (see tasks/classification and tasks/ner)."""

    name: str
    headline_metric: str  # validation metric for early stopping and model selection; the test metric reported
    auto_model: str  # the transformers AutoModel class of the task head
    peft_task_type: str  # peft.TaskType member for LoRA

    # prepare: source -> clean splits
    def prepare(self, p: Params) -> Prepared:
        raise NotImplementedError

    # tokenize: prepared splits -> model inputs with labels, and a truncation report
    def tokenize(self, p: Params, prepared: Path) -> tuple[datasets.DatasetDict, dict]:
        raise NotImplementedError

    # augment: a bigger train split, labels preserved
    def augment(self, train: datasets.Dataset, p: Params) -> datasets.Dataset:
        raise NotImplementedError

    # finetune: batches and validation metrics for Trainer
    def collator(self, tokenizer) -> Callable:
        raise NotImplementedError

    def compute_metrics(self, labels: list[str]) -> Callable[[Any], dict[str, float]]:
        raise NotImplementedError

    # evaluate: the trained model on the test split; writes the reports
    def evaluate(self, model, tokenizer, test: datasets.Dataset, labels: list[str], reports: Path) -> Evaluation:
        raise NotImplementedError

    # export: what ONNX and PyTorch are compared on
    def scored_positions(self, batch: dict[str, np.ndarray]) -> slice | np.ndarray:
        """Index into the logits (every axis but the last) of the positions that carry a prediction."""
        raise NotImplementedError

    def gold_labels(self, ds: datasets.Dataset) -> np.ndarray | None:
        """One gold label id per example, where the task has one (export reports each model's accuracy)."""
        return None

    # predict: one served result (serving/pyfunc_model.py's output) as a line for people
    def describe_prediction(self, text: str, result: dict) -> str:
        raise NotImplementedError

    # promote: paired test on two versions' per-example test predictions (evaluation/predictions.csv)
    def paired_p_value(self, s: PromoteParams, new: pd.DataFrame, old: pd.DataFrame) -> float:
        raise NotImplementedError

    def rescore(self, s: PromoteParams, test: pd.DataFrame, models: dict[str, Any]) -> dict:
        """`promote --reevaluate`: score served models (pyfunc, by role; None = absent) on the prepared test split.
        Returns {"candidate": value, "champion": value or None, "p_value": p or None, "test_data_hash": hash}."""
        raise UserError(f"--reevaluate: {self.name} models cannot be re-scored from the served output; "
                        "re-run `dvc repro` on the same data instead")


def available() -> list[str]:
    """Task families present as folders here."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def get_task(name: str) -> Task:
    if name not in available():
        raise UserError(f"task: unknown task {name!r} (available: {', '.join(available())})")
    return importlib.import_module(f"{__name__}.{name}").TASK
