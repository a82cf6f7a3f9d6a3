"""Classification evaluate: test-split logits through Trainer.predict, metrics, a per-class report, the confusion
matrix and per-example predictions (what promotion's paired tests compare)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from tunepipe.files import write_csv, write_text
from tunepipe.plots import plot_confusion
from tunepipe.robustness import Perturb, perturb_text
from tunepipe.tasks import Evaluation
from tunepipe.tasks.classification.encode import tokenize_split
from tunepipe.tasks.classification.metrics import aggregate_windows, classification_summary
from tunepipe.training import TrainerProgress


def predict_logits(model, tokenizer, ds: datasets.Dataset, batch_size: int = 64) -> np.ndarray:
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(output_dir="/tmp/tunepipe-eval", per_device_eval_batch_size=batch_size,
                             report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[TrainerProgress()])
    trainer.remove_callback(PrinterCallback)
    # Predict in order of length (little padding per batch), then put rows back in test-split order.
    order = np.argsort(np.asarray(ds["length"]), kind="stable") if "length" in ds.column_names else None
    if order is not None:
        ds = ds.select(order.tolist()).remove_columns("length")
    logits = trainer.predict(ds).predictions
    if order is None:
        return logits
    restored = np.empty_like(logits)
    restored[order] = logits
    return restored


def text_logits(model, tokenizer, ds: datasets.Dataset, aggregation: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """One prediction per text of a tokenized split: its logits (a split of windows, tokenize.long_text: window
    with a text_id column: its windows' logits aggregated by `aggregation`, mean | max, as served) and its gold
    label id."""
    logits, gold = predict_logits(model, tokenizer, ds), np.asarray(ds["labels"])
    if "text_id" in ds.column_names:
        logits, first = aggregate_windows(logits, ds["text_id"], aggregation)
        gold = gold[first]
    return logits, gold


def calibration_data(model, tokenizer, ds: datasets.Dataset, info: dict | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One prediction per text: its logits and its gold label id."""
    return text_logits(model, tokenizer, ds, (info or {}).get("window_aggregation", "mean"))


def robust_score(model, tokenizer, test: pd.DataFrame, perturb: Perturb, info: dict) -> float:
    """Macro-F1 on the prepared test split with every text perturbed, tokenized as the model was trained
    (max_length; windows where it was trained with them) and scored per text like evaluate."""
    texts = [perturb_text(t, perturb) for t in test["text"]]
    ds = datasets.Dataset.from_dict({"text": texts, "label": list(test["label"])})
    label2id = {lab: i for i, lab in enumerate(info["labels"])}
    stride = info.get("stride") if info.get("long_text") == "window" else None
    ds = tokenize_split(ds, tokenizer, info["max_length"], label2id, stride=stride).remove_columns("n_tokens")
    logits, gold = text_logits(model, tokenizer, ds, info.get("window_aggregation", "mean"))
    return classification_summary(gold, logits.argmax(-1), info["labels"])["macro_f1"]


def evaluate(model, tokenizer, test: datasets.Dataset, labels: list[str], reports: Path,
             aggregation: str = "mean") -> Evaluation:
    """Per test text (a text's windows aggregated by `aggregation`, see text_logits)."""
    plots = reports / "plots"
    logits, y_true = text_logits(model, tokenizer, test, aggregation)
    y_pred = logits.argmax(-1)
    metrics = classification_summary(y_true, y_pred, labels)
    ids = list(range(len(labels)))
    write_text(reports / "classification_report.txt", classification_report(
        y_true, y_pred, labels=ids, target_names=labels, digits=4, zero_division=0))
    write_csv(plots / "confusion.csv", [{"actual": labels[t], "predicted": labels[q]}
                                        for t, q in zip(y_true, y_pred, strict=True)], ["actual", "predicted"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    # Per-example predictions: promotion's paired significance test compares two models on these.
    # Quoted CSV: a label may hold a comma or a quote.
    write_csv(reports / "predictions.csv", [
        {"id": i, "label": labels[t], "prediction": labels[q], "confidence": f"{probs[i, q]:.6f}"}
        for i, (t, q) in enumerate(zip(y_true, y_pred, strict=True))], ["id", "label", "prediction", "confidence"])
    plot_confusion(confusion_matrix(y_true, y_pred, labels=ids).tolist(), labels, plots / "confusion_matrix.png")
    return Evaluation(metrics, {lab: row["f1"] for lab, row in metrics["per_class"].items()},
                      [reports / "classification_report.txt", reports / "predictions.csv",
                       plots / "confusion_matrix.png"], calibration=(logits, y_true))


def zero_shot_metrics(scores: np.ndarray, test: pd.DataFrame, labels: list[str]) -> dict:
    """The most similar label per text, scored like the fine-tuned model (classification_summary)."""
    label2id = {lab: i for i, lab in enumerate(labels)}
    gold = np.array([label2id[lab] for lab in test["label"]], dtype=np.int64)
    return classification_summary(gold, np.asarray(scores).argmax(-1), labels)


def decisions(logits: np.ndarray, gold: np.ndarray, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per text and label: softmax probability, predicted (the argmax) and gold, as evaluate scores them."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    eye = np.eye(logits.shape[-1], dtype=bool)
    return probs, eye[logits.argmax(-1)], eye[np.asarray(gold, dtype=np.int64)]
