"""Registry promotion and serving against real MLflow stores: sqlite in a temp dir, and a tracking server on
loopback with a PostgreSQL backend store. Models are a tiny random BERT exported to ONNX once per session."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import accuracy_score, f1_score

from tests.helpers import (
    PG,
    REPO,
    background,
    free_port,
    fresh_pg_database,
    post_json,
    synthetic_rows,
    wait_http,
)
from tunepipe import cli, tracking
from tunepipe.errors import UserError
from tunepipe.params import PromoteParams, parse_params
from tunepipe.registry import decision, locks, promotion
from tunepipe.registry.significance import entity_metric_on_weights, mcnemar, metric_on_weights, paired_bootstrap_labels
from tunepipe.tasks import get_task

LABELS = ["negative", "neutral", "positive"]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def onnx_exports(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Export directories as the export stage writes them: a random classifier and two constant ones.

    The constant models (classifier weights 0, one large bias) predict one label for any text, so their test
    metrics follow from the class counts alone: an independent check of --reevaluate.
    """
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoTokenizer, BertForSequenceClassification

    from tunepipe.exporting import export_onnx

    root = tmp_path_factory.mktemp("exports")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=len(LABELS)).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))  # non-zero, so ONNX keeps it as an initializer
    names = [k for k in tok.model_input_names if k in ("input_ids", "attention_mask", "token_type_ids")]
    export_onnx(model, names, root / "base.onnx", 17)
    graph = onnx.load(str(root / "base.onnx"))
    out = {}
    for variant, bias in (("random", None), ("negative", [8.0, 0, 0]), ("positive", [0, 0, 8.0])):
        d = root / variant
        d.mkdir()
        for init in graph.graph.initializer:
            if bias is not None and init.name.endswith("classifier.weight"):
                init.CopyFrom(numpy_helper.from_array(np.zeros(tuple(init.dims), np.float32), init.name))
            if bias is not None and init.name.endswith("classifier.bias"):
                init.CopyFrom(numpy_helper.from_array(np.array(bias, np.float32), init.name))
        onnx.save(graph, str(d / "model.onnx"))  # one self-contained file
        tok.save_pretrained(d)
        shutil.copy(get_task("classification").serve_code, d / "serve.py")  # as export does
        # The random model carries request-size limits (serve.*, as export stores them); small ones, to test them.
        limits = {"max_texts_per_request": 3, "max_text_chars": 200} if variant == "random" else {}
        (d / "tunepipe.json").write_text(json.dumps({"task": "classification", "labels": LABELS, "max_length": 32,
                                                     "input_names": names, **limits}))
        out[variant] = d
    return out


@dataclass
class Store:
    uri: str
    root: Path
    experiment_id: str
    models: dict[str, str]  # variant -> models:/m-... of a logged pyfunc model


@pytest.fixture(scope="session")
def store(onnx_exports, tmp_path_factory) -> Store:
    """One sqlite tracking store; the two constant models logged once, registered by tests under fresh names."""
    from tunepipe.serving import PYFUNC_CODE

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.MlflowClient().create_experiment("tunepipe", artifact_location=(root / "artifacts").as_uri())
    models = {}
    for variant in ("negative", "positive"):
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE), input_example=["a flight"],
                                           artifacts={"model_dir": str(onnx_exports[variant])},
                                           pip_requirements=["onnxruntime"])
        models[variant] = info.model_uri
    return Store(uri, root, exp, models)


class Registry:
    """A fresh registered-model name in the session store, a params.yaml pointing at it, and the CLI."""

    def __init__(self, store: Store, uri: str, experiment_id: str, project: Path, capsys):
        self.store, self.uri, self.experiment_id, self.project, self.capsys = store, uri, experiment_id, project, capsys
        self.name = f"m-{uuid.uuid4().hex[:8]}"
        self.params_file = project / "params.yaml"
        self.client = mlflow.MlflowClient()
        self.set_promote()

    def set_promote(self, **promote) -> PromoteParams:
        raw = {"tracking": {"uri": self.uri, "experiment": "tunepipe", "model_name": self.name},
               "promote": promote}
        self.params_file.write_text(yaml.safe_dump(raw))
        return parse_params(raw).promote

    def add(self, metrics: dict[str, float], test_hash: str = "t1", model: str | None = "positive",
            predictions: list[str] | None = None, gold: list[str] | None = None) -> int:
        """Register a version tagged like the export stage does; optionally with per-example predictions."""
        run = self.client.create_run(self.experiment_id)
        run_id = run.info.run_id
        if predictions is not None:
            path = self.project / "predictions.csv"
            with open(path, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["id", "label", "prediction", "confidence"])
                w.writerows([i, g, p, 0.9] for i, (g, p) in enumerate(zip(gold, predictions, strict=True)))
            self.client.log_artifact(run_id, str(path), "evaluation")
        if model is None:  # registry-only version: a run artifact that looks like a model
            (self.project / "model").mkdir(exist_ok=True)
            (self.project / "model" / "MLmodel").write_text("flavors: {}\n")
            self.client.log_artifact(run_id, str(self.project / "model" / "MLmodel"), "model")
            source = f"runs:/{run_id}/model"
        else:
            source = self.store.models[model]
        tags = {"run_id": run_id, "test_data_hash": test_hash, "data_hash": f"d{test_hash}", "git_commit": "c0ffee",
                "task": "classification", "headline_metric": "macro_f1", "metrics": json.dumps(metrics),
                **{f"metric.{k}": repr(float(v)) for k, v in metrics.items()}}
        return int(mlflow.register_model(source, self.name, tags=tags).version)

    def cli(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            cli.main(["--params", str(self.params_file), *args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def champion(self) -> int | None:
        aliases = self.client.get_registered_model(self.name).aliases
        return int(aliases["champion"]) if "champion" in aliases else None

    def tags(self, version: int) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, str(version)).tags)


@pytest.fixture
def reg(store, tmp_path, monkeypatch, capsys) -> Registry:
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(store.uri)
    return Registry(store, store.uri, store.experiment_id, tmp_path, capsys)


def scored(gold: list[str], pred: list[str]) -> dict[str, float]:
    return {"macro_f1": f1_score(gold, pred, labels=LABELS, average="macro", zero_division=0),
            "accuracy": accuracy_score(gold, pred)}


def with_errors(gold: list[str], n_wrong: int) -> list[str]:
    """Predictions that get the first n_wrong examples wrong (the next label) and the rest right."""
    return [LABELS[(LABELS.index(g) + 1) % 3] if i < n_wrong else g for i, g in enumerate(gold)]


# ---------------------------------------------------------------------------------------------- significance

def test_resampled_metrics_match_sklearn_with_sample_weights():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    p[:120] = y[:120]
    weights = rng.multinomial(200, np.full(200, 1 / 200), size=5)
    for metric, average in (("macro_f1", "macro"), ("weighted_f1", "weighted"), ("accuracy", None)):
        got = metric_on_weights(weights, y, p, 3, metric)
        for b in range(5):
            if average is None:
                want = accuracy_score(y, p, sample_weight=weights[b])
            else:
                want = f1_score(y, p, labels=[0, 1, 2], average=average, sample_weight=weights[b], zero_division=0)
            assert got[b] == pytest.approx(want, abs=1e-12)


def test_paired_tests_separate_real_gains_from_noise():
    gold = [LABELS[i % 3] for i in range(300)]
    y = np.array([LABELS.index(g) for g in gold])
    strong, weak = (np.array([LABELS.index(x) for x in with_errors(gold, k)]) for k in (60, 150))
    assert paired_bootstrap_labels(y, strong, weak, 3, "macro_f1", 1000) == pytest.approx(1 / 1001)
    assert paired_bootstrap_labels(y, weak, weak, 3, "macro_f1", 1000) == 1.0  # identical models: never ahead
    assert paired_bootstrap_labels(y, weak, strong, 3, "accuracy", 1000) > 0.99
    # McNemar: 90 examples only the candidate gets right, none the other way: p = 0.5^90.
    assert mcnemar(y, strong, weak) == pytest.approx(0.5 ** 90)
    one_flip = y.copy()
    one_flip[0] = (y[0] + 1) % 3
    assert mcnemar(y, y, one_flip) == pytest.approx(0.5)


def test_ner_entity_counts_resample_like_repeated_sentences():
    """Per-sentence entity counts (the NER predictions.csv): a resample equals the sentences repeated."""
    rng = np.random.default_rng(2)
    gold, pred = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    correct = np.minimum(gold, pred) - rng.integers(0, 2, 80).clip(0, np.minimum(gold, pred))
    weights = rng.multinomial(80, np.full(80, 1 / 80), size=3)
    for b in range(3):
        rows = np.repeat(np.arange(80), weights[b])
        tp, g, q = correct[rows].sum(), gold[rows].sum(), pred[rows].sum()
        got = {m: entity_metric_on_weights(weights[b:b + 1], correct, gold, pred, m)[0]
               for m in ("f1", "precision", "recall")}
        assert got == pytest.approx({"f1": 2 * tp / (g + q), "precision": tp / q, "recall": tp / g})

    def frame(found: int) -> pd.DataFrame:  # 200 sentences with 2 gold entities; `found` of them get both right
        right = np.arange(200) < found
        return pd.DataFrame({"id": range(200), "label": ["B-PER O B-LOC"] * 200,
                             "prediction": np.where(right, "B-PER O B-LOC", "O O O"), "correct": right.astype(int),
                             "gold_entities": 2, "pred_entities": 2 * right, "correct_entities": 2 * right})

    s = PromoteParams(metric="f1", significance=0.05)
    assert get_task("ner").paired_p_value(s, frame(120), frame(80)) < 0.01
    assert get_task("ner").paired_p_value(s, frame(81), frame(80)) > 0.05
    assert get_task("ner").paired_p_value(PromoteParams(metric="f1", significance=0.05, test="mcnemar"), frame(81),
                                   frame(80)) == pytest.approx(0.5)
    with pytest.raises(UserError, match="bootstrap recomputes f1, precision, recall on NER"):
        get_task("ner").paired_p_value(PromoteParams(metric="macro_f1", significance=0.05), frame(81), frame(80))


def test_unreachable_significance_level_is_a_params_error():
    with pytest.raises(UserError, match=r"promote: significance 0.0005 is below .* raise promote.bootstrap_samples"):
        parse_params({"promote": {"significance": 0.0005, "bootstrap_samples": 1000}})
    assert parse_params({"promote": {"significance": 0.0005, "test": "mcnemar"}}).promote.significance == 0.0005


@pytest.mark.parametrize("cand, champ, same, p, settings, ok, why", [
    (0.70, None, True, None, {}, True, "no champion yet"),
    (0.70, None, True, None, {"min_metric": 0.8}, False, "below promote.min_metric"),
    (0.805, 0.80, True, None, {"min_delta": 0.005}, True, "gain +0.0050"),
    (0.804, 0.80, True, None, {"min_delta": 0.005}, False, "less than promote.min_delta"),
    (0.80, 0.80, True, None, {"min_delta": 0.0}, False, "less than promote.min_delta"),
    (0.90, 0.80, False, None, {}, False, "different test data"),
    (0.90, 0.80, True, 0.2, {"significance": 0.05}, False, "not significant"),
    (0.90, 0.80, True, 0.01, {"significance": 0.05}, True, "p=0.01"),
])
def test_decision_rule(cand, champ, same, p, settings, ok, why):
    got, reason = decision.decide(PromoteParams(**settings), cand, champ, same, p)
    assert got is ok and why in reason


# ---------------------------------------------------------------------------------------------- sqlite registry

def test_promote_refuse_dry_run_and_rollback(reg):
    reg.set_promote(min_delta=0.005)
    v1 = reg.add({"macro_f1": 0.70, "accuracy": 0.72})
    code, out, _ = reg.cli("promote")
    assert code == 0 and "PROMOTE" in out and "no champion yet" in out
    assert reg.champion() == v1
    t = reg.tags(v1)
    assert t["promote.decision"] == "promoted" and t["champion.previous"] == "" and t["promote.by"]
    code, out, _ = reg.cli("promote")
    assert code == 0 and "already the champion" in out

    v2 = reg.add({"macro_f1": 0.75, "accuracy": 0.76})
    code, out, _ = reg.cli("promote")
    assert code == 0 and f"champion v{v1} -> v{v2}" in out and "0.7500" in out and "0.7000" in out
    assert reg.champion() == v2
    assert reg.tags(v2)["champion.previous"] == str(v1) and reg.tags(v1)["champion.replaced_by"] == str(v2)
    assert float(reg.tags(v2)["promote.champion_value"]) == 0.70

    worse = reg.add({"macro_f1": 0.70, "accuracy": 0.74})
    code, out, _ = reg.cli("promote")
    assert code == 1 and "REFUSE" in out and reg.champion() == v2
    assert reg.tags(worse)["promote.decision"] == "refused"

    reg.add({"macro_f1": 0.753, "accuracy": 0.80})
    code, out, _ = reg.cli("promote")
    assert code == 1 and "less than promote.min_delta 0.005" in out and reg.champion() == v2

    best = reg.add({"macro_f1": 0.80, "accuracy": 0.81})
    code, out, _ = reg.cli("promote", "--dry-run")
    assert code == 0 and "PROMOTE" in out and "dry run" in out
    assert reg.champion() == v2 and not any(k.startswith(("promote.", "champion.")) for k in reg.tags(best))
    assert reg.cli("promote")[0] == 0 and reg.champion() == best

    code, out, _ = reg.cli("promote", "--rollback", "--dry-run")
    assert code == 0 and f"v{best} -> v{v2}" in out and reg.champion() == best
    code, out, _ = reg.cli("promote", "--rollback")
    assert code == 0 and reg.champion() == v2 and reg.tags(best)["champion.rolled_back_at"]
    code, _, err = reg.cli("promote")  # the newest was just rolled back: only an explicit --version retries it
    assert code == 2 and f"--version {best}" in err and reg.champion() == v2
    assert reg.cli("promote", "--rollback")[0] == 0 and reg.champion() == v1
    code, _, err = reg.cli("promote", "--rollback")
    assert code == 2 and "no previous champion" in err and reg.champion() == v1
    code, out, _ = reg.cli("promote", "--version", str(best))
    assert code == 0 and reg.champion() == best and "champion.rolled_back_at" not in reg.tags(best)


def test_different_test_data_refused_unless_reevaluated(reg):
    """Two constant models: on the current test split their scores follow from the class counts."""
    counts = {"negative": 6, "neutral": 4, "positive": 10}
    gold = [lab for lab, n in counts.items() for _ in range(n)]
    texts = [t for t, _ in synthetic_rows(len(gold), seed=3)]
    (reg.project / "data/prepared").mkdir(parents=True)
    pd.DataFrame({"text": texts, "label": gold}).to_parquet(reg.project / "data/prepared/test.parquet")

    old = reg.add({"macro_f1": 0.90}, test_hash="old-split", model="negative")
    assert reg.cli("promote")[0] == 0
    new = reg.add({"macro_f1": 0.20}, test_hash="new-split", model="positive")
    code, out, _ = reg.cli("promote")
    assert code == 1 and "different test data" in out and "--reevaluate" in out and reg.champion() == old

    code, out, err = reg.cli("promote", "--reevaluate")
    assert code == 0, out + err
    assert reg.champion() == new
    n = len(gold)
    expect = {lab: 2 * counts[lab] / (n + counts[lab]) / 3 for lab in counts}  # F1 of the constant class / 3
    t = reg.tags(new)
    assert float(t["promote.candidate_value"]) == pytest.approx(expect["positive"])
    assert float(t["promote.champion_value"]) == pytest.approx(expect["negative"])
    assert t["promote.reevaluated"] == "true" and t["promote.test_data_hash"] not in ("", "old-split", "new-split")


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_significance_refuses_a_tiny_gain_on_a_small_test_set(reg, test):
    reg.set_promote(min_delta=0.005, significance=0.05, test=test)
    small = [LABELS[i % 3] for i in range(30)]
    champ_pred, cand_pred = with_errors(small, 10), with_errors(small, 9)  # one more example right
    v1 = reg.add(scored(small, champ_pred), predictions=champ_pred, gold=small, model=None)
    assert reg.cli("promote")[0] == 0
    v2 = reg.add(scored(small, cand_pred), predictions=cand_pred, gold=small, model=None)
    assert scored(small, cand_pred)["macro_f1"] - scored(small, champ_pred)["macro_f1"] > 0.005
    code, out, _ = reg.cli("promote")
    assert code == 1 and "not significant" in out and reg.champion() == v1
    assert float(reg.tags(v2)["promote.p_value"]) > 0.05 and reg.tags(v2)["promote.test"] == test

    # The same kind of gain on a test set large enough to show it passes.
    big = [LABELS[i % 3] for i in range(600)]
    old_pred, new_pred = with_errors(big, 200), with_errors(big, 150)
    reg.add(scored(big, old_pred), test_hash="big", predictions=old_pred, gold=big, model=None)
    assert reg.cli("promote", "--version", str(v1 + 2))[0] == 1  # other test data than the champion
    reg.client.set_registered_model_alias(reg.name, "champion", str(v1 + 2))
    v4 = reg.add(scored(big, new_pred), test_hash="big", predictions=new_pred, gold=big, model=None)
    code, out, _ = reg.cli("promote")
    assert code == 0 and reg.champion() == v4 and float(reg.tags(v4)["promote.p_value"]) < 0.05


def test_promotion_waiting_on_the_lock_judges_against_the_new_champion(reg):
    """A promotion that decided against champion v1 must not move the alias once v2 became champion meanwhile."""
    v1 = reg.add({"macro_f1": 0.70})
    reg.client.set_registered_model_alias(reg.name, "champion", str(v1))
    v2, v3 = reg.add({"macro_f1": 0.80}), reg.add({"macro_f1": 0.75})
    result: dict = {}
    waiting = threading.Event()

    class Watch:  # stderr of the promoting thread: tells when it is blocked on the lock
        def write(self, s):
            if "waiting for another promotion" in s:
                waiting.set()

        def flush(self):
            pass

    s = PromoteParams()
    with locks.promote_lock(reg.client, reg.name):
        with contextlib.redirect_stderr(Watch()):
            t = threading.Thread(target=lambda: result.update(o=promotion.promote(reg.client, reg.name, s, v3)))
            t.start()
            assert waiting.wait(60)
        # What a concurrent promotion of v2 would do while holding the lock.
        reg.client.set_registered_model_alias(reg.name, "champion", str(v2))
    t.join(60)
    o = result["o"]
    assert not o.promote and o.champion.number == v2 and reg.champion() == v2
    assert reg.tags(v3)["promote.champion_version"] == str(v2)


def test_two_concurrent_promote_commands_keep_the_better_one(reg):
    v1 = reg.add({"macro_f1": 0.70})
    reg.client.set_registered_model_alias(reg.name, "champion", str(v1))
    v2, v3 = reg.add({"macro_f1": 0.80}), reg.add({"macro_f1": 0.75})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs, logs = [], []
    # Hold the lock until both commands have decided against v1, so both really race for the alias.
    with locks.promote_lock(reg.client, reg.name):
        for v in (v3, v2):
            logs.append(reg.project / f"promote-{v}.log")
            with open(logs[-1], "w") as fh:
                procs.append(subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "--params", str(reg.params_file),
                                               "promote", "--version", str(v)], stdout=fh, stderr=subprocess.STDOUT,
                                              cwd=reg.project, env=env))
        deadline = time.time() + 120
        while not all("waiting for another promotion" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [x.read_text() for x in logs]
            time.sleep(0.2)
    codes = [p.wait(120) for p in procs]
    assert reg.champion() == v2, [x.read_text() for x in logs]
    assert codes[1] == 0  # v2 always wins; v3 was refused or promoted and then replaced by v2
    assert reg.tags(v3)["promote.decision"] == "refused" or reg.tags(v2)["champion.previous"] == str(v3)


def test_clear_errors_change_nothing(reg, monkeypatch):
    code, _, err = reg.cli("promote")
    assert code == 2 and f"no registered model {reg.name!r}" in err

    v1 = reg.add({"macro_f1": 0.7})
    assert reg.cli("promote")[0] == 0
    v2 = reg.add({"accuracy": 0.9})  # no macro_f1
    code, _, err = reg.cli("promote")
    assert code == 2 and f"version {v2} has no metric.macro_f1" in err and "accuracy" in err
    assert reg.champion() == v1 and not any(k.startswith("promote.") for k in reg.tags(v2))
    code, _, err = reg.cli("promote", "--version", "99")
    assert code == 2 and "no version 99" in err

    reg.set_promote(significance=0.05)  # v1 has no per-example predictions
    v3 = reg.add({"macro_f1": 0.9})
    code, _, err = reg.cli("promote", "--version", str(v3))
    assert code == 2 and "predictions.csv" in err and reg.champion() == v1

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    reg.uri = f"http://tunepipe:hunter2@127.0.0.1:{port}"  # the message names the store, never its password
    reg.set_promote()
    t0 = time.time()
    code, _, err = reg.cli("promote")
    assert code == 2 and "nothing was changed" in err and time.time() - t0 < 60
    assert f"http://tunepipe:***@127.0.0.1:{port}" in err and "hunter2" not in err
    reg.uri = f"sqlite:///{reg.project}/missing.db"
    reg.set_promote()
    code, _, err = reg.cli("models")
    assert code == 2 and "no MLflow registry" in err and not (reg.project / "missing.db").exists()


def test_models_lists_versions_and_lineage(reg):
    v1 = reg.add({"macro_f1": 0.7, "accuracy": 0.71}, test_hash="a" * 64)
    reg.cli("promote")
    v2 = reg.add({"macro_f1": 0.6, "accuracy": 0.65}, test_hash="b" * 64)
    code, out, _ = reg.cli("models")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["version", "aliases", "macro_f1", "accuracy"]
    assert lines[1].split()[:5] == [str(v2), "-", "0.6000", "0.6500", "b" * 12]
    assert lines[2].split()[:5] == [str(v1), "champion", "0.7000", "0.7100", "a" * 12]
    assert reg.cli("registry", "list")[1] == out
    rows = [json.loads(x) for x in reg.cli("models", "--json")[1].splitlines()]
    assert [r["version"] for r in rows] == [v2, v1] and rows[1]["aliases"] == ["champion"]
    assert rows[1]["git_commit"] == "c0ffee" and rows[1]["metrics"]["macro_f1"] == 0.7


# ---------------------------------------------------------------------------------------------- serving

def test_serve_and_predict_the_champion_registered_by_export(reg, onnx_exports, monkeypatch):
    """The export stage's own register(), then promote, lineage, `mlflow models serve`, `tunepipe predict`."""
    from tunepipe import tracking

    p = parse_params({"tracking": {"uri": reg.uri, "experiment": "tunepipe", "model_name": reg.name}})
    run_id = reg.client.create_run(reg.experiment_id).info.run_id
    info = {"task": "classification", "data_hash": "d" * 64, "test_data_hash": "t" * 64}
    monkeypatch.chdir(REPO)  # git commit of this repository, as `dvc repro` records it
    reg_out = tracking.register(p, run_id, onnx_exports["random"], info, {"macro_f1": 0.5, "accuracy": 0.6}, {})
    commit = tracking.git_commit()
    monkeypatch.chdir(reg.project)
    assert reg.cli("promote")[0] == 0 and reg.champion() == reg_out["version"]

    code, out, _ = reg.cli("models", "--version", str(reg_out["version"]))
    assert code == 0 and commit in out and run_id in out
    code, params_yaml, _ = reg.cli("models", "--version", str(reg_out["version"]), "--params-yaml")
    assert parse_params(yaml.safe_load(params_yaml)).model_dump(exclude={"sweep", "promote"}) == \
        p.model_dump(exclude={"sweep", "promote"})

    code, out, _ = reg.cli("predict", "--model", f"models:/{reg.name}@champion", "--json", "what a great flight")
    assert code == 0
    res = json.loads(out)
    assert res["label"] in LABELS and sum(res["probabilities"].values()) == pytest.approx(1, abs=1e-5)

    port = free_port()
    # The scoring server runs `uvicorn` from PATH, as in an activated virtual environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": reg.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [MLFLOW, "models", "serve", "-m", f"models:/{reg.name}@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with background(cmd, reg.project / "serve.log", env) as proc:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, reg.project / "serve.log")
        for payload in ({"inputs": ["what a great flight", "awful service"]},
                        {"dataframe_records": [{"text": "what a great flight"}, {"text": "awful service"}]}):
            preds = post_json(f"http://127.0.0.1:{port}/invocations", payload)["predictions"]
            assert len(preds) == 2 and all(x["label"] in LABELS for x in preds)
            assert preds[0]["label"] == res["label"]  # the same model as `tunepipe predict` used
            assert set(preds[0]["probabilities"]) == set(LABELS)
        # Over the limits the export stored: 400 with the reason, before any work; the server keeps serving.
        url = f"http://127.0.0.1:{port}/invocations"
        for payload, key in (({"inputs": ["a flight"] * 4}, "serve.max_texts_per_request"),
                             ({"inputs": ["ok", "x" * 100_000]}, "serve.max_text_chars"),
                             ({"dataframe_records": [{"text": "a flight"}] * 50_000}, "serve.max_texts_per_request")):
            status, body = post_status(url, payload)
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", (status, body)
            assert key in body["message"] and len(body["message"]) < 20_000  # not an echo of the whole request
        assert len(post_json(url, {"inputs": ["a flight"] * 3})["predictions"]) == 3  # at the limit: served

    # `tunepipe predict` refuses the same, registered or from the export directory, as a one-line error.
    for model in (f"models:/{reg.name}@champion", str(onnx_exports["random"])):
        code, out, err = reg.cli("predict", "--model", model, "a", "b", "c", "d")
        assert code == 2 and "4 texts at once" in err and "serve.max_texts_per_request" in err and not out, err
        code, out, err = reg.cli("predict", "--model", model, "x" * 201)
        assert code == 2 and "serve.max_text_chars" in err and "Traceback" not in err, err


def post_status(url: str, payload: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a POST, error statuses included."""
    import urllib.error

    try:
        return 200, post_json(url, payload)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_request_limits_of_the_served_model(onnx_exports):
    """In-process: the served predict() raises what MLflow's scoring server turns into HTTP 400; the served
    signature's example and a request at the limits pass; promote --reevaluate scores past the limits."""
    from types import SimpleNamespace

    from tunepipe.registry.evidence import WholeSplit
    from tunepipe.serving.pyfunc_model import TunepipeModel

    model = TunepipeModel()
    model.load_context(SimpleNamespace(artifacts={"model_dir": str(onnx_exports["random"])}))
    assert len(model.predict(None, ["a", "b", "x" * 200])) == 3
    for texts, key in ((["a"] * 4, "serve.max_texts_per_request"), (["a", "x" * 201], "serve.max_text_chars")):
        with pytest.raises(mlflow.exceptions.MlflowException, match=key.replace(".", r"\.")) as exc:
            model.predict(None, pd.DataFrame({"text": texts}))
        assert exc.value.get_http_status_code() == 400 and exc.value.error_code == "INVALID_PARAMETER_VALUE"
    whole = WholeSplit(SimpleNamespace(unwrap_python_model=lambda: model))
    assert len(whole.predict(["a flight"] * 10 + ["x" * 500])) == 11


# ---------------------------------------------------------------------------------------------- PostgreSQL

def test_postgres_advisory_lock_serialises_promotions():
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"{PG}/test")  # no MLflow store is opened: the lock only needs the database
    try:
        with locks.promote_lock(None, "model-a"):
            with pytest.raises(UserError, match="advisory lock"):
                with locks.promote_lock(None, "model-a", timeout=0.5):
                    pass
            with locks.promote_lock(None, "model-b", timeout=0.5):  # other models are not blocked
                pass
        with locks.promote_lock(None, "model-a", timeout=0.5):  # released
            pass
    finally:
        mlflow.set_tracking_uri(previous)


def test_promotion_against_a_tracking_server_with_postgres(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    with fresh_pg_database() as db:
        cmd = [MLFLOW, "server", "--backend-store-uri", db, "--default-artifact-root", str(tmp_path / "artifacts"),
               "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
        with background(cmd, tmp_path / "server.log") as proc:
            wait_http(f"http://127.0.0.1:{port}/health", proc, tmp_path / "server.log")
            uri = f"http://127.0.0.1:{port}"
            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(uri)
            try:
                exp = mlflow.MlflowClient().create_experiment("tunepipe")
                reg = Registry(None, uri, exp, tmp_path, capsys)
                # --default-artifact-root without --artifacts-destination: each client writes on its own disk.
                warning = tracking.client_side_artifacts(reg.client, exp)
                assert warning.startswith(f"warning: tracking.uri: the MLflow server stores this experiment's "
                                          f"artifacts at {tmp_path / 'artifacts'}")
                assert "--artifacts-destination" in warning
                reg.set_promote(significance=0.05)
                gold = [LABELS[i % 3] for i in range(300)]
                v1 = reg.add(scored(gold, with_errors(gold, 150)), predictions=with_errors(gold, 150), gold=gold,
                             model=None)
                assert reg.cli("promote")[0] == 0 and reg.champion() == v1
                v2 = reg.add(scored(gold, with_errors(gold, 60)), predictions=with_errors(gold, 60), gold=gold,
                             model=None)
                assert reg.cli("promote")[0] == 0 and reg.champion() == v2
                assert float(reg.tags(v2)["promote.p_value"]) < 0.05 and reg.tags(v2)["champion.previous"] == str(v1)
                # The server's lock is an entry in the registry; a second holder waits, then gives up.
                with locks.promote_lock(reg.client, reg.name):
                    assert reg.client.get_registered_model(f"{reg.name}.promote-lock")
                    with pytest.raises(UserError, match="registry lock"):
                        with locks.promote_lock(reg.client, reg.name, timeout=1):
                            pass
                assert not reg.client.search_registered_models(f"name = '{reg.name}.promote-lock'")
                assert reg.cli("promote", "--rollback")[0] == 0 and reg.champion() == v1
                code, out, _ = reg.cli("models")
                assert code == 0 and [str(v1), "champion"] in [line.split()[:2] for line in out.splitlines()]
            finally:
                mlflow.set_tracking_uri(previous)
