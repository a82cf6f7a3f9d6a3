"""Multi-label evaluate: test-split logits through Trainer.predict, sigmoid probabilities, each label decided at
the threshold stored with the model (training_info.json), metrics, a per-label report, a label confusion (a
missed label is predicted "(none)", a spurious one is actual "(none)") and per-example predictions (what
promotion's paired tests compare)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from tunepipe.files import read_json, write_text
from tunepipe.paths import TRAINING_INFO
from tunepipe.plots import plot_confusion
from tunepipe.robustness import Perturb, perturb_text
from tunepipe.tasks import Evaluation
from tunepipe.tasks.classification.evaluate import predict_logits
from tunepipe.tasks.multilabel.encode import tokenize_split
from tunepipe.tasks.multilabel.metrics import multilabel_summary, sigmoid

NONE = "(none)"


def stored_thresholds(model, labels: list[str]) -> np.ndarray:
    """The thresholds finetune stored in the model's own metadata (0.5 for a model saved without them)."""
    info_file = Path(str(getattr(model, "name_or_path", ""))) / TRAINING_INFO
    stored = read_json(info_file).get("thresholds", {}) if info_file.is_file() else {}
    return np.array([float(stored.get(lab, 0.5)) for lab in labels])


def label_pairs(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> list[tuple[str, str]]:
    """(actual, predicted) per gold or predicted label of each text: hits on the diagonal, misses and spurious
    labels against "(none)"."""
    pairs = []
    for row_y, row_p in zip(y, pred, strict=True):
        for j, lab in enumerate(labels):
            if row_y[j] or row_p[j]:
                pairs.append((lab if row_y[j] else NONE, lab if row_p[j] else NONE))
    return pairs


def calibration_data(model, tokenizer, ds: datasets.Dataset, info: dict | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One logit vector per text and its 0/1 gold row (the sigmoid calibrator fits one temperature per label)."""
    return predict_logits(model, tokenizer, ds), (np.asarray(ds["labels"]) >= 0.5).astype(np.float64)


def decided(model, tokenizer, ds: datasets.Dataset, th: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A tokenized split's (logits, probabilities, gold 0/1 rows, predicted 0/1 rows at the thresholds `th`)."""
    logits = predict_logits(model, tokenizer, ds)
    probs = sigmoid(logits)
    return logits, probs, np.asarray(ds["labels"]) >= 0.5, probs >= th[None, :]


def robust_score(model, tokenizer, test: pd.DataFrame, perturb: Perturb, info: dict) -> float:
    """Micro-F1 on the prepared test split with every text perturbed, tokenized and decided like evaluate."""
    labels = info["labels"]
    ds = datasets.Dataset.from_dict({"text": [perturb_text(t, perturb) for t in test["text"]],
                                     "labels": [list(ls) for ls in test["labels"]]})
    ds = tokenize_split(ds, tokenizer, info["max_length"], {lab: i for i, lab in enumerate(labels)})
    _, _, y, pred = decided(model, tokenizer, ds.remove_columns("n_tokens"), stored_thresholds(model, labels))
    return multilabel_summary(y, pred, labels)["micro_f1"]


def evaluate(model, tokenizer, test: datasets.Dataset, labels: list[str], reports: Path,
             thresholds: np.ndarray | None = None) -> Evaluation:
    plots = reports / "plots"
    th = stored_thresholds(model, labels) if thresholds is None else np.asarray(thresholds)
    logits, probs, y, pred = decided(model, tokenizer, test, th)
    metrics = {**multilabel_summary(y, pred, labels), "thresholds": dict(zip(labels, th.tolist(), strict=True))}
    write_text(reports / "classification_report.txt", classification_report(
        y, pred, target_names=labels, digits=4, zero_division=0))
    pairs = label_pairs(y, pred, labels)
    write_text(plots / "confusion.csv", "actual,predicted\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    names = [*labels, NONE]
    index = {n: i for i, n in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for a, b in pairs:
        matrix[index[a]][index[b]] += 1
    plot_confusion(matrix, names, plots / "confusion_matrix.png", title="label confusion ((none) = missed / spurious)")
    # Per-example predictions: promotion's paired tests compare two models on these (label sets as JSON lists).
    def sets(m: np.ndarray) -> list[str]:
        return [json.dumps([lab for j, lab in enumerate(labels) if row[j]]) for row in m]

    buf = io.StringIO()
    pd.DataFrame({"id": range(len(y)), "label": sets(y), "prediction": sets(pred),
                  "correct": (y == pred).all(1).astype(int),
                  "probabilities": [json.dumps([round(float(x), 6) for x in row]) for row in probs]}
                 ).to_csv(buf, index=False)
    write_text(reports / "predictions.csv", buf.getvalue())
    return Evaluation(metrics, {lab: row["f1"] for lab, row in metrics["per_label"].items()},
                      [reports / "classification_report.txt", reports / "predictions.csv",
                       plots / "confusion_matrix.png"], calibration=(logits, y.astype(np.float64)))


def decisions(logits: np.ndarray, gold: np.ndarray, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per text and label: sigmoid probability, predicted (at the threshold stored with the model) and gold."""
    probs = sigmoid(logits)
    th = np.array([float(info.get("thresholds", {}).get(lab, 0.5)) for lab in info["labels"]])
    return probs, probs >= th[None, :], np.asarray(gold) >= 0.5
