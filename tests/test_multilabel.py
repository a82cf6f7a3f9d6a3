"""task: multilabel: the three label forms, cleaning, the stratified split, thresholds, metrics, the served output,
the pipeline end to end through `dvc repro` and promotion, and a slice of GoEmotions (../shared)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from stages import augment, evaluate, export, finetune, prepare
from stages import tokenization as tokenize
from tests.helpers import FILLER, REPO, clone_repo, commit_all, sh, tiny_params
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import PromoteParams, parse_params
from tunepipe.tasks import get_task
from tunepipe.tasks.multilabel import data as mdata
from tunepipe.tasks.multilabel import metrics as mmetrics

# Each label is carried by its own keywords, so a tiny model can learn it; texts carry one to three labels.
KEYWORDS = {"joy": ["great", "love", "happy"], "anger": ["hate", "awful", "furious"],
            "fear": ["scared", "afraid", "worried"], "surprise": ["wow", "unexpected", "shocked"]}
GOEMOTIONS = REPO.parent / "shared/data/goemotions"


def multilabel_rows(n: int, seed: int = 0, rare: str | None = None, rare_every: int = 0) -> list[tuple[str, list]]:
    """Unique (text, labels) rows; with `rare`, that label is on every `rare_every`-th row only."""
    rng = random.Random(seed)
    common = [lab for lab in KEYWORDS if lab != rare]
    rows, seen = [], set()
    while len(rows) < n:
        labels = sorted(rng.sample(common, rng.choice([1, 1, 2, 3])))
        if rare and rare_every and len(rows) % rare_every == 0:
            labels = sorted({*labels[:1], rare})
        toks = rng.sample(FILLER, rng.randint(2, 5)) + [w for lab in labels for w in rng.sample(KEYWORDS[lab], 1)]
        rng.shuffle(toks)
        text = " ".join(toks) + f" {rng.randint(0, 10**6)}"
        if text not in seen:
            seen.add(text)
            rows.append((text, labels))
    return rows


def write_rows(path: Path, rows, form: str) -> Path:
    """The three label forms: a delimited string column, a JSONL list column, one 0/1 column per label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "delimiter":
        pd.DataFrame({"text": [t for t, _ in rows], "emotions": ["|".join(ls) for _, ls in rows]}).to_csv(
            path, index=False)
    elif form == "jsonl":
        pd.DataFrame({"text": [t for t, _ in rows], "emotions": [ls for _, ls in rows]}).to_json(
            path, orient="records", lines=True)
    else:
        pd.DataFrame({"text": [t for t, _ in rows],
                      **{lab: [int(lab in ls) for _, ls in rows] for lab in KEYWORDS}}).to_csv(path, index=False)
    return path


def ml_params(model_dir: Path, source: str, **overrides) -> dict:
    return tiny_params(model_dir, **{"task": "multilabel", "data.source": source, "data.label_column": "emotions",
                                     "finetune.learning_rate": 1e-2, **overrides})


@pytest.fixture
def ml_project(tmp_path, monkeypatch, tiny_model_dir):
    def make(rows=None, form: str = "delimiter", **overrides) -> Path:
        suffix = ".jsonl" if form == "jsonl" else ".csv"
        write_rows(tmp_path / f"data/raw/train{suffix}", rows or multilabel_rows(160), form)
        if form == "columns":
            overrides = {"data.label_columns": list(KEYWORDS), **overrides}
        params = ml_params(tiny_model_dir, f"data/raw/train{suffix}", **overrides)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return tmp_path

    monkeypatch.chdir(tmp_path)
    return make


# ---------------------------------------------------------------------------------------------- data

def test_the_three_label_forms_prepare_the_same_splits(ml_project):
    """A delimited string column, a JSONL list column and one 0/1 column per label: the same rows, labels, label
    counts and cardinality, and the same content hash."""
    rows = multilabel_rows(120)
    truth = dict(rows)
    hashes = set()
    for form in ("delimiter", "jsonl", "columns"):
        root = ml_project(rows, form)
        prepare.main()
        report = read_json(root / "reports/data.json")
        assert report["labels"] == sorted(KEYWORDS)
        train = pd.read_parquet(root / "data/prepared/train.parquet")
        assert all(list(ls) == truth[t] for t, ls in zip(train["text"], train["labels"], strict=True))
        stats = report["splits"]["train"]
        assert stats["label_cardinality"] == pytest.approx(np.mean([len(truth[t]) for t in train["text"]]), abs=1e-4)
        assert sum(stats["label_counts"].values()) == sum(len(truth[t]) for t in train["text"])
        hashes.add(report["data_hash"])
        for f in (root / "data/raw").iterdir():
            f.unlink()
    assert len(hashes) == 1


def test_conflicts_and_duplicates_are_dropped_and_counted(ml_project):
    rows = multilabel_rows(100)
    rows += [(rows[0][0], rows[0][1]),  # an exact duplicate: one copy stays
             (rows[1][0], sorted({*rows[1][1], "fear", "joy"} - {rows[1][1][0]}) or ["fear"]),  # a conflict
             ("  ", ["joy"]), ("no labels here", "")]
    root = ml_project(rows)
    prepare.main()
    drops = read_json(root / "reports/data.json")["drops"]
    assert drops["duplicate"] == 1 and drops["conflicting_label"] == 2  # both copies of the conflicting text
    assert drops["empty_text"] == 1 and drops["missing_label"] == 1
    texts = set().union(*(pd.read_parquet(root / f"data/prepared/{s}.parquet")["text"]
                          for s in ("train", "validation", "test")))
    assert rows[1][0] not in texts and rows[0][0] in texts


def test_stratified_split_keeps_a_rare_label_in_every_split():
    rows = multilabel_rows(400, seed=3, rare="surprise", rare_every=40)  # 10 rows of 400
    df = pd.DataFrame({"text": [t for t, _ in rows], "labels": [tuple(ls) for _, ls in rows]})
    for seed in range(5):
        splits = mdata.stratified_split(df, 0.1, 0.1, seed)
        for name, part in splits.items():
            n = sum("surprise" in ls for ls in part["labels"])
            assert n >= 1, f"seed {seed}: no 'surprise' in {name}"
    capped = mdata.cap_train(df, 20, 0)
    assert len(capped) == 20 and {x for ls in capped["labels"] for x in ls} == set(KEYWORDS)


def test_label_ids_with_a_names_file_and_a_headerless_tsv(ml_project, tmp_path):
    names = sorted(KEYWORDS)
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/labels.txt").write_text("\n".join(names) + "\n")
    rows = multilabel_rows(100)
    lines = [f"{t}\t{','.join(str(names.index(x)) for x in ls)}\tid{i}" for i, (t, ls) in enumerate(rows)]
    (tmp_path / "data/raw/train.tsv").write_text("\n".join(lines) + "\n")
    root = ml_project(rows)  # writes a csv too; the params below point at the tsv
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="data/raw/train.tsv", header=["text", "ids", "comment"], text_column="text",
                          label_column="ids", label_delimiter=",", label_names="data/raw/labels.txt")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main()
    train = pd.read_parquet(root / "data/prepared/train.parquet")
    truth = dict(rows)
    assert all(list(ls) == truth[t] for t, ls in zip(train["text"], train["labels"], strict=True))
    # An id outside the names file, and a header list of the wrong width, name the key and what to do.
    (tmp_path / "data/raw/labels.txt").write_text("\n".join(names[:2]) + "\n")
    with pytest.raises(UserError, match=r"data.label_names: .* has label '[23]', which is not a 0-based id into the 2 "
                                        r"names of data/raw/labels.txt"):
        prepare.main()
    params["data"]["header"] = ["text", "ids"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"data.header: names 2 columns \(text, ids\) but .*train.tsv has 3"):
        prepare.main()


def test_bad_indicator_cell_names_column_and_row(ml_project):
    root = ml_project(multilabel_rows(60), "columns")
    df = pd.read_csv(root / "data/raw/train.csv", dtype=str)
    df.loc[4, "fear"] = "maybe"
    df.to_csv(root / "data/raw/train.csv", index=False)
    with pytest.raises(UserError, match=r"data.label_columns: column 'fear' row 5 of .* holds 'maybe'; each label "
                                        r"column must hold 0 or 1"):
        prepare.main()


def test_new_keys_leave_classification_reading_as_before(tmp_path):
    from tunepipe.tasks.classification.data import read_table

    f = tmp_path / "t.csv"
    f.write_text("text,sentiment\nhello,positive\n")
    assert list(read_table(f, None).columns) == ["text", "sentiment"]
    assert read_table(f, None, False).iloc[0].tolist() == ["text", "sentiment"]
    assert list(read_table(f, None, False).columns) == ["0", "1"]
    p = parse_params({})
    assert p.data.header is True and p.promote.metric == "macro_f1"
    assert parse_params({"task": "multilabel"}).promote.metric == "micro_f1"
    assert parse_params({"task": "ner"}).promote.metric == "f1"
    assert parse_params({"task": "multilabel", "promote": {"metric": "macro_f1"}}).promote.metric == "macro_f1"
    with pytest.raises(UserError, match="multilabel.threshold: .*must be tune or a number between 0 and 1"):
        parse_params({"multilabel": {"threshold": 1.5}})


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_on_a_hand_made_example():
    labels = ["a", "b", "c"]
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]])
    p = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 0, 0]])
    m = mmetrics.multilabel_summary(y, p, labels)
    # tp: a 2, b 0, c 1; fp: c 1; fn: b 2 -> micro 2*3/(2*3+1+2) = 6/9
    assert m["micro_f1"] == pytest.approx(6 / 9)
    assert m["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert m["samples_f1"] == pytest.approx((1 + 2 * 1 / (2 + 2) + 1 + 0) / 4)  # row 2: {a,b} vs {a,c}
    assert m["subset_accuracy"] == pytest.approx(0.5) and m["accuracy"] == m["subset_accuracy"]
    assert m["hamming_loss"] == pytest.approx(3 / 12)
    assert m["per_label"]["c"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert m["label_cardinality"] == pytest.approx(5 / 4)
    # The bootstrap's resample metric equals the summary on the whole test set (all weights 1).
    ones = np.ones((1, 4))
    for name in mmetrics.BOOTSTRAP_METRICS:
        assert mmetrics.metric_on_weights(ones, y, p, name)[0] == pytest.approx(m[name]), name


def test_thresholds_are_tuned_per_label():
    rng = np.random.default_rng(0)
    y = rng.random((400, 2)) < 0.3
    # Label 0 is well separated around 0.2, label 1 around 0.8; a label without positives keeps 0.5.
    probs = np.where(y, 0.25 + rng.random((400, 2)) * 0.1, 0.05 + rng.random((400, 2)) * 0.1)
    probs[:, 1] += 0.55
    th = mmetrics.tune_thresholds(np.c_[probs, rng.random(400)], np.c_[y, np.zeros(400, bool)])
    assert 0.15 <= th[0] <= 0.25 and 0.7 <= th[1] <= 0.8 and th[2] == 0.5  # not 0.5 where 0.5 is wrong
    assert ((probs >= th[:2]) == y).all()  # each label separated at its own threshold


def test_validation_metric_scores_at_the_thresholds_the_model_would_get():
    """A sigmoid head early in training: every probability under 0.5, but ranked right. At a plain 0.5 its
    validation micro-F1 is 0, so early stopping would end the run at its first checkpoint; at the tuned thresholds
    (multilabel.threshold: tune) it is perfect, and a fixed threshold is taken as set."""
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.2).astype(np.float32)
    logits = np.log(np.where(y > 0, 0.3, 0.1) / (1 - np.where(y > 0, 0.3, 0.1)))  # sigmoid: 0.3 / 0.1
    assert mmetrics.compute_metrics(["a", "b", "c"], "tune")((logits, y))["micro_f1"] == 1.0
    assert mmetrics.compute_metrics(["a", "b", "c"], 0.5)((logits, y))["micro_f1"] == 0.0
    assert mmetrics.compute_metrics(["a", "b", "c"], 0.2)((logits, y))["micro_f1"] == 1.0
    task = get_task("multilabel")
    tune = task.validation_metrics(["a", "b", "c"], None, parse_params({"task": "multilabel"}))
    assert tune((logits, y))["micro_f1"] == 1.0  # the default, multilabel.threshold: tune


def test_paired_tests_on_label_sets():
    gold = [["a"], ["a", "b"], ["c"], ["b"]] * 30
    better = gold[:100] + [[]] * 20
    worse = gold[:60] + [[]] * 60
    frame = lambda pred: pd.DataFrame({"id": range(120), "label": [json.dumps(x) for x in gold],  # noqa: E731
                                       "prediction": [json.dumps(x) for x in pred]})
    task = get_task("multilabel")
    s = PromoteParams(metric="micro_f1", significance=0.05)
    assert task.paired_p_value(s, frame(better), frame(worse)) < 0.01
    assert task.paired_p_value(s, frame(worse), frame(better)) > 0.9
    assert task.paired_p_value(PromoteParams(metric="micro_f1", test="mcnemar"), frame(better), frame(worse)) < 0.01
    with pytest.raises(UserError, match="bootstrap recomputes micro_f1, .* not promote.metric 'weighted_f1'"):
        task.paired_p_value(PromoteParams(metric="weighted_f1"), frame(better), frame(worse))
    with pytest.raises(ValueError, match="'hamming_loss' is lower-is-better"):  # params refuse it before any test
        PromoteParams(metric="hamming_loss")


# ---------------------------------------------------------------------------------------------- pipeline

def test_pipeline_in_process_stores_thresholds_and_serves_label_sets(ml_project):
    """prepare -> export on tiny data: the head is multi-label (BCE), thresholds tuned on validation are stored with
    the model and the export, evaluate applies them, and the served output is the label set with probabilities."""
    root = ml_project(multilabel_rows(240), **{"augment.method": "token_mask", "augment.ratio": 0.5,
                                                "finetune.epochs": 4.0})
    prepare.main()
    tokenize.main()
    augment.main()
    aug = datasets.load_from_disk(str(root / "data/augmented"))
    tok = datasets.load_from_disk(str(root / "data/tokenized"))
    assert len(aug["train"]) == round(1.5 * len(tok["train"]))
    assert set(map(tuple, aug["train"]["labels"])) <= set(map(tuple, tok["train"]["labels"]))  # label sets kept
    finetune.main()
    info = read_json(root / "models/model/training_info.json")
    labels = info["labels"]
    assert info["task"] == "multilabel" and info["threshold_mode"] == "tune"
    assert set(info["thresholds"]) == set(labels) and all(0.05 <= t <= 0.95 for t in info["thresholds"].values())
    assert read_json(root / "models/model/config.json")["problem_type"] == "multi_label_classification"
    evaluate.main()
    m = read_json(root / "reports/metrics.json")
    for key in ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss", "n_test"):
        assert key in m, key
    assert m["thresholds"] == info["thresholds"] and set(m["per_label"]) == set(labels)
    assert m["micro_f1"] > 0.5  # the keywords are learnable: far above chance
    preds = pd.read_csv(root / "reports/predictions.csv")
    assert {"id", "label", "prediction", "correct"} <= set(preds.columns)
    assert all(isinstance(json.loads(x), list) for x in preds["prediction"])
    export.main()
    served = read_json(root / "models/onnx/tunepipe.json")
    assert served["task"] == "multilabel" and served["thresholds"] == info["thresholds"]

    from tunepipe.serving.pyfunc_model import TextPredictor
    from tunepipe.tasks.multilabel.serve import calibrated_thresholds

    # Calibrated per label (one sigmoid temperature each); the thresholds, tuned on raw sigmoids, are mapped so
    # that the served decisions are the ones evaluate scored.
    assert served["calibrator"] == "sigmoid" and len(served["temperature"]) == len(labels)
    th = dict(zip(labels, calibrated_thresholds(served, labels), strict=True))
    predictor = TextPredictor(root / "models/onnx")
    texts = ["so happy and scared today", "the car"]
    out = predictor.predict(texts)
    raw = 1 / (1 + np.exp(-predictor.logits(texts)))
    for row, raw_row in zip(out, raw, strict=True):
        assert set(row) == {"labels", "probabilities"} and set(row["probabilities"]) == set(labels)
        chosen = [x["label"] for x in row["labels"]]
        assert chosen == sorted(chosen, key=lambda lab: -row["probabilities"][lab])
        assert {lab for lab, p in row["probabilities"].items() if p >= th[lab]} == set(chosen)
        assert {lab for lab, p in zip(labels, raw_row, strict=True) if p >= served["thresholds"][lab]} == set(chosen)
        assert all(x["probability"] == row["probabilities"][x["label"]] for x in row["labels"])
    line = get_task("multilabel").describe_prediction("so happy", out[0])
    assert line.endswith("\tso happy") and (line.startswith("(none)") or " 0." in line)


def test_a_global_threshold_is_stored_for_every_label(ml_project):
    root = ml_project(multilabel_rows(120), **{"multilabel.threshold": 0.3, "finetune.max_steps": 2})
    for stage in (prepare, tokenize, augment, finetune):
        stage.main()
    info = read_json(root / "models/model/training_info.json")
    assert info["threshold_mode"] == "0.3" and set(info["thresholds"].values()) == {0.3}


# ---------------------------------------------------------------------------------------------- end to end

def test_dvc_repro_registers_a_multilabel_model_and_promote_uses_micro_f1(tmp_path, tiny_model_dir):
    root = clone_repo(tmp_path / "repo")
    write_rows(root / "data/raw/train.csv", multilabel_rows(200), "delimiter")
    params = ml_params(tiny_model_dir, "data/raw/train.csv", **{"finetune.epochs": 3.0})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    out = sh(["dvc", "repro"], root).stdout
    for summary in ("prepare: train=", "finetune: best validation micro_f1", "evaluate: test micro_f1",
                    "export: fp32 max |diff|"):
        assert summary in out, summary
    assert "Traceback" not in out
    assert sh(["dvc", "status"], root).stdout.strip().endswith("up to date.")

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    versions = mlflow.MlflowClient().search_model_versions("name='tunepipe-classifier'")
    assert len(versions) == 1 and versions[0].tags["task"] == "multilabel"
    assert versions[0].tags["headline_metric"] == "micro_f1" and "metric.micro_f1" in versions[0].tags

    tunepipe = [sys.executable, "-m", "tunepipe.cli"]
    res = sh([*tunepipe, "promote"], root).stdout  # promote.metric: null -> the task's micro_f1
    assert res.startswith("promote tunepipe-classifier: micro_f1") and "champion" in res
    row = json.loads(sh([*tunepipe, "predict", "so happy today", "--model", "models:/tunepipe-classifier@champion",
                         "--json"], root).stdout.splitlines()[0])
    assert set(row) == {"text", "labels", "probabilities"} and len(row["probabilities"]) == len(KEYWORDS)

    # A second version (another seed), judged against the champion with the paired bootstrap on micro-F1.
    sh(["dvc", "exp", "run", "-S", "finetune.seed=1"], root)
    # significance on: the paired test runs; refused (exit 1) or promoted (0), never an error
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "promote": {**params["promote"],
                                                                          "significance": 0.05}}, sort_keys=False))
    res = subprocess.run([*tunepipe, "promote", "--dry-run"], cwd=root, capture_output=True, text=True)
    assert res.returncode in (0, 1), res.stderr
    assert "micro_f1" in res.stdout and "v2" in res.stdout


def test_sweep_tunes_on_validation_micro_f1(ml_project):
    from tunepipe.cli import main as cli

    root = ml_project(multilabel_rows(120), **{"finetune.eval_steps": 2, "finetune.max_steps": 6,
                                                "sweep.trials": 2, "sweep.pruner": "none"})
    for stage in (prepare, tokenize, augment):
        stage.main()
    cli(["sweep", "--no-repro"])
    summary = read_json(root / "reports/sweep/summary.json")
    assert summary["trials"]["complete"] == 2 and 0 <= summary["best"]["value"] <= 1
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    (parent,) = mlflow.search_runs(experiment_names=["tunepipe"], filter_string="tags.`tunepipe.sweep.study` = "
                                   "'tunepipe-sweep'", output_format="list")
    assert parent.data.metrics["best_val_micro_f1"] == summary["best"]["value"]


# ---------------------------------------------------------------------------------------------- GoEmotions

@pytest.mark.skipif(not GOEMOTIONS.is_dir(), reason=f"GoEmotions not found at {GOEMOTIONS} (the shared data lives "
                                                   "beside the project root: ../shared/data/goemotions)")
def test_goemotions_is_read_with_params_alone(ml_project):
    """The real files (header-less TSV, comma-separated ids into labels.txt, dev.tsv as validation) through params
    only; the train split capped to a slice (validation and test are read whole)."""
    root = ml_project(multilabel_rows(20))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=str(GOEMOTIONS), header=["text", "labels", "comment_id"], label_column="labels",
                          label_delimiter=",", label_names=str(GOEMOTIONS / "labels.txt"), max_train_samples=600)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main()
    report = read_json(root / "reports/data.json")
    names = [n.strip() for n in (GOEMOTIONS / "labels.txt").read_text().splitlines() if n.strip()]
    assert len(names) == 28 and report["labels"] == sorted(names)  # the cap keeps every label
    assert report["train_capped_from"] > 40000 and report["splits"]["train"]["rows"] == 600
    for split, published in (("validation", 5426), ("test", 5427)):
        assert 0.98 * published <= report["splits"][split]["rows"] <= published  # less conflicts/duplicates
        assert 1.1 < report["splits"][split]["label_cardinality"] < 1.3  # several labels per text
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    raw = pd.read_csv(GOEMOTIONS / "test.tsv", sep="\t", header=None, names=["text", "ids", "cid"], dtype=str,
                      keep_default_na=False)
    first = raw.iloc[0]
    row = test[test["text"] == first["text"].strip()]
    assert len(row) == 1 and list(row["labels"].iloc[0]) == sorted(names[int(i)] for i in first["ids"].split(","))
    assert any("[NAME]" in t for t in test["text"]) and any('"' in t for t in test["text"])  # quoting survives
