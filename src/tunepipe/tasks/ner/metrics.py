"""Entity-level NER metrics (seqeval, strict mode under the data's scheme) for Trainer, the evaluate stage and
promotion's paired tests.

Strict mode counts an entity only when its tags form a valid chunk of the scheme and both span and type match.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams
from tunepipe.tasks.ner.encode import IGNORED
from tunepipe.tasks.ner.scheme import seqeval_scheme

COUNTS = ["correct_entities", "gold_entities", "pred_entities"]  # per-sentence columns of predictions.csv


def entity_scores(y_true: list[list[str]], y_pred: list[list[str]], labels: list[str]) -> dict[str, float]:
    """Headline scalars: micro entity F1 (`f1`), macro over types, micro precision/recall, token accuracy."""
    kw = {"mode": "strict", "scheme": seqeval_scheme(labels), "zero_division": 0}
    return {
        "f1": float(f1_score(y_true, y_pred, average="micro", **kw)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", **kw)),
        "precision": float(precision_score(y_true, y_pred, average="micro", **kw)),
        "recall": float(recall_score(y_true, y_pred, average="micro", **kw)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def per_type(y_true: list[list[str]], y_pred: list[list[str]], labels: list[str]) -> dict[str, dict]:
    report = classification_report(y_true, y_pred, mode="strict", scheme=seqeval_scheme(labels), output_dict=True,
                                   zero_division=0)
    return {kind: {"precision": float(r["precision"]), "recall": float(r["recall"]), "f1": float(r["f1-score"]),
                   "support": int(r["support"])}
            for kind, r in report.items() if not kind.endswith(" avg")}


def text_report(y_true: list[list[str]], y_pred: list[list[str]], labels: list[str]) -> str:
    return classification_report(y_true, y_pred, mode="strict", scheme=seqeval_scheme(labels), digits=4,
                                 zero_division=0)


def decode(pred_ids: np.ndarray, label_ids: np.ndarray, labels: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Padded (n, seq) id arrays -> tag sequences over the labelled positions only (IGNORED ones dropped)."""
    y_true, y_pred = [], []
    for pred, gold in zip(pred_ids, label_ids, strict=True):
        keep = gold != IGNORED
        y_true.append([labels[i] for i in gold[keep]])
        y_pred.append([labels[i] for i in pred[keep]])
    return y_true, y_pred


def compute_metrics(labels: list[str]) -> Callable[[object], dict[str, float]]:
    """Trainer compute_metrics over labelled sub-tokens (= words, unless tokenize.label_all_subtokens)."""

    def compute(eval_pred) -> dict[str, float]:
        logits, label_ids = eval_pred
        logits = np.asarray(logits)
        preds = logits.argmax(-1) if logits.ndim == 3 else logits
        return entity_scores(*decode(preds, np.asarray(label_ids), labels), labels)

    return compute


def paired_p_value(s: PromoteParams, new, old) -> float:
    """Two versions' predictions.csv (one row per test sentence): McNemar on whole-sentence correctness, the
    bootstrap on the per-sentence entity counts (seqeval's micro precision/recall/F1 on each resample)."""
    from tunepipe.registry.significance import (
        BOOTSTRAP_SEED,
        ENTITY_METRICS,
        mcnemar,
        paired_bootstrap_entities,
    )

    if s.test == "mcnemar":
        return mcnemar(new["label"].to_numpy(), new["prediction"].to_numpy(), old["prediction"].to_numpy())
    if s.metric not in ENTITY_METRICS:
        raise UserError(f"promote.test: bootstrap recomputes {', '.join(ENTITY_METRICS)} on NER predictions, "
                        f"not promote.metric {s.metric!r}; use promote.test: mcnemar")
    missing = [c for c in COUNTS if c not in new.columns or c not in old.columns]
    if missing:
        raise UserError(f"promote.test: bootstrap needs the {', '.join(missing)} column(s) of "
                        "evaluation/predictions.csv; re-run the evaluate stage or use promote.test: mcnemar")
    return paired_bootstrap_entities(new[COUNTS].to_numpy(), old[COUNTS].to_numpy(), s.metric,
                                     s.bootstrap_samples, BOOTSTRAP_SEED)
