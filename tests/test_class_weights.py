"""finetune.class_weights: balanced and named weights, the weighted loss Trainer trains with (classification and
NER), the data report's imbalance ratio, and a weighted run through finetune, `dvc repro`, a sweep and promote."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.helpers import (
    clone_repo,
    commit_all,
    sh,
    synthetic_rows,
    synthetic_sentences,
    tiny_params,
    write_csv,
    write_tiny_dir,
)
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import parse_params
from tunepipe.tasks import get_task
from tunepipe.training import balanced_weights, build_trainer, class_weights, fingerprint

LABELS = ["negative", "neutral", "positive"]


def imbalanced_rows(n_positive: int = 12) -> list[tuple[str, str]]:
    """60 negative, 60 neutral and `n_positive` positive texts."""
    rows = synthetic_rows(180)
    positive = [r for r in rows if r[1] == "positive"][:n_positive]
    return [r for r in rows if r[1] != "positive"] + positive


def params_with(tiny_model_dir: Path, weights) -> object:
    return parse_params(tiny_params(tiny_model_dir, **{"finetune.class_weights": weights}))


# --- the weights ------------------------------------------------------------------------------------------------

def test_balanced_weights_are_n_over_k_times_count():
    # scikit-learn's `balanced`: n / (k * count) over the classes that occur; one that never does gets 1.0
    assert balanced_weights(np.array([90, 10, 0])) == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 1.0])
    assert balanced_weights(np.array([5, 5])) == pytest.approx([1.0, 1.0])


def test_class_weights_from_params(tiny_model_dir):
    train = datasets.Dataset.from_dict({"labels": [0] * 6 + [1] * 2 + [2] * 2})
    assert class_weights(params_with(tiny_model_dir, "none"), train, LABELS) is None
    assert class_weights(params_with(tiny_model_dir, "balanced"), train, LABELS) == pytest.approx(
        [10 / (3 * 6), 10 / (3 * 2), 10 / (3 * 2)])
    # Named labels get their weight, the others 1.0.
    assert class_weights(params_with(tiny_model_dir, {"positive": 4}), train, LABELS) == [1.0, 1.0, 4.0]


def test_unknown_label_names_the_key_and_the_valid_labels(tiny_model_dir):
    train = datasets.Dataset.from_dict({"labels": [0, 1, 2]})
    with pytest.raises(UserError) as err:
        class_weights(params_with(tiny_model_dir, {"positve": 4.0, "neutral": 2.0}), train, LABELS)
    assert str(err.value) == ("finetune.class_weights: unknown label(s) 'positve'; the labels of this data are: "
                              "negative, neutral, positive (see reports/data.json)")


@pytest.mark.parametrize(("value", "message"), [
    ({"positive": 0}, "the weight of label 'positive' must be a number > 0, got 0"),
    ({"positive": "heavy"}, "the weight of label 'positive' must be a number > 0, got 'heavy'"),
    ("balance", "expected none, balanced or a mapping {label: weight}, got 'balance'"),
])
def test_params_reject_bad_class_weights(tiny_model_dir, value, message):
    with pytest.raises(UserError) as err:
        params_with(tiny_model_dir, value)
    assert str(err.value) == f"params.yaml: finetune.class_weights: {message}"


def test_numeric_label_names_from_yaml_become_text(tiny_model_dir):
    # YAML reads `{1: 5}` with an int key; the labels of a CSV column of 0/1 are the strings "0" and "1".
    p = parse_params(yaml.safe_load(yaml.safe_dump(tiny_params(tiny_model_dir, **{"finetune.class_weights": {1: 5}}))))
    assert p.finetune.class_weights == {"1": 5.0}
    train = datasets.Dataset.from_dict({"labels": [0, 1]})
    assert class_weights(p, train, ["0", "1"]) == [1.0, 5.0]


def test_ner_counts_tagged_tokens_only():
    # -100 marks special tokens and sub-tokens after a word's first: the loss skips them, so do the counts.
    train = datasets.Dataset.from_dict({"labels": [[-100, 0, 1, -100], [-100, 2, 2, -100, 2, -100]]})
    ids = get_task("ner").label_ids(train)
    assert sorted(ids.tolist()) == [0, 1, 2, 2, 2]
    assert balanced_weights(np.bincount(ids, minlength=5)) == pytest.approx([5 / 3, 5 / 3, 5 / 9, 1.0, 1.0])


def test_class_weights_are_part_of_the_training_fingerprint(tiny_model_dir):
    # A run killed with one setting must not resume from checkpoints trained with another.
    prints = {fingerprint(params_with(tiny_model_dir, w), "data") for w in ("none", "balanced", {"positive": 2})}
    assert len(prints) == 3


# --- the loss ---------------------------------------------------------------------------------------------------

def expected_loss(logits: torch.Tensor, labels: torch.Tensor, weights: list[float]) -> float:
    """Weighted cross-entropy by hand: sum_i w[y_i] * -log softmax(x_i)[y_i] / sum_i w[y_i], -100 skipped."""
    logits, labels = logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)
    total = norm = 0.0
    for row, y in zip(logits, labels.tolist(), strict=True):
        if y == -100:
            continue
        total += weights[y] * -float(torch.log_softmax(row, -1)[y])
        norm += weights[y]
    return total / norm


def tiny_splits(tiny_model_dir: Path) -> datasets.DatasetDict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = imbalanced_rows()
    enc = tok([t for t, _ in rows], truncation=True, max_length=32)
    ds = datasets.Dataset.from_dict({**enc, "labels": [LABELS.index(lab) for _, lab in rows],
                                     "length": [len(x) for x in enc["input_ids"]]})
    return datasets.DatasetDict(train=ds, validation=ds.select(range(20)))


def batch_loss(trainer, ds: datasets.Dataset) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The loss Trainer trains with on one batch, with the logits and labels it came from."""
    inputs = trainer.data_collator([{k: ds[i][k] for k in ("input_ids", "attention_mask", "labels")}
                                    for i in range(0, len(ds), 9)])
    labels = inputs["labels"].clone()
    trainer.model.eval()  # no dropout: the logits are the loss's logits
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(trainer.model, dict(inputs), return_outputs=True)
    return float(loss), outputs["logits"], labels


def test_trainer_loss_is_the_weighted_cross_entropy(tiny_model_dir, tmp_path):
    dsd = tiny_splits(tiny_model_dir)
    p = params_with(tiny_model_dir, "balanced")
    weights = class_weights(p, dsd["train"], LABELS)
    assert weights[2] > 4 * weights[0]  # 12 positive texts against 60 of each other class
    trainer = build_trainer(p, dsd, LABELS, str(tmp_path / "w"))
    loss, logits, labels = batch_loss(trainer, dsd["train"])
    assert loss == pytest.approx(expected_loss(logits, labels, weights), rel=1e-5)
    assert loss != pytest.approx(expected_loss(logits, labels, [1.0, 1.0, 1.0]), rel=1e-3)

    # Unweighted: the model's own loss, which is the plain mean.
    plain = build_trainer(params_with(tiny_model_dir, "none"), dsd, LABELS, str(tmp_path / "n"))
    loss, logits, labels = batch_loss(plain, dsd["train"])
    assert loss == pytest.approx(expected_loss(logits, labels, [1.0, 1.0, 1.0]), rel=1e-5)


def test_token_loss_skips_ignored_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    labels = torch.tensor([[-100, 0, 4, 4, -100, -100], [-100, 1, 4, 2, 4, -100]])
    weights = [2.0, 3.0, 0.5, 1.0, 0.25]
    loss = get_task("ner").loss(weights)({"logits": logits}, labels)
    assert float(loss) == pytest.approx(expected_loss(logits, labels, weights), rel=1e-6)


# --- through the stages -----------------------------------------------------------------------------------------

def test_data_report_shows_the_imbalance_ratio(project, capsys):
    from stages import prepare

    root = project()
    write_csv(root / "data/raw/train.csv", imbalanced_rows(12))
    prepare.main()
    report = read_json(root / "reports/data.json")
    counts = report["splits"]["train"]["class_counts"]
    assert report["imbalance_ratio"] == round(max(counts.values()) / min(counts.values()), 2) > 4
    assert f"imbalance {report['imbalance_ratio']:g}:1 (largest/smallest train class)" in capsys.readouterr().out


def test_ner_data_report_shows_the_tag_imbalance(tmp_path, monkeypatch, tiny_model_dir):
    from stages import prepare

    monkeypatch.chdir(tmp_path)
    write_tiny_dir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        tiny_params(tiny_model_dir, **{"task": "ner", "data.source": "data/raw/conll"})))
    prepare.main()
    report = read_json(tmp_path / "reports/data.json")
    tags = Counter(t for row in pd.read_parquet(tmp_path / "data/prepared/train.parquet")["tags"] for t in row)
    assert report["imbalance_ratio"] == round(tags["O"] / min(tags.values()), 2) > 1


def test_finetune_stage_trains_with_balanced_weights_and_records_them(project):
    from stages import augment, finetune, prepare
    from stages import tokenization as tokenize

    root = project(**{"finetune.class_weights": "balanced", "finetune.epochs": 1.0})
    write_csv(root / "data/raw/train.csv", imbalanced_rows(12))
    prepare.main()
    tokenize.main()
    augment.main()
    finetune.main()

    counts = read_json(root / "reports/data.json")["splits"]["train"]["class_counts"]
    n, k = sum(counts.values()), len(counts)
    expected = {label: n / (k * c) for label, c in counts.items()}
    recorded = read_json(root / "reports/train.json")["class_weights"]
    assert recorded == pytest.approx(expected, rel=1e-5)
    assert read_json(root / "models/model/training_info.json")["class_weights"] == recorded

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["tunepipe"], output_format="list")
    assert run.data.params["finetune.class_weights"] == "balanced"
    assert json.loads(run.data.tags["tunepipe.class_weights"]) == recorded


def test_finetune_stage_stops_on_an_unknown_label_before_any_run(project):
    from stages import augment, finetune, prepare
    from stages import tokenization as tokenize

    root = project(**{"finetune.class_weights": {"postive": 3.0}})
    prepare.main()
    tokenize.main()
    augment.main()
    with pytest.raises(UserError, match=r"^finetune.class_weights: unknown label\(s\) 'postive'; the labels of this "
                                        r"data are: negative, neutral, positive"):
        finetune.main()
    assert not (root / "mlflow.db").exists() and not (root / "models").exists()


def test_weighted_repro_sweep_and_promote(tmp_path, tiny_model_dir):
    """`dvc repro`, `tunepipe sweep` and `tunepipe promote` in a clone, with {positive: 3} weights."""
    root = clone_repo(tmp_path / "repo")
    write_csv(root / "data/raw/train.csv", imbalanced_rows(24))
    params = tiny_params(tiny_model_dir, **{"finetune.class_weights": {"positive": 3.0}, "finetune.epochs": 1.0,
                                            "finetune.eval_steps": 2, "sweep.trials": 1, "sweep.batch_size": [16]})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    assert re.search(r"prepare: .*; imbalance [\d.]+:1", sh(["dvc", "repro"], root).stdout)
    assert read_json(root / "reports/train.json")["class_weights"] == {"negative": 1.0, "neutral": 1.0,
                                                                       "positive": 3.0}

    sh([sys.executable, "-m", "tunepipe.cli", "sweep", "--no-repro"], root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    (trial,) = mlflow.search_runs(experiment_names=["tunepipe"], filter_string="tags.`optuna.trial_number` = '0'",
                                  output_format="list")
    assert trial.data.params["finetune.class_weights"] == "{'positive': 3.0}"  # fixed from params, not tuned

    res = subprocess.run([sys.executable, "-m", "tunepipe.cli", "promote"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0 and "PROMOTE" in res.stdout and "no champion yet" in res.stdout, res.stderr


def test_ner_finetune_weighs_tags_by_their_token_counts(tmp_path, monkeypatch, tiny_model_dir):
    from stages import augment, finetune, prepare
    from stages import tokenization as tokenize

    monkeypatch.chdir(tmp_path)
    write_tiny_dir(tmp_path, n_train=60, n_eval=15)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir, **{
        "task": "ner", "data.source": "data/raw/conll", "finetune.class_weights": "balanced",
        "finetune.epochs": 1.0})))
    prepare.main()
    tokenize.main()
    augment.main()
    finetune.main()
    labels = read_json(tmp_path / "data/prepared/meta.json")["labels"]
    train = datasets.load_from_disk(str(tmp_path / "data/augmented"))["train"]
    counts = Counter(t for row in train["labels"] for t in row if t != -100)  # labelled sub-tokens only
    n, k = sum(counts.values()), len(counts)
    expected = {lab: n / (k * counts[i]) if counts[i] else 1.0 for i, lab in enumerate(labels)}
    recorded = read_json(tmp_path / "reports/train.json")["class_weights"]
    assert recorded == pytest.approx(expected, rel=1e-5)
    assert recorded["O"] < 1 < max(recorded.values())  # the common tag weighs less, entity tags more


def test_ner_balanced_weights_through_repro_and_promote(tmp_path, tiny_model_dir):
    """task: ner with balanced weights through `dvc repro` and `tunepipe promote` in a clone: the weights come from
    the tiny CoNLL train file's tag counts, recorded in reports/train.json and on the run the champion came from."""
    root = clone_repo(tmp_path / "repo")
    write_tiny_dir(root, n_train=60, n_eval=15)
    params = tiny_params(tiny_model_dir, **{
        "task": "ner", "data.source": "data/raw/conll", "tracking.model_name": "tunepipe-ner",
        "finetune.class_weights": "balanced", "finetune.epochs": 1.0, "robustness.perturbations": []})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    sh(["dvc", "repro"], root)

    # Expected from the written sentences (eng.train is the train split), not from the pipeline's own counts: one
    # target per word (its first sub-token; max_length 32 truncates none), n / (k * count) over the k tags seen.
    counts = Counter(tag for _, tags in synthetic_sentences(60, seed=1) for tag in tags)
    n, k = sum(counts.values()), len(counts)
    recorded = read_json(root / "reports/train.json")["class_weights"]
    assert {tag: w for tag, w in recorded.items() if tag in counts} == pytest.approx(
        {tag: n / (k * c) for tag, c in counts.items()}, rel=1e-5)
    assert all(w == 1.0 for tag, w in recorded.items() if tag not in counts)  # a tag no train word has
    assert recorded["O"] < 1 < max(recorded.values())  # the common tag weighs less, entity tags more
    info = read_json(root / "models/model/training_info.json")
    assert info["class_weights"] == recorded

    promoted = sh([sys.executable, "-m", "tunepipe.cli", "promote"], root).stdout
    assert promoted.startswith("promote tunepipe-ner: f1") and "PROMOTE: no champion yet" in promoted, promoted
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("tunepipe-ner", "champion")
    assert int(champion.version) == read_json(root / "reports/export.json")["registered"]["version"]
    assert champion.tags["task"] == "ner" and champion.run_id == champion.tags["run_id"] == info["run_id"]
    run = client.get_run(champion.run_id)
    assert run.data.params["finetune.class_weights"] == "balanced"
    assert json.loads(run.data.tags["tunepipe.class_weights"]) == recorded
    assert json.loads(champion.tags["params"])["finetune"]["class_weights"] == "balanced"
