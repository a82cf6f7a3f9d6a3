"""The served model: raw text in, label and class probabilities out, through onnxruntime.

Self-contained on purpose (no tunepipe imports): MLflow stores this file with the model ("models from code",
no pickle), and `tunepipe predict` uses the same TextPredictor on a local export directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

MODEL_FILE = "model.onnx"


class TextPredictor:
    def __init__(self, model_dir: str | Path, onnx_file: str = MODEL_FILE):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        self.meta = json.loads((model_dir / "tunepipe.json").read_text(encoding="utf-8"))
        self.labels: list[str] = self.meta["labels"]
        self.task: str = self.meta.get("task", "classification")
        self.max_length: int = self.meta["max_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.session = ort.InferenceSession(str(model_dir / onnx_file), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="np")
            out.append(self.session.run(None, {k: enc[k].astype(np.int64) for k in self.input_names})[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, texts: list[str]) -> list[dict]:
        logits = self.logits(texts)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return [{"label": self.labels[int(row.argmax())], "score": float(row.max()),
                 "probabilities": {lab: float(x) for lab, x in zip(self.labels, row, strict=True)}}
                for row in probs]


def as_texts(model_input) -> list[str]:
    """A DataFrame with a `text` column (or a single column), a list/Series of strings, or one string."""
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            col = model_input["text"]
        elif model_input.shape[1] == 1:
            col = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a 'text' column, got columns {list(model_input.columns)}")
        return [str(t) for t in col]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict) and "text" in model_input:
        return as_texts(model_input["text"])
    return [str(t) for t in model_input]


class TunepipeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = TextPredictor(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        return pd.DataFrame(self.predictor.predict(as_texts(model_input)))


mlflow.models.set_model(TunepipeModel())
