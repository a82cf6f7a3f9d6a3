"""Served output of a multi-label model: the labels whose probability reaches their threshold (tuned per label on
validation, stored in tunepipe.json), most probable first, and every label's probability.

Self-contained (numpy only): export copies this file into the exported model directory as serve.py, and the
served model (serving/pyfunc_model.py's TextPredictor) runs it from there."""

from __future__ import annotations

import numpy as np


def calibrated_thresholds(meta: dict, labels: list[str]) -> np.ndarray:
    """Multi-label thresholds were tuned on uncalibrated sigmoids: sigmoid(z) >= t exactly when
    sigmoid(z / T) >= sigmoid(logit(t) / T), so the served decision stays the one evaluate scored."""
    t = np.clip(np.array([float(meta.get("thresholds", {}).get(lab, 0.5)) for lab in labels]), 1e-12, 1 - 1e-12)
    temperature = np.asarray(meta.get("temperature", 1.0), dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-np.log(t / (1 - t)) / temperature))


def predict(predictor, texts: list[str]) -> list[dict]:
    labels = predictor.labels
    probs = predictor.probabilities(predictor.logits(texts))
    th = calibrated_thresholds(predictor.meta, labels)
    return [{"labels": [{"label": labels[j], "probability": float(row[j])}
                        for j in np.argsort(-row, kind="stable") if row[j] >= th[j]],
             "probabilities": {lab: float(x) for lab, x in zip(labels, row, strict=True)}}
            for row in probs]
