"""Queued experiments in parallel (issue 15): `dvc exp run --queue -S ...` then `dvc queue start --jobs 2`. DVC runs
each experiment in a temporary copy of the project (.dvc/tmp/exps/<tmp>/), yet each records its own MLflow run
and registry version in the project's store, and no job writes another's files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.helpers import queue_project, run_queue, sh
from tunepipe.params import TrackingParams
from tunepipe.paths import project_root
from tunepipe.sweep.study import default_storage
from tunepipe.tracking import tracking_uri

RATES = (0.001, 0.002, 0.01)  # none is the baseline's 5e-3: DVC would find nothing to run for that one
QUEUE_TIMEOUT_S = 900


def test_stores_resolve_to_the_project_inside_a_dvc_temp_copy(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc/tmp/exps/tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets for a queued experiment's stages
    monkeypatch.chdir(copy)
    assert project_root() == project.resolve()
    assert tracking_uri(TrackingParams()) == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    assert default_storage() == f"sqlite:///{project.resolve() / 'optuna.db'}"
    # `dvc repro` sets DVC_ROOT to the directory it runs in; elsewhere the working directory is the project.
    monkeypatch.chdir(project)
    assert project_root() == project.resolve()
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert project_root() == other.resolve()
    monkeypatch.delenv("DVC_ROOT")
    assert project_root() == other.resolve()


def _experiments(root: Path) -> dict[str, dict]:
    """`dvc exp show`: experiment name -> its learning rate and test metrics."""
    found = {}
    for baseline in json.loads(sh(["dvc", "exp", "show", "--json"], root).stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "lr": data["params"]["params.yaml"]["data"]["finetune"]["learning_rate"],
                    "metrics": data["metrics"]["reports/metrics.json"]["data"],
                }
    return found


def _sha(path: Path) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return hashlib.sha256(b"".join(str(f.relative_to(path)).encode() + f.read_bytes() for f in files)).hexdigest()


@pytest.mark.slow
@pytest.mark.soak
def test_queued_experiments_in_parallel_each_record_their_own_run(tmp_path, tiny_model_dir):
    root = queue_project(tmp_path, tiny_model_dir)  # the baseline: every experiment reuses its data stages
    workspace = {p: _sha(root / p) for p in ("reports", "models/model", "models/onnx", "models/checkpoints")}

    for lr in RATES:
        sh(["dvc", "exp", "run", "--queue", "-S", f"finetune.learning_rate={lr}"], root)
    rows, took = run_queue(root, jobs=2, timeout=QUEUE_TIMEOUT_S)
    print(f"{len(RATES)} queued experiments, --jobs 2: {took:.0f}s")
    # Workers started at the same instant race on the filesystem broker's exchange file, and one can die at start-up
    # (JSONDecodeError; a known DVC/kombu race, treeverse/dvc-task#73): the queue then runs serially. Seen once on 2
    # busy cores. Everything below but the overlap still holds then; the overlap is checked whenever both lived.
    died = [log.name for log in (root / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.out")
            if "Unrecoverable error" in log.read_text(errors="replace")]
    assert len(rows) == len(RATES) and all(r[-1] == "Success" for r in rows), rows

    exps = _experiments(root)
    assert sorted(e["lr"] for e in exps.values()) == list(RATES), exps

    # Each experiment has its own run in the project's store, named and tagged after it, with its own params and
    # the metrics `dvc exp show` shows for it; and two of them ran at the same time.
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tunepipe").experiment_id])
    assert len(runs) == len(RATES) + 1, [r.info.run_name for r in runs]  # and the baseline's
    tagged = {r.data.tags["tunepipe.dvc_experiment"]: r for r in runs if "tunepipe.dvc_experiment" in r.data.tags}
    assert set(tagged) == set(exps), (set(tagged), set(exps))
    for name, run in tagged.items():
        assert run.info.run_name == name and run.info.status == "FINISHED"
        assert float(run.data.params["finetune.learning_rate"]) == exps[name]["lr"]
        assert run.data.metrics["test_macro_f1"] == pytest.approx(exps[name]["metrics"]["macro_f1"])
    spans = sorted((r.info.start_time, r.info.end_time) for r in tagged.values())
    overlapped = any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    assert overlapped or died, f"no two jobs overlapped, though both workers started: {spans}"
    if died:
        print(f"DVC's start-up race killed {died}: the experiments ran one at a time (overlap not checked)")

    # Each has its own registry version, its model in the project's artifact store (not in a deleted temp copy).
    versions = client.search_model_versions("name='tunepipe-classifier'")
    assert sorted(int(v.version) for v in versions) == list(range(1, len(RATES) + 2))
    by_exp = {v.tags.get("dvc_experiment"): v for v in versions}
    assert set(by_exp) == set(exps) | {None}
    for name in exps:
        version = by_exp[name]
        assert version.run_id == tagged[name].info.run_id
        local = Path(mlflow.artifacts.download_artifacts(f"models:/tunepipe-classifier/{version.version}"))
        assert (local / "artifacts").is_dir()
    artifact_dirs = {Path(r.info.artifact_uri.removeprefix("file://")) for r in tagged.values()}
    assert len(artifact_dirs) == len(RATES)
    assert all(d.is_relative_to(root.resolve() / "mlartifacts") for d in artifact_dirs), artifact_dirs

    # No job wrote another's files, nor the workspace's: the baseline's outputs are untouched, the stores exist
    # only in the project, no temporary copy is left, and each experiment's outputs (model, checkpoints state,
    # reports) belong to its own run.
    assert {p: _sha(root / p) for p in workspace} == workspace
    assert not list((root / ".dvc/tmp/exps").glob("tmp*")), "a temporary experiment copy was left behind"
    assert not (root / "optuna.db").exists()
    for name in exps:
        sh(["dvc", "exp", "apply", name], root)
        run_id = tagged[name].info.run_id
        assert json.loads((root / "models/model/training_info.json").read_text())["run_id"] == run_id
        assert json.loads((root / "models/checkpoints/state.json").read_text())["run_id"] == run_id
        assert json.loads((root / "reports/metrics.json").read_text()) == exps[name]["metrics"]
        assert json.loads((root / "reports/export.json").read_text())["registered"]["version"] == \
            int(by_exp[name].version)
        assert yaml.safe_load((root / "params.yaml").read_text())["finetune"]["learning_rate"] == exps[name]["lr"]
