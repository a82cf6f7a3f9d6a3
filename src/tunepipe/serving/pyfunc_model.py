"""The served model: raw text in, label and class probabilities out (for NER, entity spans; for multi-label, the
labels above their thresholds with their probabilities), through onnxruntime. The task's own code turns logits
into that output: its tasks/<task>/serve.py, which export copies into the exported model directory.

Self-contained on purpose (no tunepipe imports): MLflow stores this file with the model ("models from code",
no pickle), and `tunepipe predict` uses the same TextPredictor on a local export directory.

With params {"explain": true} (optionally {"explain_label": "..."}) each output row also gets the word
attributions of explain.py (stored beside this file), computed from the fine-tuned PyTorch model (the
`torch_model_dir` artifact, loaded on the first such request); only this option needs torch and captum.

Request-size limits (params serve.max_texts_per_request, serve.max_text_chars, stored in tunepipe.json at export):
a request over them is refused before any tokenizing, as an MlflowException with INVALID_PARAMETER_VALUE, which
MLflow's scoring server answers with HTTP 400 and the message.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MODEL_FILE = "model.onnx"
SERVE_CODE = "serve.py"  # the task's output code (tasks/<task>/serve.py), copied into the export


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
    def __init__(self, model_dir: str | Path, onnx_file: str | None = None):
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
        # The variant export chose (served_file: int8 where it agreed with PyTorch enough, else fp32); an export
        # made before the choice existed serves model.onnx.
        self.served_file: str = onnx_file or self.meta.get("served_file", MODEL_FILE)
        self.session = ort.InferenceSession(str(model_dir / self.served_file), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output = output_module(model_dir, self.task)  # how logits become this task's served output

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        windows = {} if self.stride is None else {"return_overflowing_tokens": True, "stride": self.stride}
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="np", **windows)
            logits = self.run(enc)
            if windows:
                logits = aggregate_windows(logits, enc["overflow_to_sample_mapping"], self.aggregation)
            out.append(logits)
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def run(self, enc, rows: int = 64) -> np.ndarray:
        """The ONNX model's logits of one tokenized batch (numpy), `rows` sequences at a time: a batch of long
        texts cut into windows holds many more sequences than texts, and memory grows with the sequences."""
        n = len(enc["input_ids"])
        return np.concatenate([self.session.run(None, {k: enc[k][i:i + rows].astype(np.int64)
                                                       for k in self.input_names})[0]
                               for i in range(0, max(n, 1), rows)])

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return probabilities(self.meta, logits)

    def predict(self, texts: list[str]) -> list[dict]:
        return self.output.predict(self, texts)

    def check_request(self, texts: list[str]) -> None:
        check_request(self.meta, texts)


class RequestTooLarge(ValueError):
    """A request over the model's request-size limits (the served model answers it with HTTP 400)."""


def check_request(meta: dict, texts: list[str]) -> None:
    """RequestTooLarge where `texts` exceed the limits export stored in tunepipe.json (an export made before the
    limits existed has none)."""
    most = meta.get("max_texts_per_request")
    if most is not None and len(texts) > most:
        raise RequestTooLarge(f"{len(texts):,} texts in one request; this model takes at most {most:,} "
                              "(serve.max_texts_per_request): send them in smaller batches")
    longest = meta.get("max_text_chars")
    if longest is not None:
        for i, text in enumerate(texts):
            if len(text) > longest:
                raise RequestTooLarge(f"text {i + 1} of {len(texts)} has {len(text):,} characters; this model takes "
                                      f"at most {longest:,} per text (serve.max_text_chars): shorten or split it")


def output_module(model_dir: Path, task: str):
    """The export's serve.py (its task's tasks/<task>/serve.py as exported), loaded from its file: every model
    keeps the output code it was exported with, and models of several tasks can be loaded in one process."""
    import importlib.util

    path = model_dir / SERVE_CODE
    if not path.is_file():
        raise ValueError(f"{model_dir}: no {SERVE_CODE} (exported by an older tunepipe); export it again "
                         "(dvc repro export)")
    spec = importlib.util.spec_from_file_location(f"tunepipe_served_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


class RequestRefused(mlflow.exceptions.MlflowException):
    """A request over the limits, as MLflow's scoring server answers it: HTTP 400 (INVALID_PARAMETER_VALUE) with
    this message. The server would prefix "Failed to predict data '<the request>'" to it, echoing a refused 10 MB
    text back whole: the message stays as raised."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


# Request params the served model takes (declared in its signature, so `mlflow models serve` accepts them).
PARAMS = {"explain": False, "explain_label": ""}


class TunepipeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = TextPredictor(context.artifacts["model_dir"])
        self.torch_model_dir = context.artifacts.get("torch_model_dir")
        self.explainer = None

    def predict(self, context, model_input, params=None):
        texts = as_texts(model_input)
        try:
            self.predictor.check_request(texts)
        except RequestTooLarge as exc:  # the scoring server answers this with 400 and the message
            raise RequestRefused(str(exc)) from None
        rows = self.predictor.predict(texts)
        params = {**PARAMS, **(params or {})}
        if params["explain"]:
            if self.explainer is None:  # loaded on the first request that asks for it
                self.explainer = load_explainer(self.predictor.meta, self.torch_model_dir)
            rows = with_explanations(rows, texts, self.explainer, params["explain_label"])
        return pd.DataFrame(rows)


mlflow.models.set_model(TunepipeModel())
