"""Paired significance tests: is the candidate really better than the champion on the same test examples?

Each returns a one-sided p-value for the null hypothesis "the candidate is no better", from the two models'
per-example results on the same test examples. Small p = the gain is unlikely to be test-set noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import binomtest

# Metrics the bootstrap can recompute on a resample: from label ids (classification) or from per-sentence
# entity counts (NER, seqeval's micro averages).
BOOTSTRAP_SEED = 0  # fixed: the same registry state gives the same decision
BOOTSTRAP_METRICS = ("accuracy", "macro_f1", "weighted_f1")
ENTITY_METRICS = ("f1", "precision", "recall")


def metric_on_weights(weights: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, n_labels: int,
                      metric: str) -> np.ndarray:
    """`metric` on each resample at once: row b of `weights` says how often each example was drawn.

    Same definitions as sklearn with labels=range(n_labels), zero_division=0 (evaluate's metrics.json):
    a class absent from both gold and predictions counts as F1 0 in the macro average.
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"bootstrap supports {', '.join(BOOTSTRAP_METRICS)}, not {metric!r}")
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum(axis=1)
    if metric == "accuracy":
        return weights @ (y_true == y_pred).astype(np.float64) / total
    classes = np.arange(n_labels)
    gold = (y_true[:, None] == classes).astype(np.float64)  # n x C one-hot
    pred = (y_pred[:, None] == classes).astype(np.float64)
    tp, support, predicted = weights @ (gold * pred), weights @ gold, weights @ pred
    denom = support + predicted  # 2TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    if metric == "macro_f1":
        return f1.mean(axis=1)
    return (f1 * support).sum(axis=1) / total


def entity_metric_on_weights(weights: np.ndarray, correct: np.ndarray, gold: np.ndarray, pred: np.ndarray,
                             metric: str) -> np.ndarray:
    """Entity-level micro precision/recall/F1 (seqeval's) on each resample of sentences, from per-sentence counts."""
    if metric not in ENTITY_METRICS:
        raise ValueError(f"entity bootstrap supports {', '.join(ENTITY_METRICS)}, not {metric!r}")
    weights = np.asarray(weights, dtype=np.float64)
    tp, n_gold, n_pred = weights @ correct, weights @ gold, weights @ pred
    num, den = {"f1": (2 * tp, n_gold + n_pred), "precision": (tp, n_pred), "recall": (tp, n_gold)}[metric]
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def paired_bootstrap(score_new: Callable[[np.ndarray], np.ndarray], score_old: Callable[[np.ndarray], np.ndarray],
                     n: int, samples: int = 1000, seed: int = 0, chunk: int = 100) -> float:
    """One-sided paired bootstrap p-value: the share of resamples where the candidate is not ahead.

    Resamples the n test examples with replacement (the same draw for both models: paired); `score_*` turn a
    (draws x n) matrix of how often each example was drawn into the metric per draw. Counts draws with
    metric(new) - metric(old) <= 0; (count + 1) / (samples + 1) never reports 0.
    """
    if n == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    not_ahead = 0
    for start in range(0, samples, chunk):  # bounded memory: chunk x n draw counts at a time
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, samples - start))
        not_ahead += int((score_new(weights) - score_old(weights) <= 0).sum())
    return (not_ahead + 1) / (samples + 1)


def paired_bootstrap_labels(y_true, pred_new, pred_old, n_labels: int, metric: str, samples: int = 1000,
                            seed: int = 0) -> float:
    """paired_bootstrap on per-example label ids, for accuracy, macro_f1 or weighted_f1."""
    y_true, pred_new, pred_old = (np.asarray(a) for a in (y_true, pred_new, pred_old))
    return paired_bootstrap(lambda w: metric_on_weights(w, y_true, pred_new, n_labels, metric),
                            lambda w: metric_on_weights(w, y_true, pred_old, n_labels, metric),
                            len(y_true), samples, seed)


def paired_bootstrap_entities(new: np.ndarray, old: np.ndarray, metric: str, samples: int = 1000,
                              seed: int = 0) -> float:
    """paired_bootstrap on per-sentence (correct, gold, predicted) entity counts (n x 3 arrays), for NER."""
    new, old = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    return paired_bootstrap(lambda w: entity_metric_on_weights(w, *new.T, metric),
                            lambda w: entity_metric_on_weights(w, *old.T, metric), len(new), samples, seed)


def mcnemar(y_true, pred_new, pred_old) -> float:
    """One-sided exact McNemar p-value on the discordant pairs (a test of accuracy, whatever the metric).

    Among examples exactly one model gets right, the candidate should win more than half; under the null
    each such example is a fair coin, so the count is Binomial(discordant, 0.5).
    """
    y_true, pred_new, pred_old = (np.asarray(a) for a in (y_true, pred_new, pred_old))
    new_right, old_right = pred_new == y_true, pred_old == y_true
    wins, losses = int((new_right & ~old_right).sum()), int((~new_right & old_right).sum())
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)
