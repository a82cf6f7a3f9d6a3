"""Queued DVC experiments run in parallel (`dvc exp run --queue`, `dvc queue start --jobs 2`): each one runs in a
temporary copy of the project, yet records its MLflow run and registry version in the project's own store."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.helpers import clone_repo, commit_all, sh, synthetic_rows, tiny_params, write_csv
from tunepipe.paths import project_root

RATES = (0.001, 0.002, 0.01)  # none equal to the baseline's 5e-3: DVC would find nothing to run for it
QUEUE_TIMEOUT_S = 900


def test_project_root_is_the_project_inside_a_dvc_temp_copy(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc/tmp/exps/tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.chdir(copy)
    assert project_root() == project.resolve()
    from tunepipe.params import TrackingParams
    from tunepipe.tracking import tracking_uri

    assert tracking_uri(TrackingParams()) == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    # A plain `dvc repro` sets DVC_ROOT to the directory it runs in; elsewhere the working directory is the project.
    monkeypatch.chdir(project)
    assert project_root() == project.resolve()
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert project_root() == other.resolve()
    monkeypatch.delenv("DVC_ROOT")
    assert project_root() == other.resolve()


def _queue_rows(root: Path) -> list[list[str]]:
    """`dvc queue status` as rows (Task, Name, Created, Status), without the header and the worker line."""
    out = sh(["dvc", "queue", "status"], root).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return [r for r in rows if r and r[0] != "Task" and not r[0].startswith("Worker")]


def _stop_workers(root: Path) -> None:
    """No worker or experiment process may outlive the test: ask DVC, then end the processes it recorded."""
    import subprocess

    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=root, capture_output=True, timeout=60)
    for pidfile in (root / ".dvc/tmp").rglob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if "dvc" in cmdline:  # still the process DVC recorded, not a reused pid
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_queued_experiments_in_parallel_record_every_run(tmp_path, tiny_model_dir):
    root = clone_repo(tmp_path / "repo")
    write_csv(root / "data/raw/train.csv", synthetic_rows(90))
    params = tiny_params(tiny_model_dir, **{"finetune.epochs": 1.0, "robustness.perturbations": [],
                                            "explain.examples_per_class": 0})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    t_base = time.monotonic()
    sh(["dvc", "repro"], root)  # the baseline: its data stages are then reused by every experiment
    print(f"baseline dvc repro: {time.monotonic() - t_base:.0f}s")
    commit_all(root, "baseline")

    for lr in RATES:
        sh(["dvc", "exp", "run", "--queue", "-S", f"finetune.learning_rate={lr}"], root)
    t0 = time.monotonic()
    try:
        sh(["dvc", "queue", "start", "--jobs", "2"], root)
        while True:
            rows = _queue_rows(root)
            if rows and all(r[-1] not in ("Queued", "Running") for r in rows):
                break
            assert time.monotonic() - t0 < QUEUE_TIMEOUT_S, f"queue not done after {QUEUE_TIMEOUT_S}s: {rows}"
            time.sleep(5)
        took = time.monotonic() - t0
    finally:
        _stop_workers(root)
    print(f"3 queued experiments, --jobs 2: {took:.0f}s")
    assert len(rows) == 3 and all(r[-1] == "Success" for r in rows), rows

    shown = json.loads(sh(["dvc", "exp", "show", "--json"], root).stdout)
    exps = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                lr = data["params"]["params.yaml"]["data"]["finetune"]["learning_rate"]
                metrics = data["metrics"]["reports/metrics.json"]["data"]
                exps[rev["name"]] = (lr, metrics["macro_f1"])
    assert sorted(lr for lr, _ in exps.values()) == list(RATES), exps

    # Every experiment's run and registry version are in the project's store, tagged with the experiment name.
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tunepipe").experiment_id])
    tagged = {r.data.tags.get("tunepipe.dvc_experiment"): r for r in runs if r.data.tags.get("tunepipe.dvc_experiment")}
    assert set(tagged) == set(exps), (set(tagged), set(exps))
    for name, run in tagged.items():
        assert float(run.data.params["finetune.learning_rate"]) == exps[name][0]
        assert run.data.metrics["test_macro_f1"] == pytest.approx(exps[name][1])
        assert run.info.run_name == name
    assert len(runs) == 4  # and the baseline's

    versions = client.search_model_versions("name='tunepipe-classifier'")
    by_exp = {v.tags.get("dvc_experiment"): v for v in versions}
    assert set(by_exp) == set(exps) | {None}
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    for name, version in by_exp.items():
        if name is not None:
            assert version.run_id == tagged[name].info.run_id
            # The model's files live in the project's artifact store, not in a temporary copy DVC deleted.
            local = mlflow.artifacts.download_artifacts(f"models:/tunepipe-classifier/{version.version}",
                                                        dst_path=str(tmp_path / f"v{version.version}"))
            assert (Path(local) / "artifacts").is_dir()
    assert not list((root / ".dvc/tmp/exps").glob("tmp*")), "a temporary experiment copy was left behind"

    # `dvc exp apply` brings one experiment's params and outputs into the workspace.
    best = max(exps, key=lambda n: exps[n][1])
    sh(["dvc", "exp", "apply", best], root)
    assert yaml.safe_load((root / "params.yaml").read_text())["finetune"]["learning_rate"] == exps[best][0]
