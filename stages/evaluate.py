"""Stage evaluate: the fine-tuned model on the test split -> metrics, a per-class report, a confusion matrix."""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import mlflow
import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from tunepipe import tracking
from tunepipe.errors import run_main
from tunepipe.files import read_json, write_json, write_text
from tunepipe.params import load_params
from tunepipe.paths import METRICS, MODEL, PLOTS, REPORTS, TOKENIZED, TRAINING_INFO
from tunepipe.plots import plot_confusion
from tunepipe.progress import say
from tunepipe.training import TrainerProgress


def classification_summary(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Plain arrays of label ids in, the metrics.json content out."""
    ids = list(range(len(labels)))
    report = classification_report(y_true, y_pred, labels=ids, target_names=labels, output_dict=True,
                                   zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        "n_test": int(len(y_true)),
        "per_class": {lab: {"precision": report[lab]["precision"], "recall": report[lab]["recall"],
                            "f1": report[lab]["f1-score"], "support": int(report[lab]["support"])}
                      for lab in labels},
    }


def predict_logits(model_dir: Path, ds: datasets.Dataset, batch_size: int = 64) -> np.ndarray:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = TrainingArguments(output_dir="/tmp/tunepipe-eval", per_device_eval_batch_size=batch_size,
                             report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, processing_class=tok, data_collator=DataCollatorWithPadding(tok),
                      callbacks=[TrainerProgress()])
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


def main() -> None:
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    info = read_json(MODEL / TRAINING_INFO)
    test = datasets.load_from_disk(str(TOKENIZED))["test"]
    if p.task == "ner":
        from tunepipe.ner_eval import evaluate_ner

        metrics, artifacts = evaluate_ner(MODEL, test, info["labels"], REPORTS)
    else:
        labels = info["labels"]
        logits = predict_logits(MODEL, test)
        y_true = np.asarray(test["labels"])
        y_pred = logits.argmax(-1)
        metrics = classification_summary(y_true, y_pred, labels)
        text_report = classification_report(y_true, y_pred, labels=list(range(len(labels))), target_names=labels,
                                            digits=4, zero_division=0)
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
        write_text(REPORTS / "classification_report.txt", text_report)
        write_text(PLOTS / "confusion.csv", "actual,predicted\n" + "".join(
            f"{labels[t]},{labels[q]}\n" for t, q in zip(y_true, y_pred, strict=True)))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        # Per-example predictions: promotion's paired significance test compares two models on these.
        write_text(REPORTS / "predictions.csv", "id,label,prediction,confidence\n" + "".join(
            f"{i},{labels[t]},{labels[q]},{probs[i, q]:.6f}\n" for i, (t, q) in enumerate(zip(y_true, y_pred,
                                                                                               strict=True))))
        plot_confusion(matrix.tolist(), labels, PLOTS / "confusion_matrix.png")
        artifacts = [REPORTS / "classification_report.txt", REPORTS / "predictions.csv",
                     PLOTS / "confusion_matrix.png"]
    metrics["test_data_hash"] = info["test_data_hash"]
    write_json(METRICS, metrics)

    tracking.setup(p.tracking)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    for lab, row in metrics.get("per_class", metrics.get("per_type", {})).items():  # per_type: NER
        flat[f"test_f1_{lab}"] = row["f1"]
    client.log_batch(info["run_id"], metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in flat.items()])
    client.log_artifact(info["run_id"], str(METRICS), "evaluation")
    for path in artifacts:
        client.log_artifact(info["run_id"], str(path), "evaluation")
    headline = "f1" if p.task == "ner" else "macro_f1"
    say(f"evaluate: test {headline} {metrics[headline]:.4f}, accuracy {metrics.get('accuracy', 0):.4f}, "
        f"n_test {metrics['n_test']} (per-class report: {REPORTS / 'classification_report.txt'})")


if __name__ == "__main__":
    run_main(main)
