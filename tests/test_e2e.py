"""End to end: `dvc repro` in a `git clone` of the repository, tiny model and data, then the DVC workflow."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
import yaml

from tests.helpers import clone_repo, commit_all, sh, synthetic_rows, tiny_params, write_csv


@pytest.fixture
def repo(tmp_path, tiny_model_dir):
    root = clone_repo(tmp_path / "repo")
    write_csv(root / "data/raw/train.csv", synthetic_rows(150))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir, **{"finetune.epochs": 3.0}),
                                                     sort_keys=False))
    commit_all(root)
    return root


def test_dvc_repro_end_to_end(repo):
    res = sh(["dvc", "repro"], repo)
    out = res.stdout
    for stage in ("prepare", "tokenize", "augment", "finetune", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    # A terminal a person can read: one summary per stage, no per-step dicts, no library chatter.
    for summary in ("prepare: train=", "tokenize: max_length=", "finetune: best validation macro_f1",
                    "evaluate: test macro_f1", "export: fp32 max |diff|"):
        assert summary in out, summary
    for noise in ("{'loss'", "{'eval_", "torchvision", "FutureWarning", "UserWarning", "LOAD REPORT",
                  "Loading weights", "pre-processing before quantization", "Traceback"):
        assert noise not in out + res.stderr, noise

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1 and metrics["n_test"] > 0
    for row in metrics["per_class"].values():
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["f1"] <= 1
    export = json.loads((repo / "reports/export.json").read_text())
    assert export["fp32_max_abs_logit_diff"] <= export["parity_tolerance"]
    for path in ("models/model/model.safetensors", "models/onnx/model.onnx", "models/onnx/model.int8.onnx",
                 "reports/plots/confusion_matrix.png", "reports/plots/confusion.csv",
                 "reports/plots/train_loss.csv", "reports/plots/validation.csv", "reports/data.json"):
        assert (repo / path).is_file(), path

    # The exported model labels raw text from the command line.
    res = sh([sys.executable, "-m", "tunepipe.cli", "predict", "what a great flight", "--json"], repo)
    row = json.loads(res.stdout.splitlines()[0])
    assert row["label"] in {"negative", "neutral", "positive"}
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
    bad = subprocess.run([sys.executable, "-m", "tunepipe.cli", "predict", "x", "--model", "nowhere"], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model: nowhere is not an exported model")

    # Every file the pipeline wrote is either DVC's (git-ignored through DVC's own .gitignore entries) or a small
    # committed metric/plot of the baseline run: nothing is left for a user to wonder about.
    status = sh(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout.splitlines()
    assert not [line for line in status if line.startswith("??")], status
    assert "dvc.lock" in {line[3:] for line in status}  # the committed baseline's lock, updated by this run

    again = sh(["dvc", "repro"], repo).stdout
    assert "Running stage" not in again
    assert "up to date" in again.lower()

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='tunepipe-classifier'")
    assert len(versions) == 1 and versions[0].tags["git_commit"]

    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert shown  # DVC sees the declared metrics

    # A finetune param change re-runs finetune, evaluate and export only.
    exp = sh(["dvc", "exp", "run", "-S", "finetune.learning_rate=0.002"], repo).stdout
    ran = {s for s in ("prepare", "tokenize", "augment", "finetune", "evaluate", "export")
           if f"Running stage '{s}'" in exp}
    assert ran == {"finetune", "evaluate", "export"}
    assert len(client.search_model_versions("name='tunepipe-classifier'")) == 2
    table = sh(["dvc", "exp", "show", "--json"], repo).stdout
    assert "0.002" in table
