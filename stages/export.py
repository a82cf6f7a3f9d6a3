"""Stage export: ONNX (fp32) and int8, parity against PyTorch on the test split, MLflow registration.

The registered model is an MLflow pyfunc (tunepipe/serving/pyfunc_model.py, stored as code, not pickled) that
takes raw text and returns the task's served output, with the tokenizer inside.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import datasets

from tunepipe import exporting, tracking
from tunepipe.calibration import calibrator, describe_temperature
from tunepipe.errors import UserError, run_main
from tunepipe.exporting import FP32_FILE, INT8_FILE, choose_served, export_onnx, fuse_for_ort, input_names, parity
from tunepipe.files import atomic_dir, read_json, write_json
from tunepipe.modeling import load_trained
from tunepipe.params import load_params
from tunepipe.paths import CALIBRATION, EXPORT, EXPORT_META, EXPORT_REPORT, METRICS, MODEL, TOKENIZED
from tunepipe.progress import say
from tunepipe.serving import EXPLAIN_CODE, PYFUNC_CODE, SENTENCE_CLASSIFIER_CODE


def main() -> None:
    from tunepipe.serving.pyfunc_model import SERVE_CODE  # here, once the libraries are quieted (see below)

    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    tracking.check_reachable(p.tracking)  # before exporting, not at registration
    info, task, model, tokenizer = load_trained(MODEL)  # the task comes from the model's own metadata
    inputs = input_names(tokenizer)
    tokenized = datasets.load_from_disk(str(TOKENIZED))
    test, validation = tokenized["test"], tokenized["validation"]
    # The served model's metadata, from the trained model's (serving/pyfunc_model.py reads it), with the
    # temperature evaluate fitted on the validation split.
    meta = {"task": info["task"], "labels": info["labels"], "max_length": info["max_length"], "input_names": inputs,
            "temperature": stored_temperature(), "calibrator": task.calibrator, **task.served_metadata(info),
            **{k: info[k] for k in ("long_text", "stride", "window_aggregation") if k in info},
            # Explanations (serving/explain.py) run the fine-tuned PyTorch model, logged with the served one; the
            # fingerprint tells `tunepipe predict --explain` whether models/model is the model exported here.
            "explainable": task.explainable, "explain_steps": p.explain.n_steps,
            "model_fingerprint": info.get("fingerprint"),
            # Request-size limits the served model and `tunepipe predict` enforce (serving/pyfunc_model.py).
            **p.serve.model_dump()}
    cal = calibrator(task.calibrator)
    # Parity covers what is served: tunepipe's calibrated probabilities of the PyTorch logits (what evaluate
    # scored) against the served code's probabilities of the ONNX logits.
    calibrated = (lambda z: cal.probabilities(z, meta["temperature"]), lambda z: served_probabilities(meta, z))

    t0 = time.time()
    with atomic_dir(EXPORT) as tmp:
        export_onnx(model, inputs, tmp / FP32_FILE, p.export.opset)
        fusions = fuse_for_ort(tmp / FP32_FILE)
        candidates = exporting.int8_candidates(tmp / FP32_FILE, tmp)
        pad_id = tokenizer.pad_token_id or 0
        # The served variant is chosen on the validation split, the fastest int8 candidate at the agreement bar;
        # the test split's figures are reported beside it.
        on_validation = parity(task, model, {k: session(f) for k, f in candidates.items()}, validation, inputs, pad_id)
        agreement = {k: on_validation[f"{k}_label_agreement"] for k in candidates}
        served, why = choose_served(agreement, p.export.int8_min_agreement)
        # model.int8.onnx: the served int8 candidate, or where none reached the bar the most faithful one.
        kept = served if served in candidates else max(agreement, key=agreement.get)
        candidates.pop(kept).rename(tmp / INT8_FILE)
        for f in candidates.values():
            f.unlink()
        meta["served_file"] = INT8_FILE if served in agreement else FP32_FILE
        report = parity(task, model, {"fp32": session(tmp / FP32_FILE), "int8": session(tmp / INT8_FILE)}, test,
                        inputs, pad_id, calibrated)
        report.update(parity_tolerance=p.export.parity_tolerance, temperature=meta["temperature"],
                      fp32_recipe=exporting.FP32_RECIPE, fusions=fusions, int8_recipe=exporting.INT8_RECIPE,
                      int8_variant=kept, int8_min_agreement=p.export.int8_min_agreement,
                      validation_int8_label_agreement=agreement, served=meta["served_file"], served_variant=served,
                      served_because=why)
        if report["fp32_max_abs_logit_diff"] > p.export.parity_tolerance:
            raise UserError(f"export: fp32 ONNX logits differ from PyTorch by {report['fp32_max_abs_logit_diff']:.2e}"
                            f" > export.parity_tolerance {p.export.parity_tolerance:g}; nothing was exported")
        if report["fp32_max_abs_prob_diff"] > p.export.parity_tolerance:
            raise UserError(f"export: served calibrated probabilities (fp32 ONNX, T="
                            f"{describe_temperature(meta['temperature'])}) differ from PyTorch's by "
                            f"{report['fp32_max_abs_prob_diff']:.2e} > export.parity_tolerance "
                            f"{p.export.parity_tolerance:g}; nothing was exported")
        tokenizer.save_pretrained(tmp)
        shutil.copy(MODEL / "config.json", tmp / "config.json")
        shutil.copy(task.serve_code, tmp / SERVE_CODE)  # the task's output code travels with the model
        write_json(tmp / EXPORT_META, meta)
        report["export_seconds"] = round(time.time() - t0, 1)
        # The exporter may keep weights in an external-data file beside model.onnx.
        report["fp32_mb"] = round(sum(f.stat().st_size for f in tmp.glob("model.onnx*")) / 2**20, 1)
        report["int8_mb"] = round((tmp / "model.int8.onnx").stat().st_size / 2**20, 1)
        # Registered from the temp dir before it becomes models/onnx: a run killed before the move leaves
        # models/onnx and dvc.lock as they were, so `dvc repro` runs export again, and the fingerprint (the
        # trained model, the export settings and code) makes that run reuse the version it may have registered.
        fingerprint = tracking.content_fingerprint(MODEL, json.dumps(p.export.model_dump(), sort_keys=True),
                                                   Path(exporting.__file__), PYFUNC_CODE, EXPLAIN_CODE,
                                                   SENTENCE_CLASSIFIER_CODE,
                                                   task.serve_code, json.dumps(meta, sort_keys=True))
        report["registered"] = tracking.register(p, info["run_id"], tmp, info, read_json(METRICS), report,
                                                 fingerprint, MODEL if task.explainable else None)
    write_json(EXPORT_REPORT, report)
    reg = report["registered"]
    say(f"export: fp32 max |diff| {report['fp32_max_abs_logit_diff']:.2e} (calibrated probabilities "
        f"{report['fp32_max_abs_prob_diff']:.2e}, T={describe_temperature(meta['temperature'])}), int8 label agreement "
        f"{report['int8_label_agreement']:.4f} on test; serving {report['served']} ({report['served_because']}); "
        f"registered {reg['model_name']} version {reg['version']}")


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def stored_temperature() -> float | list[float]:
    """The temperature evaluate fitted (reports/calibration.json; 1 with calibration.method none)."""
    if not CALIBRATION.is_file():
        raise UserError(f"export: {CALIBRATION} not found (evaluate writes it); run `dvc repro evaluate` first")
    return read_json(CALIBRATION)["temperature"]


def served_probabilities(meta: dict, logits):
    # Imported here, once the libraries are quieted: MLflow warns when the served PythonModel class is defined.
    from tunepipe.serving.pyfunc_model import probabilities  # the served code itself

    return probabilities(meta, logits)


if __name__ == "__main__":
    run_main(main)
