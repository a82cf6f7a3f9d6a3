"""Multi-label metrics: Trainer's validation metrics (at the thresholds the model would get), decision thresholds
tuned per label on validation, the test summary (metrics.json) and promotion's paired tests on label sets."""

from __future__ import annotations

import json

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams

GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # candidate thresholds
# What the paired bootstrap recomputes on a resample of test texts (accuracy = subset accuracy, as sklearn's).
BOOTSTRAP_METRICS = ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "accuracy")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def compute_metrics(labels: list[str], mode: str | float = 0.5):
    """Trainer compute_metrics: micro- and macro-F1 over the validation split at the thresholds the model would be
    saved with if training stopped here (multilabel.threshold: tuned on these predictions, or the fixed number).
    At a plain 0.5 a sigmoid head scores 0 for hundreds of steps while it learns (every probability still near its
    label's frequency): early stopping would end the run and keep its first checkpoint (seen on GoEmotions)."""

    def compute(eval_pred) -> dict[str, float]:
        logits, label_ids = eval_pred
        y, probs = np.asarray(label_ids) >= 0.5, sigmoid(logits)
        th = tune_thresholds(probs, y) if mode == "tune" else np.full(y.shape[1], float(mode))
        pred = probs >= th[None, :]
        return {"micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}

    return compute


def tune_thresholds(probs: np.ndarray, y: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """Per label, the grid threshold that maximises that label's F1 on (probs, y); ties (and labels without a
    positive example, whose F1 is 0 everywhere) go to the threshold nearest 0.5."""
    y = np.asarray(y) >= 0.5
    out = np.empty(y.shape[1])
    for j in range(y.shape[1]):
        pred = probs[:, j][:, None] >= grid[None, :]  # n x grid
        tp = (pred & y[:, j, None]).sum(0)
        den = pred.sum(0) + y[:, j].sum()
        f1 = np.divide(2 * tp, den, out=np.zeros(len(grid)), where=den > 0)
        best = np.flatnonzero(np.isclose(f1, f1.max()))
        out[j] = grid[best[np.argmin(np.abs(grid[best] - 0.5))]]
    return out


def trained_thresholds(trainer, validation, labels: list[str], mode: str | float) -> dict:
    """finetune's addition to the model's metadata: the decision threshold of each label (multilabel.threshold:
    tuned on the validation split with the trained model, or one number for all)."""
    if mode == "tune":
        probs = sigmoid(trainer.predict(validation).predictions)
        th = tune_thresholds(probs, np.asarray(validation["labels"]))
    else:
        th = np.full(len(labels), float(mode))
    return {"thresholds": {lab: float(t) for lab, t in zip(labels, th, strict=True)},
            "threshold_mode": str(mode)}


def multilabel_summary(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
    """0/1 matrices (texts x labels) in, the metrics.json content out."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    p, r, f, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    subset = float(accuracy_score(y, pred))
    return {
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "samples_f1": float(f1_score(y, pred, average="samples", zero_division=0)),
        "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "subset_accuracy": subset,
        "accuracy": subset,  # sklearn's accuracy_score on label sets: the exact set
        "hamming_loss": float(hamming_loss(y, pred)),
        "label_cardinality": float(y.sum(1).mean()) if len(y) else 0.0,
        "predicted_cardinality": float(pred.sum(1).mean()) if len(y) else 0.0,
        "n_test": int(len(y)),
        "per_label": {lab: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]),
                            "support": int(support[j])} for j, lab in enumerate(labels)},
    }


def metric_on_weights(weights: np.ndarray, y: np.ndarray, pred: np.ndarray, metric: str) -> np.ndarray:
    """`metric` on each bootstrap resample at once (row b of `weights`: how often each text was drawn); the same
    definitions as multilabel_summary (zero_division=0)."""
    w = np.asarray(weights, dtype=np.float64)
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    total = w.sum(1)
    if metric in ("subset_accuracy", "accuracy"):
        return w @ (y == pred).all(1).astype(np.float64) / total
    if metric == "samples_f1":
        den = y.sum(1) + pred.sum(1)
        per_text = np.divide(2 * (y * pred).sum(1), den, out=np.zeros(len(y)), where=den > 0)
        return w @ per_text / total
    tp, fp, fn = w @ (y * pred), w @ ((1 - y) * pred), w @ (y * (1 - pred))
    if metric == "micro_f1":
        num, den = 2 * tp.sum(1), (2 * tp + fp + fn).sum(1)
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    if metric == "macro_f1":
        den = 2 * tp + fp + fn
        return np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0).mean(1)
    raise ValueError(f"multi-label bootstrap supports {', '.join(BOOTSTRAP_METRICS)}, not {metric!r}")


def as_matrix(sets: list[list[str]], labels: list[str]) -> np.ndarray:
    index = {lab: j for j, lab in enumerate(labels)}
    out = np.zeros((len(sets), len(labels)), dtype=bool)
    for i, ls in enumerate(sets):
        out[i, [index[x] for x in ls]] = True
    return out


def paired_p_value(s: PromoteParams, new, old) -> float:
    """The configured paired test on two versions' predictions.csv (label and prediction: JSON lists)."""
    gold, a, b = (new["label"].map(json.loads).tolist(), new["prediction"].map(json.loads).tolist(),
                  old["prediction"].map(json.loads).tolist())
    return paired_p_value_sets(s, gold, a, b)


def paired_p_value_sets(s: PromoteParams, gold: list[list[str]], new: list[list[str]], old: list[list[str]]
                        ) -> float:
    """bootstrap: resamples the test texts and recomputes promote.metric (over the labels seen in gold or either
    prediction); mcnemar: exact on right-vs-wrong per text, right = the exact label set."""
    from tunepipe.registry.significance import BOOTSTRAP_SEED, mcnemar, paired_bootstrap

    if s.test == "mcnemar":
        key = [json.dumps(sorted(x)) for x in gold], [json.dumps(sorted(x)) for x in new]
        return mcnemar(np.array(key[0]), np.array(key[1]), np.array([json.dumps(sorted(x)) for x in old]))
    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"promote.test: bootstrap recomputes {', '.join(BOOTSTRAP_METRICS)} on multi-label "
                        f"predictions, not promote.metric {s.metric!r}; use promote.test: mcnemar")
    labels = sorted({x for col in (gold, new, old) for ls in col for x in ls})
    y, a, b = (as_matrix(col, labels) for col in (gold, new, old))
    return paired_bootstrap(lambda w: metric_on_weights(w, y, a, s.metric),
                            lambda w: metric_on_weights(w, y, b, s.metric), len(y), s.bootstrap_samples,
                            BOOTSTRAP_SEED)


def rescore(s: PromoteParams, test, models: dict) -> dict:
    """`promote --reevaluate`: each served model's label sets for the prepared test split's texts, scored with the
    same summary as evaluate; the paired test on the same predictions."""
    from tunepipe.data import content_hash
    from tunepipe.tasks.multilabel.data import records

    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"--reevaluate computes {', '.join(BOOTSTRAP_METRICS)}; promote.metric is {s.metric!r}")
    gold = [sorted(str(x) for x in ls) for ls in test["labels"]]
    preds: dict[str, list[list[str]] | None] = {}
    for role, model in models.items():
        preds[role] = None if model is None else [
            sorted(x["label"] for x in row) for row in model.predict(test["text"].astype(str).tolist())["labels"]]
    labels = sorted({x for col in [gold, *(p for p in preds.values() if p)] for ls in col for x in ls})

    def score(pred: list[list[str]] | None) -> float | None:
        if pred is None:
            return None
        return float(multilabel_summary(as_matrix(gold, labels), as_matrix(pred, labels), labels)[s.metric])

    p = None
    if preds.get("champion") is not None and s.significance is not None:
        p = paired_p_value_sets(s, gold, preds["candidate"], preds["champion"])
    test = test.assign(labels=[tuple(g) for g in gold])
    return {"candidate": score(preds["candidate"]), "champion": score(preds.get("champion")), "p_value": p,
            "test_data_hash": content_hash(records(test))}
