"""Calibrated probabilities: temperature scaling fitted on the validation split (Guo et al. 2017), and how well
probabilities are calibrated: expected calibration error (ECE) and the Brier score, with reliability bins.

A task names its calibrator (Task.calibrator): "softmax" (one temperature T over the label softmax: one label per
text, or per token for NER) or "sigmoid" (one temperature per label over independent sigmoids: multi-label).
Served probabilities are the calibrator's `probabilities(logits, T)`; the export stores T with the model.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins of the reported ECE and the reliability diagram
LOG_T_BOUND = 5.0  # |log T| <= 5: T in [0.0067, 148]; a validation split the model gets all right would push T to 0


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over equal-width bins (lo, hi] of (bin size / n) * |accuracy - mean confidence| in the bin."""
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(confidence, correct, bins) if r["count"]) / max(len(confidence), 1))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per bin (lo, hi] of confidence (0 falls in the first): count, mean confidence and accuracy (None if empty)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        rows.append({"bin": b, "lower": b / bins, "upper": (b + 1) / bins, "count": n,
                     "confidence": float(confidence[sel].mean()) if n else None,
                     "accuracy": float(correct[sel].mean()) if n else None})
    return rows


def _fit_log_temperature(nll, n_params: int) -> np.ndarray:
    """LBFGS on log T (T stays positive), from T = 1; `nll(log_t)` is the mean negative log-likelihood."""
    import torch

    log_t = torch.zeros(n_params, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(log_t.clamp(-LOG_T_BOUND, LOG_T_BOUND))
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().clamp(-LOG_T_BOUND, LOG_T_BOUND).numpy()


class SoftmaxTemperature:
    """One temperature for every label: p = softmax(logits / T). Gold: one label id per row."""

    name = "softmax"

    def identity(self, n_labels: int) -> float:
        """The temperature that changes nothing."""
        return 1.0

    def probabilities(self, logits: np.ndarray, temperature) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64) / np.asarray(temperature, dtype=np.float64))

    def nll(self, logits: np.ndarray, gold: np.ndarray, temperature=1.0) -> float:
        p = self.probabilities(logits, temperature)[np.arange(len(gold)), gold]
        return float(-np.log(np.clip(p, 1e-300, None)).mean())

    def fit(self, logits: np.ndarray, gold: np.ndarray) -> float:
        import torch

        z, y = torch.from_numpy(np.asarray(logits, dtype=np.float64)), torch.from_numpy(np.asarray(gold))
        log_t = _fit_log_temperature(lambda lt: torch.nn.functional.cross_entropy(z / lt.exp(), y), 1)
        t = float(np.exp(log_t[0]))
        # LBFGS from T = 1 does not end worse than T = 1 on a smooth convex objective; guard against a bad line
        # search all the same, so calibration never makes the validation NLL worse.
        return t if self.nll(logits, gold, t) <= self.nll(logits, gold, 1.0) else 1.0

    def confidence(self, probs: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-class confidence and whether the top class is the gold one."""
        return probs.max(-1), probs.argmax(-1) == gold

    def brier(self, probs: np.ndarray, gold: np.ndarray) -> float:
        """Mean over rows of the sum over labels of (p - one-hot)^2: sklearn's multiclass Brier score, unhalved for
        two labels too (sklearn halves the binary case by default), so it reads the same for any label count."""
        from sklearn.metrics import brier_score_loss

        return float(brier_score_loss(gold, probs, labels=list(range(probs.shape[-1])), scale_by_half=False))


class SigmoidTemperature:
    """One temperature per label: p_k = sigmoid(logit_k / T_k). Gold: a 0/1 row per example (multi-hot)."""

    name = "sigmoid"

    def identity(self, n_labels: int) -> list[float]:
        return [1.0] * n_labels

    def probabilities(self, logits: np.ndarray, temperature) -> np.ndarray:
        return sigmoid(np.asarray(logits, dtype=np.float64) / np.asarray(temperature, dtype=np.float64))

    def nll(self, logits: np.ndarray, gold: np.ndarray, temperature=1.0) -> float:
        p = np.clip(self.probabilities(logits, temperature), 1e-12, 1 - 1e-12)
        return float(-(gold * np.log(p) + (1 - gold) * np.log(1 - p)).mean())

    def fit(self, logits: np.ndarray, gold: np.ndarray) -> list[float]:
        import torch

        z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
        y = torch.from_numpy(np.asarray(gold, dtype=np.float64))
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        t = np.exp(_fit_log_temperature(lambda lt: bce(z / lt.exp(), y), z.shape[-1]))
        # Labels are independent: per label, keep T = 1 where the fit did not lower that label's NLL.
        for k in range(len(t)):
            if self.nll(logits[:, k], gold[:, k], t[k]) > self.nll(logits[:, k], gold[:, k], 1.0):
                t[k] = 1.0
        return [float(x) for x in t]

    def confidence(self, probs: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (example, label) decision: confidence in the predicted side and whether it is right."""
        return np.maximum(probs, 1 - probs).ravel(), ((probs >= 0.5) == (gold > 0.5)).ravel()

    def brier(self, probs: np.ndarray, gold: np.ndarray) -> float:
        """Mean over (example, label) of (p - y)^2."""
        from sklearn.metrics import brier_score_loss

        return float(brier_score_loss(np.asarray(gold).ravel(), probs.ravel(), labels=[0, 1]))


def describe_temperature(t: float | list[float]) -> str:
    return f"{t:.4g}" if isinstance(t, int | float) else "[" + ", ".join(f"{x:.4g}" for x in t) + "]"


CALIBRATORS = {c.name: c for c in (SoftmaxTemperature(), SigmoidTemperature())}


def calibrator(name: str) -> SoftmaxTemperature | SigmoidTemperature:
    return CALIBRATORS[name]


def scores(cal, probs: np.ndarray, gold: np.ndarray, bins: int = ECE_BINS) -> dict:
    conf, correct = cal.confidence(probs, gold)
    return {"ece": expected_calibration_error(conf, correct, bins), "brier": cal.brier(probs, gold),
            "reliability": reliability(conf, correct, bins)}


def calibrate(cal, method: str, validation: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
              ) -> tuple[dict, dict, list[dict]]:
    """Fit T on the validation (logits, gold) (method none: T = 1) and score the test split before and after.

    Returns (flat test metrics for metrics.json, the calibration record export reads, reliability rows)."""
    v_logits, v_gold = validation
    t_logits, t_gold = test
    temperature = cal.fit(v_logits, v_gold) if method == "temperature" and len(v_gold) \
        else cal.identity(t_logits.shape[-1])
    before = scores(cal, cal.probabilities(t_logits, 1.0), t_gold)
    after = scores(cal, cal.probabilities(t_logits, temperature), t_gold)
    metrics = {"ece": after["ece"], "ece_uncalibrated": before["ece"],
               "brier": after["brier"], "brier_uncalibrated": before["brier"]}
    record = {"method": method, "calibrator": cal.name, "temperature": temperature,
              "fitted_on": "validation", "n_fit": int(len(v_gold)),
              "validation_nll_uncalibrated": cal.nll(v_logits, v_gold, 1.0) if len(v_gold) else None,
              "validation_nll": cal.nll(v_logits, v_gold, temperature) if len(v_gold) else None,
              "ece_bins": ECE_BINS}
    rows = [{"bin": b["bin"], "lower": b["lower"], "upper": b["upper"], "midpoint": (b["lower"] + b["upper"]) / 2,
             "accuracy_uncalibrated": b["accuracy"], "confidence_uncalibrated": b["confidence"],
             "count_uncalibrated": b["count"],
             "accuracy": a["accuracy"], "confidence": a["confidence"], "count": a["count"]}
            for b, a in zip(before["reliability"], after["reliability"], strict=True)]
    return metrics, record, rows
