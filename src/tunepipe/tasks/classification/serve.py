"""Served output of a classification model: the most probable label, its probability and every label's.

Self-contained (numpy only): export copies this file into the exported model directory as serve.py, and the
served model (serving/pyfunc_model.py's TextPredictor) runs it from there, so a registered version keeps the output
code it was exported with."""

from __future__ import annotations


def predict(predictor, texts: list[str]) -> list[dict]:
    probs = predictor.probabilities(predictor.logits(texts))
    return [{"label": predictor.labels[int(row.argmax())], "score": float(row.max()),
             "probabilities": {lab: float(x) for lab, x in zip(predictor.labels, row, strict=True)}}
            for row in probs]
