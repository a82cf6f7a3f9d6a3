"""Classification metrics: Trainer's validation metrics, the test summary (metrics.json) and promotion's paired
tests on per-example labels."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams


def aggregate_windows(logits: np.ndarray, text_ids, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Window logits -> one row per text (mean or per-class max over its windows), texts in order of text_id;
    also the index of each text's first window (where its label is read). serving/pyfunc_model.py does the same."""
    logits, text_ids = np.asarray(logits), np.asarray(text_ids)
    texts, first, inverse = np.unique(text_ids, return_index=True, return_inverse=True)
    if how == "max":
        out = np.full((len(texts), logits.shape[-1]), -np.inf, dtype=logits.dtype)
        np.maximum.at(out, inverse, logits)
    elif how == "mean":
        out = np.zeros((len(texts), logits.shape[-1]), dtype=np.float64)
        np.add.at(out, inverse, logits)
        out = (out / np.bincount(inverse)[:, None]).astype(logits.dtype)
    else:
        raise ValueError(f"unknown window aggregation {how}")
    return out, first


def compute_metrics(labels: list[str], text_ids=None, aggregation: str = "mean"):
    """Trainer compute_metrics: accuracy and macro-F1 over the validation split; with `text_ids` (one per row:
    the windows of tokenize.long_text: window), per text, its windows' logits aggregated first."""

    def compute(eval_pred) -> dict[str, float]:
        logits, label_ids = eval_pred
        if text_ids is not None:
            logits, first = aggregate_windows(logits, text_ids, aggregation)
            label_ids = np.asarray(label_ids)[first]
        preds = np.asarray(logits).argmax(-1)
        return {"accuracy": float(accuracy_score(label_ids, preds)),
                "macro_f1": float(f1_score(label_ids, preds, average="macro"))}

    return compute


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


def paired_p_value(s: PromoteParams, new, old) -> float:
    """The configured paired test on two versions' predictions.csv (one row per test text, same gold labels)."""
    return paired_p_value_labels(s, new["label"].tolist(), new["prediction"].tolist(), old["prediction"].tolist())


def paired_p_value_labels(s: PromoteParams, gold: list[str], new: list[str], old: list[str]) -> float:
    """The configured paired test on per-example label strings (mapped to ids over all labels seen)."""
    from tunepipe.registry.significance import BOOTSTRAP_METRICS, BOOTSTRAP_SEED, mcnemar, paired_bootstrap_labels

    labels = sorted(set(gold) | set(new) | set(old))
    ids = {lab: i for i, lab in enumerate(labels)}
    y, a, b = (np.array([ids[x] for x in col]) for col in (gold, new, old))
    if s.test == "mcnemar":
        return mcnemar(y, a, b)
    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"promote.test: bootstrap recomputes {', '.join(BOOTSTRAP_METRICS)} on classification "
                        f"predictions, not promote.metric {s.metric!r}; use promote.test: mcnemar")
    return paired_bootstrap_labels(y, a, b, len(labels), s.metric, s.bootstrap_samples, BOOTSTRAP_SEED)


def rescore(s: PromoteParams, test, models: dict) -> dict:
    """`promote --reevaluate`: each served model's labels for the prepared test split's texts (a frame with text
    and label columns), scored with the same summary as evaluate; the paired test on the same predictions."""
    from tunepipe.data import content_hash
    from tunepipe.registry.significance import BOOTSTRAP_METRICS
    from tunepipe.tasks.classification.data import records

    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"--reevaluate computes {', '.join(BOOTSTRAP_METRICS)}; promote.metric is {s.metric!r}")
    gold = [str(x) for x in test["label"]]
    preds: dict[str, list[str] | None] = {}
    for role, model in models.items():
        if model is None:
            preds[role] = None
            continue
        preds[role] = [str(x) for x in model.predict(test["text"].astype(str).tolist())["label"]]
    labels = sorted(set(gold).union(*(p for p in preds.values() if p)))
    ids = {lab: i for i, lab in enumerate(labels)}

    def score(pred: list[str] | None) -> float | None:
        if pred is None:
            return None
        summary = classification_summary(np.array([ids[x] for x in gold]), np.array([ids[x] for x in pred]),
                                         labels)
        return float(summary[s.metric])

    p = None
    if preds.get("champion") is not None and s.significance is not None:
        p = paired_p_value_labels(s, gold, preds["candidate"], preds["champion"])
    return {"candidate": score(preds["candidate"]), "champion": score(preds.get("champion")), "p_value": p,
            "test_data_hash": content_hash(records(test))}
