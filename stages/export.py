"""Stage export: ONNX (fp32) and dynamic int8, parity against PyTorch on the test split, MLflow registration.

The registered model is an MLflow pyfunc (tunepipe/serving/pyfunc_model.py, stored as code, not pickled) that takes
raw text and returns label and probabilities, with the tokenizer inside.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import datasets
import mlflow
import numpy as np
import torch

from tunepipe import tracking
from tunepipe.errors import UserError, run_main
from tunepipe.files import atomic_dir, read_json, write_json
from tunepipe.params import load_params
from tunepipe.paths import EXPORT, EXPORT_META, EXPORT_REPORT, METRICS, MODEL, TOKENIZED, TRAINING_INFO
from tunepipe.progress import Progress, say
from tunepipe.serving import PYFUNC_CODE


class _LogitsOnly(torch.nn.Module):
    """ONNX wants tensors out, not a ModelOutput."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def export_onnx(model, input_names: list[str], path: Path, opset: int) -> None:
    example = {k: torch.ones((2, 8), dtype=torch.long) for k in input_names}
    if "token_type_ids" in example:
        example["token_type_ids"] = torch.zeros((2, 8), dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(_LogitsOnly(model).eval(), (), str(path), kwargs=example, input_names=input_names,
                      output_names=["logits"], dynamic_shapes={k: {0: batch, 1: seq} for k in input_names},
                      opset_version=max(opset, 18), dynamo=True, verbose=False)


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def batches(ds: datasets.Dataset, input_names: list[str], pad_id: int, size: int = 64):
    """Padded numpy batches from a tokenized split (same padding the served model sees)."""
    for i in range(0, len(ds), size):
        rows = ds[i:i + size]
        width = max(len(x) for x in rows["input_ids"])
        out = {}
        for k in input_names:
            pad = pad_id if k == "input_ids" else 0
            out[k] = np.array([x + [pad] * (width - len(x)) for x in rows[k]], dtype=np.int64)
        yield out


def parity(model, sessions: dict, ds: datasets.Dataset, input_names: list[str], pad_id: int) -> dict:
    """Max |logit difference| fp32 ONNX vs PyTorch, and label agreement of each ONNX model with PyTorch."""
    if "length" in ds.column_names:
        ds = ds.sort("length")  # batches of alike lengths: little padding, same results
    max_diff, agree, n = 0.0, {k: 0 for k in sessions}, 0
    correct = {k: 0 for k in ["torch", *sessions]}
    # One label per text only: NER's per-token labels are ragged lists, scored by evaluate instead.
    labels = np.asarray(ds["labels"]) if isinstance(ds.features.get("labels"), datasets.Value) else None
    with torch.no_grad(), Progress("parity", len(ds), "texts") as bar:
        for b in batches(ds, input_names, pad_id):
            ref = model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits.numpy()
            mask = b["attention_mask"].astype(bool) if ref.ndim == 3 else slice(None)  # tokens: skip padding
            ref_lab = ref.argmax(-1)[mask]
            if labels is not None and ref.ndim == 2:
                gold = labels[n:n + len(ref)]
                correct["torch"] += int((ref.argmax(-1) == gold).sum())
            for name, sess in sessions.items():
                out = sess.run(None, b)[0]
                if name == "fp32":
                    max_diff = max(max_diff, float(np.abs(out - ref)[mask].max()))
                agree[name] += int((out.argmax(-1)[mask] == ref_lab).sum())
                if labels is not None and ref.ndim == 2:
                    correct[name] += int((out.argmax(-1) == labels[n:n + len(ref)]).sum())
            n += len(ref) if ref.ndim == 2 else 0
            bar.update(len(ref))
            agree.setdefault("_total", 0)
            agree["_total"] += int(np.size(ref_lab))
    total = max(agree.pop("_total"), 1)
    out = {"fp32_max_abs_logit_diff": max_diff,
           **{f"{k}_label_agreement": v / total for k, v in agree.items()},
           "n_compared": total}
    if labels is not None and n:
        out.update({f"{k}_accuracy": v / n for k, v in correct.items()})
    return out


def register(p, run_id: str, onnx_dir: Path, info: dict, metrics: dict, parity_report: dict) -> dict:
    tracking.setup(p.tracking)
    example = ["what a great flight", "the service was awful"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: float(v) for k, v in parity_report.items() if isinstance(v, int | float)})
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"model_dir": str(onnx_dir)},
            input_example=example, registered_model_name=p.tracking.model_name,
            pip_requirements=["onnxruntime", "transformers", "pandas", "numpy", "mlflow"])
    client = mlflow.MlflowClient()
    version = logged.registered_model_version
    headline = "f1" if info["task"] == "ner" else "macro_f1"
    tags = {
        "git_commit": tracking.git_commit() or "unknown",
        "data_hash": info["data_hash"],
        "test_data_hash": info["test_data_hash"],
        "run_id": run_id,
        "task": info["task"],
        "params": json.dumps(p.model_dump(exclude={"sweep", "promote"}), sort_keys=True),
        "metrics": json.dumps({k: v for k, v in metrics.items() if isinstance(v, int | float)}, sort_keys=True),
        "headline_metric": headline,
    }
    for k, v in metrics.items():
        if isinstance(v, int | float):
            tags[f"metric.{k}"] = repr(float(v))
    for k, v in tags.items():
        client.set_model_version_tag(p.tracking.model_name, str(version), k, v)
    return {"model_name": p.tracking.model_name, "version": int(version), "model_uri": logged.model_uri}


def main() -> None:
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    info = read_json(MODEL / TRAINING_INFO)
    metrics = read_json(METRICS)
    auto = AutoModelForTokenClassification if info["task"] == "ner" else AutoModelForSequenceClassification
    model = auto.from_pretrained(MODEL, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    input_names = [k for k in tokenizer.model_input_names if k in ("input_ids", "attention_mask", "token_type_ids")]
    test = datasets.load_from_disk(str(TOKENIZED))["test"]

    import onnxruntime as ort

    t0 = time.time()
    with atomic_dir(EXPORT) as tmp:
        export_onnx(model, input_names, tmp / "model.onnx", p.export.opset)
        quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx")
        sessions = {name: ort.InferenceSession(str(tmp / f), providers=["CPUExecutionProvider"])
                    for name, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))}
        report = parity(model, sessions, test, input_names, tokenizer.pad_token_id or 0)
        report["parity_tolerance"] = p.export.parity_tolerance
        if report["fp32_max_abs_logit_diff"] > p.export.parity_tolerance:
            raise UserError(f"export: fp32 ONNX logits differ from PyTorch by {report['fp32_max_abs_logit_diff']:.2e}"
                            f" > export.parity_tolerance {p.export.parity_tolerance:g}; nothing was exported")
        tokenizer.save_pretrained(tmp)
        shutil.copy(MODEL / "config.json", tmp / "config.json")
        write_json(tmp / EXPORT_META, {"task": info["task"], "labels": info["labels"],
                                           "max_length": info["max_length"], "input_names": input_names})
    report["export_seconds"] = round(time.time() - t0, 1)
    # The exporter may keep weights in an external-data file beside model.onnx.
    report["fp32_mb"] = round(sum(f.stat().st_size for f in EXPORT.glob("model.onnx*")) / 2**20, 1)
    report["int8_mb"] = round((EXPORT / "model.int8.onnx").stat().st_size / 2**20, 1)
    report["registered"] = register(p, info["run_id"], EXPORT, info, metrics, report)
    write_json(EXPORT_REPORT, report)
    reg = report["registered"]
    say(f"export: fp32 max |diff| {report['fp32_max_abs_logit_diff']:.2e}, int8 label agreement "
        f"{report['int8_label_agreement']:.4f}; registered {reg['model_name']} version {reg['version']}")


if __name__ == "__main__":
    run_main(main)
