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
    # The test split's (logits, gold) as calibration_data gives them, where evaluate had them at hand (spares
    # the calibration a second pass over the test split).
    calibration: tuple[np.ndarray, np.ndarray] | None = None


class Task:
    """The interface every task family implements. A task folder has the same modules as every other, and the
    stage-facing methods below call them by that convention:
      data.prepare(p)                          prepare: source -> clean splits (a Prepared)
      encode.tokenize(p, prepared_dir)         tokenize: model inputs with labels, a truncation report
      augment.augment(train, p)                augment: a bigger train split, labels preserved
      metrics.compute_metrics(labels)          finetune: Trainer's validation metrics
      loss(weights), label_ids(train)          finetune: the loss with finetune.class_weights (methods below)
      evaluate.evaluate(model, tok, test, labels, reports_dir)   evaluate: metrics and reports (an Evaluation)
      evaluate.calibration_data(model, tok, ds)   evaluate: (logits, gold) of a split for calibration
      evaluate.robust_score(model, tok, test, perturb, info)   evaluate: headline metric on a perturbed test copy
      metrics.paired_p_value(s, new, old)      promote: paired test on two versions' predictions.csv
      metrics.rescore(s, test, models)         promote --reevaluate (optional)
      evaluate.decisions(logits, gold, info)   evaluate: explanations.html's right/wrong cases (explainable tasks)
      evaluate.zero_shot_metrics(scores, test, labels)   evaluate: the zero-shot baseline scored (tunepipe/zeroshot.py)
      serve.predict(predictor, texts)          serving: logits -> the served output (a self-contained file that
                                               export copies into the exported model; see serve_code)
    The folder's __init__.py defines TASK, a subclass instance with the attributes and the few small methods
    below that have no default."""

    name: str  # the folder's name, and params.yaml's `task`
    headline_metric: str  # validation metric for early stopping and model selection; the test metric reported
    auto_model: str  # the transformers AutoModel class of the task head
    peft_task_type: str  # peft.TaskType member for LoRA
    problem_type: str | None = None  # the head's config.problem_type where the task fixes it (its loss)
    # How logits become probabilities, and so how they are calibrated (tunepipe/calibration.py): "softmax" = one
    # temperature over the label softmax; "sigmoid" = one temperature per label (multi-label).
    calibrator: str = "softmax"
    # tokenize.long_text values the task implements; "window" needs encode to add a text_id column (one row per
    # window) and validation_metrics/evaluate/serving to aggregate the windows back to one prediction per text.
    long_text_modes: tuple[str, ...] = ("truncate",)
    # Robustness perturbations the task adds to robustness.perturbations (tunepipe/robustness.py), e.g. NER's
    # context_noise, which needs a label per word.
    extra_perturbations: tuple[str, ...] = ()
    # Word attributions (serving/explain.py: integrated gradients of one label's logit per text, so a head with one
    # prediction per text): `tunepipe predict --explain`, the served {"explain": true}, evaluate's explanations.html.
    explainable: bool = False
    # evaluate's zero-shot baseline (tunepipe/zeroshot.py): None where the task scores it (zero_shot_metrics), else
    # why it cannot, recorded in reports/zero_shot.json.
    zero_shot_unsupported: str | None = "no zero-shot form for this task"
    # finetune.method: setfit and data.train_per_class (one label per text, k texts per class).
    setfit: bool = False

    @property
    def serve_code(self) -> Path:
        """tasks/<name>/serve.py: how the served model turns logits into this task's output. Self-contained (no
        tunepipe imports): export copies it into the exported model directory, which serving/pyfunc_model.py runs."""
        return Path(__file__).parent / self.name / "serve.py"

    def part(self, module: str):
        """One of the task folder's modules, imported on first use (choosing a task loads nothing heavy)."""
        return importlib.import_module(f"{__name__}.{self.name}.{module}")

    def prepare(self, p: Params) -> Prepared:
        return self.part("data").prepare(p)

    def tokenize(self, p: Params, prepared: Path) -> tuple[datasets.DatasetDict, dict]:
        self.check_long_text(p)
        return self.part("encode").tokenize(p, prepared)

    def check_long_text(self, p: Params) -> None:
        if p.tokenize.long_text not in self.long_text_modes:
            raise UserError(f"tokenize.long_text: {p.tokenize.long_text} is not available for task: {self.name} "
                            f"(use {', '.join(self.long_text_modes)})")

    def augment(self, train: datasets.Dataset, p: Params) -> datasets.Dataset:
        return self.part("augment").augment(train, p)

    def compute_metrics(self, labels: list[str]) -> Callable[[Any], dict[str, float]]:
        return self.part("metrics").compute_metrics(labels)

    def validation_metrics(self, labels: list[str], validation: datasets.Dataset, p: Params
                           ) -> Callable[[Any], dict[str, float]]:
        """Trainer's compute_metrics for this validation split (a task with windows scores them per text)."""
        return self.compute_metrics(labels)

    def evaluate(self, model, tokenizer, test: datasets.Dataset, labels: list[str], reports: Path,
                 info: dict | None = None) -> Evaluation:
        """info: the model's own metadata (training_info.json), for a task whose evaluation depends on it."""
        return self.part("evaluate").evaluate(model, tokenizer, test, labels, reports)

    def calibration_data(self, model, tokenizer, ds: datasets.Dataset, info: dict | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(logits, gold) of every scored prediction of a tokenized split, in the calibrator's shapes: softmax
        (n, n_labels) logits and n label ids; sigmoid (n, n_labels) logits and 0/1 rows. info: the model's own
        metadata (training_info.json)."""
        return self.part("evaluate").calibration_data(model, tokenizer, ds, info)

    def robust_score(self, model, tokenizer, test: pd.DataFrame, perturb, info: dict) -> float:
        """The headline metric on a perturbed copy of the prepared test split (data/prepared/test.parquet as a
        DataFrame): `perturb` (tunepipe/robustness.py) applied to each example's words, re-encoded the way the
        model was trained (info: training_info.json) and scored like the clean test split."""
        return self.part("evaluate").robust_score(model, tokenizer, test, perturb, info)

    def zero_shot_metrics(self, scores: np.ndarray, test: pd.DataFrame, labels: list[str]) -> dict:
        """The zero-shot baseline on the prepared test split, scored with the task's own test metrics (the same
        layout as metrics.json's). scores: (n_texts, n_labels), higher = more likely (cosine or entailment)."""
        return self.part("evaluate").zero_shot_metrics(scores, test, labels)

    def served_probabilities(self, results: list[dict]) -> tuple[list[str], np.ndarray]:
        """`tunepipe suggest`: the served results (serving/pyfunc_model.py's output) as (labels, an (n, n_labels)
        probability matrix) to measure uncertainty on."""
        raise UserError(f"suggest: not available for {self.name} models (it ranks one label distribution per text)")

    def paired_p_value(self, s: PromoteParams, new: pd.DataFrame, old: pd.DataFrame) -> float:
        return self.part("metrics").paired_p_value(s, new, old)

    def rescore(self, s: PromoteParams, test: pd.DataFrame, models: dict[str, Any]) -> dict:
        """`promote --reevaluate`: score served models (pyfunc, by role; None = absent) on the prepared test split.
        Returns {"candidate": value, "champion": value or None, "p_value": p or None, "test_data_hash": hash}."""
        metrics = self.part("metrics")
        if not hasattr(metrics, "rescore"):
            raise UserError(f"--reevaluate: {self.name} models cannot be re-scored from the served output; "
                            "re-run `dvc repro` on the same data instead")
        return metrics.rescore(s, test, models)

    def check_explainable(self, what: str) -> None:
        if not self.explainable:
            raise UserError(f"{what}: not available for {self.name} models")

    def decisions(self, logits: np.ndarray, gold: np.ndarray, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An explainable task's test decisions from calibration_data's (logits, gold): per text and label the
        probability, whether the label was predicted and whether it is gold (three (n, n_labels) arrays)."""
        self.check_explainable("explanations")
        return self.part("evaluate").decisions(logits, gold, info)

    def trained_metadata(self, trainer, dsd: datasets.DatasetDict, labels: list[str], p: Params) -> dict:
        """finetune, after training: what the task adds to the model's own metadata (training_info.json), e.g.
        decision thresholds tuned on validation."""
        return {}

    def served_metadata(self, info: dict) -> dict:
        """export: what the served model needs from the model's metadata beyond task, labels and max_length
        (written into models/onnx/tunepipe.json, which serving/pyfunc_model.py reads)."""
        return {}

    def label_ids(self, train: datasets.Dataset) -> np.ndarray:
        """finetune.class_weights: every label id the loss is computed on in `train`, one per target."""
        raise UserError(f"finetune.class_weights: task {self.name} has no class weights; set it to none")

    def loss(self, weights: list[float]) -> Callable:
        """Trainer's `compute_loss_func` weighting each class's targets by `weights` (one per label id): weighted
        cross-entropy over the logits' last axis, targets -100 skipped, so it fits a sequence head (a label per
        text) and a token head (a label per token) alike. The weighted mean sum(w*l)/sum(w) is per batch, as
        training runs without gradient accumulation."""
        import torch

        def compute_loss(outputs, labels, num_items_in_batch=None):
            logits = outputs["logits"]
            w = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     weight=w, ignore_index=-100)

        return compute_loss

    # No defaults: small, and what makes the task what it is.
    def collator(self, tokenizer) -> Callable:
        """Pads a batch for Trainer."""
        raise NotImplementedError

    def scored_positions(self, batch: dict[str, np.ndarray]) -> slice | np.ndarray:
        """Export parity: index into the logits (every axis but the last) of the positions that carry a
        prediction."""
        raise NotImplementedError

    def gold_labels(self, ds: datasets.Dataset) -> np.ndarray | None:
        """One gold label id per example, where the task has one (export reports each model's accuracy)."""
        return None

    def describe_prediction(self, text: str, result: dict) -> str:
        """`tunepipe predict`: one served result (serving/pyfunc_model.py's output) as a line for people."""
        raise NotImplementedError


def available() -> list[str]:
    """Task families present as folders here."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def get_task(name: str) -> Task:
    if name not in available():
        raise UserError(f"task: unknown task {name!r} (available: {', '.join(available())})")
    return importlib.import_module(f"{__name__}.{name}").TASK
