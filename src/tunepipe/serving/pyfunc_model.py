"""The served model: raw text in, label and class probabilities out (for NER, entity spans; for multi-label, the
labels above their thresholds with their probabilities), through onnxruntime.

Self-contained on purpose (no tunepipe imports): MLflow stores this file with the model ("models from code",
no pickle), and `tunepipe predict` uses the same TextPredictor on a local export directory.

With params {"explain": true} (optionally {"explain_label": "..."}) each output row also gets the word
attributions of explain.py (stored beside this file), computed from the fine-tuned PyTorch model (the
`torch_model_dir` artifact, loaded on the first such request); only this option needs torch and captum.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

MODEL_FILE = "model.onnx"
# NER words cut the way CoNLL data is: abbreviations (U.S.), numbers and hyphenated or dotted words (1,000,
# 1996-08-22, York-based, O'Neill) stay whole; clitics ('s) and other punctuation stand alone. The model learned
# its tags on the first sub-token of such words.
WORD = re.compile(r"(?:[^\W\d_]\.){2,}|\w+(?:[-.,/&]\w+|'(?!(?:s|re|ve|ll|d|m|t)\b)\w+)*"
                  r"|'(?:s|re|ve|ll|d|m|t)\b|\S", re.IGNORECASE)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character spans."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def tag_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Word tags (IOB2 or BIOES) -> (type, first word, end word), read leniently as conlleval does: an I-X/E-X
    that does not continue an X entity opens one, so a missed B- does not lose the entity."""
    spans: list[tuple[str, int, int]] = []
    cur: tuple[str, int] | None = None
    for i, tag in enumerate(tags):
        prefix, _, kind = tag.partition("-")
        if cur and (prefix not in ("I", "E") or kind != cur[0]):
            spans.append((cur[0], cur[1], i))
            cur = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and cur is None):
            cur = (kind, i)
        if prefix in ("E", "S") and cur:
            spans.append((cur[0], cur[1], i + 1))
            cur = None
    if cur:
        spans.append((cur[0], cur[1], len(tags)))
    return spans


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def probabilities(meta: dict, logits: np.ndarray) -> np.ndarray:
    """The served probabilities of logits / temperature, the temperature the evaluate stage fitted on the
    validation split (one number, or one per label): a softmax over the labels, or for a multi-label model
    (calibrator "sigmoid") a sigmoid per label. An export without one (made before calibration, or with
    calibration.method none) has T = 1, the plain softmax/sigmoid."""
    z = np.asarray(logits, dtype=np.float64) / np.asarray(meta.get("temperature", 1.0), dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-z)) if meta.get("calibrator") == "sigmoid" else softmax(z)


def calibrated_thresholds(meta: dict, labels: list[str]) -> np.ndarray:
    """Multi-label thresholds were tuned on uncalibrated sigmoids: sigmoid(z) >= t exactly when
    sigmoid(z / T) >= sigmoid(logit(t) / T), so the served decision stays the one evaluate scored."""
    t = np.clip(np.array([float(meta.get("thresholds", {}).get(lab, 0.5)) for lab in labels]), 1e-12, 1 - 1e-12)
    temperature = np.asarray(meta.get("temperature", 1.0), dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-np.log(t / (1 - t)) / temperature))


def aggregate_windows(logits: np.ndarray, text_ids: np.ndarray, how: str) -> np.ndarray:
    """One row per text from its windows' logits (rows in text order): their mean, or per-class max. The same
    as tasks/classification/metrics.py's aggregate_windows, which evaluate uses."""
    texts, inverse = np.unique(np.asarray(text_ids), return_inverse=True)
    if how == "max":
        out = np.full((len(texts), logits.shape[-1]), -np.inf, dtype=logits.dtype)
        np.maximum.at(out, inverse, logits)
        return out
    out = np.zeros((len(texts), logits.shape[-1]), dtype=np.float64)
    np.add.at(out, inverse, logits)
    return (out / np.bincount(inverse)[:, None]).astype(logits.dtype)


class TextPredictor:
    def __init__(self, model_dir: str | Path, onnx_file: str = MODEL_FILE):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        self.meta = json.loads((model_dir / "tunepipe.json").read_text(encoding="utf-8"))
        self.labels: list[str] = self.meta["labels"]
        self.task: str = self.meta.get("task", "classification")
        self.max_length: int = self.meta["max_length"]
        # tokenize.long_text: window: a long text runs as overlapping windows whose logits are aggregated (as
        # evaluate does); truncate (or an export made before windows existed): its first max_length tokens.
        self.stride: int | None = self.meta.get("stride") if self.meta.get("long_text") == "window" else None
        self.aggregation: str = self.meta.get("window_aggregation", "mean")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.session = ort.InferenceSession(str(model_dir / onnx_file), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        windows = {} if self.stride is None else {"return_overflowing_tokens": True, "stride": self.stride}
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="np", **windows)
            logits = self.session.run(None, {k: enc[k].astype(np.int64) for k in self.input_names})[0]
            if windows:
                logits = aggregate_windows(logits, enc["overflow_to_sample_mapping"], self.aggregation)
            out.append(logits)
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def word_probs(self, words: list[list[str]]) -> list[list[np.ndarray | None]]:
        """Tag probabilities of each word from its first sub-token; a long text runs as several windows."""
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length,
                             padding=True, return_overflowing_tokens=True, stride=0, return_tensors="np")
        probs = probabilities(self.meta, self.session.run(None, {k: enc[k].astype(np.int64)
                                                                 for k in self.input_names})[0])
        out: list[list[np.ndarray | None]] = [[None] * len(w) for w in words]
        for row, sample in enumerate(enc["overflow_to_sample_mapping"]):
            for pos, w in enumerate(enc.word_ids(row)):
                if w is not None and out[sample][w] is None:
                    out[sample][w] = probs[row, pos]
        return out

    def entities(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        """Per text: entity spans with character offsets; a span's score is the mean of its words' tag scores."""
        results = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            words = [split_words(t) for t in chunk]
            probs = self.word_probs([[w for w, _, _ in ws] for ws in words])
            for text, ws, ps in zip(chunk, words, probs, strict=True):
                tags = ["O" if p is None else self.labels[int(p.argmax())] for p in ps]
                scores = [0.0 if p is None else float(p.max()) for p in ps]
                results.append({"entities": [
                    {"text": text[ws[a][1]:ws[b - 1][2]], "type": kind, "start": ws[a][1], "end": ws[b - 1][2],
                     "score": round(sum(scores[a:b]) / (b - a), 6)}
                    for kind, a, b in tag_spans(tags)]})
        return results

    def label_sets(self, texts: list[str]) -> list[dict]:
        """Multi-label: the labels whose sigmoid probability reaches their threshold (tuned per label on
        validation, stored in tunepipe.json), most probable first, and every label's probability."""
        probs = probabilities(self.meta, self.logits(texts))
        th = calibrated_thresholds(self.meta, self.labels)
        return [{"labels": [{"label": self.labels[j], "probability": float(row[j])}
                            for j in np.argsort(-row, kind="stable") if row[j] >= th[j]],
                 "probabilities": {lab: float(x) for lab, x in zip(self.labels, row, strict=True)}}
                for row in probs]

    def predict(self, texts: list[str]) -> list[dict]:
        if self.task == "ner":
            return self.entities(texts)
        if self.task == "multilabel":
            return self.label_sets(texts)
        probs = probabilities(self.meta, self.logits(texts))
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


def explain_module():
    """explain.py: tunepipe's own copy where this file is imported as tunepipe.serving.pyfunc_model (tunepipe
    predict), else the one logged beside it (MLflow puts the model's code directory on sys.path)."""
    if __package__:
        return importlib.import_module(".explain", __package__)
    return importlib.import_module("explain")


def load_explainer(meta: dict, torch_model_dir: str | Path | None):
    """The explainer of an export (its tunepipe.json) and its fine-tuned PyTorch model directory. ValueError with
    what to do where the model cannot explain."""
    if "explainable" not in meta:
        raise ValueError("explain: this model was exported before explanations existed; export it again "
                         "(dvc repro export)")
    if not meta["explainable"]:
        raise ValueError(f"explain: not available for {meta.get('task')} models")
    if torch_model_dir is None:
        raise ValueError("explain: this model was registered without its PyTorch model (the torch_model_dir "
                         "artifact); export it again (dvc repro export)")
    try:
        importlib.import_module("torch")
        importlib.import_module("captum")
    except ImportError as exc:
        raise ValueError(f"explain: needs torch and captum where the model runs ({exc}); pip install torch "
                         "captum") from None
    return explain_module().Explainer(torch_model_dir, n_steps=meta.get("explain_steps", 32),
                                      max_length=meta["max_length"])


def with_explanations(rows: list[dict], texts: list[str], explainer, label: str | None = None) -> list[dict]:
    """Each result row plus explained_label, attributions ([{word, weight, start, end}]) and convergence_delta."""
    return [{**row, **exp} for row, exp in zip(rows, explainer.explain(texts, label or None), strict=True)]


# Request params the served model takes (declared in its signature, so `mlflow models serve` accepts them).
PARAMS = {"explain": False, "explain_label": ""}


class TunepipeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = TextPredictor(context.artifacts["model_dir"])
        self.torch_model_dir = context.artifacts.get("torch_model_dir")
        self.explainer = None

    def predict(self, context, model_input, params=None):
        texts = as_texts(model_input)
        rows = self.predictor.predict(texts)
        params = {**PARAMS, **(params or {})}
        if params["explain"]:
            if self.explainer is None:  # loaded on the first request that asks for it
                self.explainer = load_explainer(self.predictor.meta, self.torch_model_dir)
            rows = with_explanations(rows, texts, self.explainer, params["explain_label"])
        return pd.DataFrame(rows)


mlflow.models.set_model(TunepipeModel())
