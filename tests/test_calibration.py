"""Calibrated probabilities (issue 12): temperature scaling fitted on the validation split, ECE and Brier score
before and after, a reliability diagram, the temperature stored with the export and applied when serving, and the
ONNX parity check on the calibrated probabilities."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml

from tests.helpers import clone_repo, commit_all, sh, synthetic_rows, tiny_params, write_csv, write_tiny_dir
from tests.test_ner import ner_project  # noqa: F401 (a fixture)
from tunepipe.calibration import (
    SigmoidTemperature,
    SoftmaxTemperature,
    calibrate,
    expected_calibration_error,
    reliability,
    softmax,
)
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.tasks import get_task

# ---- the fit and the scores -----------------------------------------------------------------------------------


def overconfident(n: int, n_labels: int, scale, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (a calibrated model), logits reported as z * scale (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, n_labels))
    p = softmax(z)
    gold = np.array([rng.choice(n_labels, p=row) for row in p])
    return z * scale, gold, z


def test_temperature_fit_recovers_a_known_temperature():
    cal = SoftmaxTemperature()
    logits, gold, _ = overconfident(8000, 4, 3.0)
    t = cal.fit(logits, gold)
    assert t == pytest.approx(3.0, rel=0.08)
    assert cal.nll(logits, gold, t) < cal.nll(logits, gold, 1.0) - 0.1
    test_logits, test_gold, _ = overconfident(4000, 4, 3.0, seed=1)  # fitted on one split, scored on another
    scores, record, rows = calibrate(cal, "temperature", (logits, gold), (test_logits, test_gold))
    assert record["temperature"] == t and record["n_fit"] == 8000
    assert scores["ece"] < 0.03 < 0.1 < scores["ece_uncalibrated"]
    assert scores["brier"] < scores["brier_uncalibrated"]
    assert record["validation_nll"] < record["validation_nll_uncalibrated"]
    assert len(rows) == 15 and sum(r["count"] for r in rows) == sum(r["count_uncalibrated"] for r in rows) == 4000


def test_an_underconfident_model_gets_a_temperature_below_one_and_none_keeps_one():
    cal = SoftmaxTemperature()
    logits, gold, _ = overconfident(6000, 3, 0.5)
    assert cal.fit(logits, gold) == pytest.approx(0.5, rel=0.08)
    scores, record, _ = calibrate(cal, "none", (logits, gold), (logits, gold))
    assert record["temperature"] == 1.0 and record["method"] == "none"
    assert scores["ece"] == scores["ece_uncalibrated"] and scores["brier"] == scores["brier_uncalibrated"]


def test_per_label_sigmoid_temperatures_for_multilabel():
    """What a multi-label task's calibrator ("sigmoid") fits: one temperature per label."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(8000, 3))
    gold = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(int)
    logits = z * np.array([0.5, 1.0, 4.0])
    cal = SigmoidTemperature()
    t = cal.fit(logits, gold)
    assert t == pytest.approx([0.5, 1.0, 4.0], rel=0.1)
    scores, record, _ = calibrate(cal, "temperature", (logits, gold), (logits, gold))
    assert record["temperature"] == t and scores["ece"] < scores["ece_uncalibrated"]


def test_ece_and_brier_on_a_hand_computed_example():
    probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.38, 0.62], [0.65, 0.35]])
    gold = np.array([0, 1, 1, 1])
    cal = SoftmaxTemperature()
    conf, correct = cal.confidence(probs, gold)
    assert conf.tolist() == [0.9, 0.75, 0.62, 0.65] and correct.tolist() == [True, False, True, False]
    # 15 bins of width 1/15: 0.9 -> bin 13, 0.75 -> bin 11, 0.62 and 0.65 -> bin 9 (accuracy 1/2, confidence .635)
    rows = reliability(conf, correct)
    assert [r["count"] for r in rows if r["count"]] == [2, 1, 1] and rows[9]["confidence"] == pytest.approx(0.635)
    assert rows[0]["accuracy"] is None  # an empty bin has no accuracy
    ece = 1 / 4 * abs(1 - 0.9) + 1 / 4 * abs(0 - 0.75) + 2 / 4 * abs(0.5 - 0.635)
    assert expected_calibration_error(conf, correct) == pytest.approx(ece) == pytest.approx(0.28)
    # Brier: mean over rows of the sum over labels of (p - one-hot)^2.
    assert cal.brier(probs, gold) == pytest.approx((0.02 + 1.125 + 0.2888 + 0.845) / 4)
    three = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert cal.brier(three, np.array([0, 1])) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.49 + 0.36)) / 2)


# ---- serving -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """A tiny 3-label classifier (in memory) and its export as the stage lays it out (ONNX, tokenizer, meta)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tunepipe.exporting import export_onnx, input_names

    out = tmp_path_factory.mktemp("export")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=3)
    torch.manual_seed(1)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # spread the logits so a temperature visibly changes the probabilities
        model.classifier.weight.mul_(50)
    export_onnx(model, input_names(tok), out / "model.onnx", 17)
    tok.save_pretrained(out)
    shutil.copy(get_task("classification").serve_code, out / "serve.py")  # as export does
    (out / "tunepipe.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b", "c"],
                                                   "max_length": 32, "input_names": input_names(tok)}))
    return model, tok, out


def test_an_export_without_its_output_code_is_named(exported, tmp_path, capsys):
    """The task's served output (tasks/<task>/serve.py) travels inside the export; an export made before it did
    is refused with what to do: by the predictor, and by `tunepipe predict` as one line, exit status 2."""
    from tunepipe import cli
    from tunepipe.serving.pyfunc_model import TextPredictor

    old = with_meta(exported[2], tmp_path)
    (old / "serve.py").unlink()
    with pytest.raises(ValueError, match=r"no serve\.py \(exported by an older tunepipe\); export it again"):
        TextPredictor(old)
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--model", str(old), "a great flight"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.endswith("no serve.py (exported by an older tunepipe); export it again (dvc repro export)"), err


def with_meta(export: Path, tmp: Path, **extra) -> Path:
    """A copy of the export whose tunepipe.json has `extra` keys."""
    dest = tmp / "served"
    shutil.copytree(export, dest)
    meta = json.loads((dest / "tunepipe.json").read_text())
    (dest / "tunepipe.json").write_text(json.dumps({**meta, **extra}))
    return dest


TEXTS = ["what a great flight", "the service was awful", "a table by the window"]


def test_served_probabilities_use_the_stored_temperature(exported, tmp_path):
    from tunepipe.serving.pyfunc_model import TextPredictor, TunepipeModel

    _, _, export_dir = exported
    plain = TextPredictor(export_dir)  # an export made before calibration: no temperature, T = 1
    logits = plain.logits(TEXTS)
    raw = softmax(logits.astype(np.float64))
    assert np.allclose([list(r["probabilities"].values()) for r in plain.predict(TEXTS)], raw, atol=1e-6)

    served = with_meta(export_dir, tmp_path, temperature=2.5)
    calibrated = TextPredictor(served).predict(TEXTS)
    probs = np.array([list(r["probabilities"].values()) for r in calibrated])
    assert np.allclose(probs, softmax(logits.astype(np.float64) / 2.5), atol=1e-6)
    assert np.abs(probs - raw).max() > 0.05  # T = 2.5 visibly softens them
    assert [r["label"] for r in calibrated] == [["a", "b", "c"][i] for i in raw.argmax(-1)]  # same labels
    assert [r["score"] for r in calibrated] == pytest.approx(probs.max(-1).tolist())

    # The MLflow pyfunc (what `mlflow models serve` runs) wraps the same predictor.
    model = TunepipeModel()
    model.load_context(type("Context", (), {"artifacts": {"model_dir": str(served)}})())
    out = model.predict(None, TEXTS)
    assert np.allclose([list(p.values()) for p in out["probabilities"]], probs)


def test_parity_compares_calibrated_probabilities(exported):
    """The served side's probabilities against tunepipe's: one that forgot the temperature is caught."""
    import onnxruntime as ort

    from tunepipe.exporting import input_names, parity
    from tunepipe.serving.pyfunc_model import probabilities
    from tunepipe.tasks import get_task

    model, tok, export_dir = exported
    inputs = input_names(tok)
    enc = tok(TEXTS * 5, truncation=True, max_length=32)
    ds = datasets.Dataset.from_dict({**{k: enc[k] for k in inputs}, "labels": [0, 1, 2] * 5})
    sessions = {"fp32": ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])}
    cal, t = SoftmaxTemperature(), 3.0
    task = get_task("classification")
    ours = (lambda z: cal.probabilities(z, t), lambda z: probabilities({"temperature": t}, z))
    good = parity(task, model, sessions, ds, inputs, tok.pad_token_id, ours)
    assert good["fp32_max_abs_prob_diff"] < 1e-5 and good["fp32_max_abs_logit_diff"] < 1e-3
    forgot = (ours[0], lambda z: probabilities({}, z))
    assert parity(task, model, sessions, ds, inputs, tok.pad_token_id, forgot)["fp32_max_abs_prob_diff"] > 0.05


# ---- NER: token level ----------------------------------------------------------------------------------------

def test_ner_calibration_data_is_token_level_without_ignored_positions(tiny_model_dir):
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from tunepipe.tasks import get_task

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig.from_pretrained(tiny_model_dir, num_labels=5)).eval()
    enc = tok(["John lives in Paris", "Acme Corp is big today ok"], truncation=True, max_length=32)
    labels = [[-100, 1, 0, 0, 3, -100], [-100, 2, 4, 0, 0, 0, -100, 0, -100]]  # any -100 pattern
    labels = [lab[:len(ids)] + [-100] * (len(ids) - len(lab)) for lab, ids in zip(labels, enc["input_ids"],
                                                                                   strict=True)]
    ds = datasets.Dataset.from_dict({**dict(enc), "labels": labels, "length": [len(x) for x in enc["input_ids"]]})
    logits, gold = get_task("ner").calibration_data(model, tok, ds)
    kept = [lab for row in labels for lab in row if lab != -100]
    assert logits.shape == (len(kept), 5) and sorted(gold.tolist()) == sorted(kept)
    with torch.no_grad():
        ref = model(**tok.pad({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                              return_tensors="pt")).logits.numpy()
    expected = np.concatenate([ref[i][np.array(row + [-100] * (ref.shape[1] - len(row))) != -100]
                               for i, row in enumerate(labels)])
    # Rows come in length order; compare as sets of rows.
    assert np.allclose(np.sort(logits, axis=0), np.sort(expected, axis=0), atol=1e-5)


# ---- the stages ----------------------------------------------------------------------------------------------

def run_to_evaluate(root: Path) -> None:
    from stages import augment, evaluate, finetune, prepare
    from stages import tokenization as tokenize

    for stage in (prepare, tokenize, augment, finetune, evaluate):
        stage.main()


def test_evaluate_writes_calibration_and_export_serves_it(project, monkeypatch):
    import mlflow

    from stages import evaluate, export
    from tunepipe.params import load_params
    from tunepipe.serving.pyfunc_model import TextPredictor

    root = project(n_rows=240, **{"finetune.epochs": 3.0})
    run_to_evaluate(root)
    metrics = read_json(root / "reports/metrics.json")
    for key in ("ece", "ece_uncalibrated", "brier", "brier_uncalibrated"):
        assert 0 <= metrics[key] <= 2, key
    record = read_json(root / "reports/calibration.json")
    assert record["method"] == "temperature" and record["fitted_on"] == "validation" and record["n_fit"] == 24
    assert record["temperature"] > 0 and record["validation_nll"] <= record["validation_nll_uncalibrated"]
    assert (root / "reports/plots/reliability.png").stat().st_size > 5000
    lines = (root / "reports/plots/reliability.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["bin", "lower", "upper", "midpoint"] and len(lines) == 16
    assert sum(int(r.split(",")[-1]) for r in lines[1:]) == metrics["n_test"]

    # A served side that drops the temperature is refused, and nothing is exported.
    (root / "reports/calibration.json").write_text(json.dumps({**record, "temperature": 4.0}))
    monkeypatch.setattr(export, "served_probabilities", lambda meta, z: softmax(z))
    with pytest.raises(UserError, match="served calibrated probabilities .* export.parity_tolerance"):
        export.main()
    assert not (root / "models/onnx").exists()
    monkeypatch.undo()
    monkeypatch.chdir(root)

    export.main()
    report = read_json(root / "reports/export.json")
    assert report["temperature"] == 4.0 and report["fp32_max_abs_prob_diff"] <= report["parity_tolerance"]
    assert read_json(root / "models/onnx/tunepipe.json")["temperature"] == 4.0
    # The request-size limits travel with the model (params.yaml's serve section, as the project sets it).
    served = read_json(root / "models/onnx/tunepipe.json")
    assert {k: served[k] for k in ("max_texts_per_request", "max_text_chars")} == load_params().serve.model_dump()
    predictor = TextPredictor(root / "models/onnx")
    texts = ["great love the flight", "awful hate it", "a table by the window"]
    expected = softmax(predictor.logits(texts).astype(np.float64) / 4.0)
    served = [list(r["probabilities"].values()) for r in predictor.predict(texts)]
    assert np.allclose(served, expected, atol=1e-6)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    pyfunc = mlflow.pyfunc.load_model(f"models:/{load_params().tracking.model_name}/"
                                      f"{report['registered']['version']}")
    assert np.allclose([list(p.values()) for p in pyfunc.predict(texts)["probabilities"]], expected, atol=1e-6)

    # calibration.method none: T = 1, and the scores before and after are the same.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["calibration"] = {"method": "none"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    evaluate.main()
    assert read_json(root / "reports/calibration.json")["temperature"] == 1.0
    metrics = read_json(root / "reports/metrics.json")
    assert metrics["ece"] == metrics["ece_uncalibrated"] and metrics["brier"] == metrics["brier_uncalibrated"]


def test_export_without_calibration_names_the_file(project):
    from stages import export

    root = project(n_rows=90, **{"finetune.epochs": 1.0})
    run_to_evaluate(root)
    (root / "reports/calibration.json").unlink()
    with pytest.raises(UserError, match=r"reports/calibration.json not found .* `dvc repro evaluate`"):
        export.main()


def test_ner_stages_calibrate_per_token_and_serve_it(ner_project):  # noqa: F811 (the fixture)
    from stages import export
    from tunepipe.serving.pyfunc_model import TextPredictor

    root = ner_project(**{"finetune.epochs": 2.0, "finetune.eval_steps": 20})
    write_tiny_dir(root, n_train=120, n_eval=20)
    run_to_evaluate(root)
    record = read_json(root / "reports/calibration.json")
    validation = datasets.load_from_disk(str(root / "data/tokenized"))["validation"]
    assert record["n_fit"] == sum(lab != -100 for row in validation["labels"] for lab in row)  # one per word
    metrics = read_json(root / "reports/metrics.json")
    assert {"ece", "ece_uncalibrated", "brier", "brier_uncalibrated", "f1"} <= set(metrics)
    csv_rows = (root / "reports/plots/reliability.csv").read_text().splitlines()[1:]
    test = datasets.load_from_disk(str(root / "data/tokenized"))["test"]
    assert sum(int(r.split(",")[-1]) for r in csv_rows) == sum(lab != -100 for row in test["labels"] for lab in row)

    (root / "reports/calibration.json").write_text(json.dumps({**record, "temperature": 3.0}))
    export.main()
    assert read_json(root / "reports/export.json")["fp32_max_abs_prob_diff"] <= 1e-3
    predictor = TextPredictor(root / "models/onnx")
    assert predictor.meta["temperature"] == 3.0
    words = [["John", "Smith", "visited", "Paris", "."]]
    enc = predictor.tokenizer(words, is_split_into_words=True, return_tensors="np")
    logits = predictor.session.run(None, {k: enc[k].astype(np.int64) for k in predictor.input_names})[0][0]
    first = [enc.word_ids(0).index(w) for w in range(5)]
    served = np.array(predictor.output.word_probs(predictor, words)[0])  # the exported serve.py's
    assert np.allclose(served, softmax(logits[first].astype(np.float64) / 3.0), atol=1e-6)


def tunepipe(capsys, *args: str, code: int = 0) -> str:
    """`tunepipe ARGS` in this process (the working directory's params.yaml): its stdout, once it exits with `code`."""
    from tunepipe.cli import main

    capsys.readouterr()
    got = 0
    try:
        main(list(args))
    except SystemExit as exc:
        got = exc.code
    out = capsys.readouterr()
    assert got == code, f"tunepipe {' '.join(args)} exited {got}:\n{out.out[-3000:]}\n{out.err[-3000:]}"
    return out.out


def torch_logits(root: Path, texts: list[str]) -> np.ndarray:
    """The fine-tuned PyTorch model's (models/model) logits: independent of the export and its metadata, so they
    check what the served model does with its own logits."""
    from tunepipe.modeling import load_trained

    info, _, model, tok = load_trained(root / "models/model")
    with torch.no_grad():
        return model(**tok(texts, truncation=True, max_length=info["max_length"], padding=True,
                           return_tensors="pt")).logits.double().numpy()


def served_by_registry(root: Path, uri: str, texts: list[str]) -> np.ndarray:
    """The probabilities a registered version serves, loaded from the registry as `mlflow models serve` loads it."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    out = mlflow.pyfunc.load_model(uri).predict(texts)
    labels = read_json(root / "models/onnx/tunepipe.json")["labels"]
    return np.array([[row[label] for label in labels] for row in out["probabilities"]])


@pytest.fixture
def repo(tmp_path, tiny_model_dir, monkeypatch):
    """A clone with tiny data and a 2-trial sweep space; `tunepipe` commands run in this process, in the clone (its
    `dvc repro augment` finds the venv's python first on PATH, as in an activated venv)."""
    root = clone_repo(tmp_path / "repo")
    write_csv(root / "data/raw/train.csv", synthetic_rows(150))
    # Robustness and explanations are evaluate's other reports, not what this test is about.
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir, **{
        "finetune.epochs": 2.0, "robustness.perturbations": [], "explain.examples_per_class": 0,
        "sweep.trials": 2, "sweep.pruner": "none", "sweep.learning_rate": [5e-3, 2e-2], "sweep.batch_size": [16],
        "sweep.dropout": [0.0, 0.1],
        # Served probabilities are checked against PyTorch's to 1e-4: the fp32 graph, whatever int8 would agree.
        "export.int8_min_agreement": None}), sort_keys=False))
    commit_all(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return root


@pytest.mark.slow
def test_sweep_repro_and_promote_serve_the_fitted_temperature(repo, capsys):
    """`tunepipe sweep --apply`, `dvc repro`, `tunepipe promote` in a clone: the temperature evaluate fits is the one
    the export records and the champion, loaded from the registry, serves; calibration.method none serves the
    plain softmax."""
    import mlflow

    out = tunepipe(capsys, "sweep", "--apply")  # runs `dvc repro augment` first
    assert "sweep: 2 complete" in out and "sweep: params.yaml <- trial" in out, out
    applied = yaml.safe_load((repo / "params.yaml").read_text())
    assert applied["calibration"] == {"method": "temperature"} and applied["finetune"]["learning_rate"] >= 5e-3
    out = sh(["dvc", "repro"], repo).stdout
    assert "evaluate: calibration temperature: temperature" in out and "calibrated probabilities" in out
    t = read_json(repo / "reports/calibration.json")["temperature"]
    assert abs(t - 1) > 0.05, t  # else the checks below could not tell calibrated from plain
    assert read_json(repo / "models/onnx/tunepipe.json")["temperature"] == t
    export = read_json(repo / "reports/export.json")
    assert export["temperature"] == t
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "ece" in json.dumps(shown) and "temperature" in json.dumps(shown)
    sh(["dvc", "plots", "show", "--json", "reports/plots/reliability.csv"], repo)
    # T is what refitting on the validation split gives this model: evaluate's fit, not a stale value.
    from tunepipe.modeling import load_trained

    info, task, model, tok = load_trained(repo / "models/model")
    validation = datasets.load_from_disk(str(repo / "data/tokenized"))["validation"]
    assert SoftmaxTemperature().fit(*task.calibration_data(model, tok, validation, info)) == pytest.approx(t, rel=1e-3)

    from tunepipe.serving.pyfunc_model import TextPredictor

    predictor = TextPredictor(repo / "models/onnx")
    row = json.loads(tunepipe(capsys, "predict", "what a great flight", "--json").splitlines()[0])
    expected = softmax(predictor.logits(["what a great flight"]).astype(np.float64) / t)[0]
    assert list(row["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-6)

    # The champion: promoted from the registry, it serves softmax(logits / T) of the fine-tuned model's logits.
    name, v1 = applied["tracking"]["model_name"], export["registered"]["version"]
    out = tunepipe(capsys, "promote")
    assert "PROMOTE: no champion yet" in out and f"champion none -> v{v1}" in out, out
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) == v1 and champion.run_id == info["run_id"]
    assert client.get_run(champion.run_id).data.metrics["calibration_temperature"] == t
    assert json.loads(champion.tags["params"])["finetune"]["learning_rate"] == applied["finetune"]["learning_rate"]
    texts = [text for text, _ in synthetic_rows(6, seed=99)]
    logits = torch_logits(repo, texts)
    served = served_by_registry(repo, f"models:/{name}@champion", texts)
    assert np.allclose(served, softmax(logits / t), atol=1e-4)  # ONNX against PyTorch logits, divided by T
    assert np.abs(served - softmax(logits)).max() > 0.01  # visibly not the uncalibrated softmax

    # The calibration method is evaluate's param: changing it re-runs evaluate and export only, and registers a
    # version that serves the plain softmax; promote refuses it (a tie) and the champion keeps its temperature.
    status = json.loads(sh(["dvc", "status", "--json"], repo).stdout)
    assert status == {}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["calibration"]["method"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], repo).stdout
    ran = {s for s in ("prepare", "tokenize", "augment", "finetune", "evaluate", "export")
           if f"Running stage '{s}'" in out}
    assert ran == {"evaluate", "export"}
    assert read_json(repo / "models/onnx/tunepipe.json")["temperature"] == 1.0
    v2 = read_json(repo / "reports/export.json")["registered"]["version"]
    assert v2 == v1 + 1
    assert np.allclose(served_by_registry(repo, f"models:/{name}/{v2}", texts), softmax(logits), atol=1e-5)
    assert "REFUSE: macro_f1 gain +0.0000" in tunepipe(capsys, "promote", code=1)
    assert np.allclose(served_by_registry(repo, f"models:/{name}@champion", texts), served, atol=1e-12)
