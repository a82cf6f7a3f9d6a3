"""Sweeps: pruning and reports, resume after a killed worker, parallel workers on PostgreSQL, bad input, apply."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.helpers import REPO, clone_repo, synthetic_rows, write_csv
from tunepipe.cli import main as cli
from tunepipe.params import load_params
from tunepipe.sweep import runner as sweep_runner
from tunepipe.sweep import study as sweep_study

STUDY = "tunepipe-sweep"
# Tiny trials: 120 train rows, 2 epochs, an evaluation every 2 steps.
SWEEP = {"finetune.eval_steps": 2, "finetune.epochs": 2.0,
         "sweep.learning_rate": [1e-6, 2e-2], "sweep.batch_size": [16, 32], "sweep.dropout": [0.0, 0.2],
         "sweep.heartbeat_interval": 1, "sweep.pruner_startup_trials": 2}
GOOD = {"learning_rate": 1e-2, "batch_size": 16, "dropout": 0.0}  # learns the keywords within 3 epochs
OTHER = {"learning_rate": 5e-3, "batch_size": 32, "dropout": 0.2}
BAD = {"learning_rate": 1e-6, "batch_size": 16, "dropout": 0.0}  # too small to move off the constant-class F1


@pytest.fixture(autouse=True)
def own_tracking_store():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: keep one test's store out of the next test."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def sweep_project(project):
    """A project with tiny data already through prepare/tokenize/augment (sweeps run with --no-repro)."""

    def make(**overrides) -> Path:
        root = project(150, **{**SWEEP, **overrides})
        from stages import augment, prepare
        from stages import tokenization as tokenize

        prepare.main()
        tokenize.main()
        augment.main()
        return root.resolve()

    return make


def storage_of(root: Path) -> str:
    return f"sqlite:///{root / 'optuna.db'}"


def mlflow_runs(root: Path, tag: str, value: str) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["tunepipe"], filter_string=f"tags.`{tag}` = '{value}'",
                              output_format="list")


def worker_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def finished(study: optuna.Study) -> list:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_sweep_prunes_a_clearly_worse_trial_and_reports(sweep_project):
    root = sweep_project(**{"finetune.epochs": 3.0})
    # Two trials that complete unpruned (pruner_startup_trials=2), then one whose learning rate cannot learn:
    # the median of the first two rises above the constant-class F1 mid-training, so the median pruner must stop it.
    seeded = optuna.create_study(study_name=STUDY, storage=storage_of(root), direction="maximize")
    for params in (GOOD, OTHER, BAD):
        seeded.enqueue_trial(params)
    cli(["sweep", "--no-repro", "--trials", "3"])

    study = optuna.load_study(study_name=STUDY, storage=storage_of(root))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    good, other, bad = study.trials
    assert bad.params == BAD and bad.user_attrs["epochs_run"] < 3.0  # stopped before its last epoch
    assert good.user_attrs["epochs_run"] == 3.0 and other.user_attrs["epochs_run"] == 3.0
    step = max(bad.intermediate_values)
    others = [t.intermediate_values[step] for t in (good, other) if step in t.intermediate_values]
    assert max(bad.intermediate_values.values()) < sum(others) / len(others)  # why the pruner stopped it

    out = root / "reports/sweep"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"complete": 2, "pruned": 1, "fail": 0, "running": 0, "waiting": 0, "surplus": 0}
    best = max((good, other), key=lambda t: t.value)
    assert summary["best"] == {"value": best.value, "trial": best.number, "params": best.params}
    assert yaml.safe_load((out / "best_params.yaml").read_text()) == {"finetune": best.params}
    assert summary["trial_epochs"] == pytest.approx(sum(t.user_attrs["epochs_run"] for t in study.trials))
    assert set(summary["param_importances"]) == {"learning_rate", "batch_size", "dropout"}
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert "plotly.min.js" in (out / f"{name}.html").read_text(), name
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # the pages open offline

    (parent,) = mlflow_runs(root, "tunepipe.sweep.study", STUDY)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_pruned"] == 1 and parent.data.metrics["best_val_macro_f1"] == best.value
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in mlflow_runs(root, "optuna.study", STUDY)}
    assert sorted(runs) == [0, 1, 2]
    client = mlflow.MlflowClient()
    for t in study.trials:
        run = runs[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.trial_state"] == t.state.name.lower()
        assert float(run.data.params["finetune.learning_rate"]) == t.params["learning_rate"]
        assert int(run.data.params["finetune.batch_size"]) == t.params["batch_size"]
        curve = client.get_metric_history(run.info.run_id, "val_macro_f1")
        assert [m.value for m in sorted(curve, key=lambda m: m.step)] == [
            t.intermediate_values[s] for s in sorted(t.intermediate_values)]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_sweep_resumes_and_retries_the_dead_trial(sweep_project):
    root = sweep_project(**{"sweep.pruner": "none", "finetune.epochs": 3.0})  # 6-12 evaluations per trial
    url = storage_of(root)
    log = (root / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "sweep", "--no-repro", "--trials", "2"], cwd=root,
                            env=worker_env(), stdout=log, stderr=subprocess.STDOUT)
    # Kill the worker (no chance to clean up) once one trial is done and the next has reported an evaluation.
    deadline, victim, storage = time.time() + 300, None, None
    try:
        while victim is None:
            assert proc.poll() is None and time.time() < deadline, (root / "worker.log").read_text()[-3000:]
            time.sleep(0.05)
            try:  # read only: the worker creates the tables and the study
                storage = storage or optuna.storages.RDBStorage(url, skip_table_creation=True,
                                                                skip_compatibility_check=True)
                trials = optuna.load_study(study_name=STUDY, storage=storage).trials
            except Exception:  # not created yet
                continue
            running = [t for t in trials if t.state == TrialState.RUNNING and 1 <= len(t.intermediate_values) <= 2]
            if running and any(t.state == TrialState.COMPLETE for t in trials):
                os.kill(proc.pid, signal.SIGKILL)
                victim = running[0]
    finally:
        proc.kill()
        proc.wait()
        log.close()
    study = optuna.load_study(study_name=STUDY, storage=url)
    assert study.trials[victim.number].state == TrialState.RUNNING  # left behind by the dead worker

    # The same command again: the dead trial holds the last slot until its heartbeat is stale (2 s), then its
    # retry runs here.
    cli(["sweep", "--no-repro", "--trials", "2"])

    study = optuna.load_study(study_name=STUDY, storage=url)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # no duplicates, no gaps
    assert len(finished(study)) == 2 and all(t.state == TrialState.COMPLETE for t in finished(study))
    assert study.trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in study.trials
                if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert json.loads((root / "reports/sweep/summary.json").read_text())["trials"]["complete"] == 2

    # MLflow: two invocations, each trial logged once; the dead trial's run is closed as failed.
    assert len(mlflow_runs(root, "tunepipe.sweep.study", STUDY)) == 2
    runs = [(int(r.data.tags["optuna.trial_number"]), r) for r in mlflow_runs(root, "optuna.study", STUDY)]
    assert sorted(n for n, _ in runs) == numbers
    dead = dict(runs)[victim.number]
    assert dead.info.status == "FAILED" and dead.data.tags["optuna.trial_state"] == "fail"


@pytest.fixture
def pg_database():
    """A fresh PostgreSQL database, dropped afterwards."""
    import psycopg2

    name = f"tunepipe_sweep_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="root", dbname="test")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://root@127.0.0.1:5432/{name}"
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def test_three_workers_share_one_postgres_study(sweep_project, pg_database):
    # A longer heartbeat than the other tests: on a loaded machine a worker may stall for a second or two.
    root = sweep_project(**{"finetune.epochs": 1.0, "sweep.heartbeat_interval": 5, "sweep.pruner": "hyperband"})
    cmd = [sys.executable, "-m", "tunepipe.cli", "sweep", "--no-repro", "--trials", "6", "--storage", pg_database,
           "--study", "shared"]
    logs = [root / f"worker{i}.log" for i in range(3)]
    procs = []
    for path in logs:
        with path.open("w") as fh:
            procs.append(subprocess.Popen(cmd, cwd=root, env=worker_env(), stdout=fh, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=500) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0, 0], "\n".join(p.read_text()[-2000:] for p in logs)

    study = optuna.load_study(study_name="shared", storage=sweep_study.open_storage(pg_database, 5))
    done = finished(study)
    assert len(done) == 6  # exactly the requested number, across workers
    assert len({t.params["learning_rate"] for t in done}) == 6  # workers did not draw the same trials
    # Anything else is a surplus trial (never run) or one failed as stale by a worker that then ran its retry.
    for t in study.trials:
        if t not in done:
            assert t.state == TrialState.FAIL, t
            assert t.user_attrs.get(sweep_study.SURPLUS_ATTR) or sweep_runner.taken_over(study, t.number), t

    parents = mlflow_runs(root, "tunepipe.sweep.study", "shared")
    assert len(parents) == 3 and {p.info.status for p in parents} == {"FINISHED"}
    runs = mlflow_runs(root, "optuna.study", "shared")
    logged = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs)
    assert logged == sorted(t.number for t in study.trials if not t.user_attrs.get(sweep_study.SURPLUS_ATTR))
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} <= {p.info.run_id for p in parents}
    states = {int(r.data.tags["optuna.trial_number"]): r.data.tags["optuna.trial_state"] for r in runs}
    assert all(states[t.number] == t.state.name.lower() for t in study.trials if t.number in states)


def test_bad_input_exits_2_and_keeps_the_study(sweep_project, capsys):
    root = sweep_project()
    p = load_params()
    url = storage_of(root)
    space = sweep_study.search_space(p.sweep, "macro_f1")
    setup = sweep_study.trial_setup(p, json.loads((root / "data/prepared/meta.json").read_text())["data_hash"])
    study, created, _ = sweep_study.open_study(sweep_study.open_storage(url, 1), STUDY, p.sweep, space, setup,
                                               optuna.pruners.NopPruner())
    assert created
    study.add_trial(optuna.trial.create_trial(
        params=GOOD, value=0.5, distributions={
            "learning_rate": optuna.distributions.FloatDistribution(1e-6, 2e-2, log=True),
            "batch_size": optuna.distributions.CategoricalDistribution([16, 32]),
            "dropout": optuna.distributions.FloatDistribution(0.0, 0.2)}))

    def fails(argv: list[str], message: str, edit: dict | None = None) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        for key, value in (edit or {}).items():
            section, name = key.split(".")
            params[section][name] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(SystemExit) as exc:
            cli(["sweep", "--no-repro", *argv])
        # (the tiny model is a local directory: tokenize's warning that DVC does not track it may come first)
        err = "".join(x for x in capsys.readouterr().err.splitlines(True) if not x.startswith("warning: model.name"))
        assert exc.value.code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err

    fails(["--trials", "0"], "--trials: must be a positive number of trials, got 0")
    fails(["--storage", "postgresql://root@127.0.0.1:1/nowhere"],
          "sweep.storage: cannot connect to postgresql")
    fails(["--storage", "not a url"], "sweep.storage: 'not a url' is not a database URL")
    fails([], "sweep: study 'tunepipe-sweep' was created with another search space (dropout [0.0, 0.2] -> [0.0, 0.5])",
          {"sweep.dropout": [0.0, 0.5]})
    fails([], "sweep: study 'tunepipe-sweep' was created with another trial setup (finetune.epochs 2.0 -> 3.0)",
          {"sweep.dropout": [0.0, 0.2], "finetune.epochs": 3.0})
    fails([], "params.yaml: sweep.dropout: range must be", {"finetune.epochs": 2.0, "sweep.dropout": [0.3, 0.3]})
    fails([], "params.yaml: sweep.learning_rate: range must be",
          {"sweep.dropout": [0.0, 0.2], "sweep.learning_rate": [1e-2, 1e-4]})
    fails(["apply", "--study", "nope"], "--study: no study 'nope'", {"sweep.learning_rate": [1e-6, 2e-2]})

    after = optuna.load_study(study_name=STUDY, storage=url)
    assert [(t.state, t.params, t.value) for t in after.trials] == [(TrialState.COMPLETE, GOOD, 0.5)]
    assert after.user_attrs[sweep_study.SPACE_ATTR] == space and after.user_attrs[sweep_study.SETUP_ATTR] == setup
    assert not (root / "mlflow.db").exists()  # rejected before any run was opened


def test_apply_changes_exactly_the_tuned_keys(tmp_path, tiny_model_dir, monkeypatch):
    root = clone_repo(tmp_path / "repo").resolve()
    write_csv(root / "data/raw/train.csv", synthetic_rows(150))
    # The repository's own params.yaml text (comments, nulls, layout), pointed at the tiny model and data.
    text = (REPO / "params.yaml").read_text()
    for pattern, repl in ((r"^  source: .*$", "  source: data/raw/train.csv"),
                          (r"^  name: builtin:.*$", f"  name: {tiny_model_dir}"),
                          (r"^  max_length: \d+$", "  max_length: 32"),
                          (r"^  epochs: .*$", "  epochs: 1.0"),
                          (r"^  eval_steps: \d+$", "  eval_steps: 2"),
                          (r"^  batch_size: \d+$", "  batch_size: 8"),  # not a choice: the trial's must differ
                          (r"^  dropout: ([0-9.]+)$", r"  dropout: \1              # kept by apply")):
        text, n = re.subn(pattern, repl, text, flags=re.M)
        assert n == 1, pattern
    (root / "params.yaml").write_text(text)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, check=True, env={**os.environ, **env})
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.chdir(root)
    before = (root / "params.yaml").read_text().splitlines()

    cli(["sweep", "--trials", "1", "--apply"])  # runs `dvc repro augment` first, then one trial

    assert (root / "data/augmented/dataset_dict.json").is_file()
    best = optuna.load_study(study_name=STUDY, storage=storage_of(root)).best_trial.params
    after = (root / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert sorted(b.split(":")[0].strip() for _, b in changed) == ["batch_size", "dropout", "learning_rate"]
    assert [b for _, b in changed if "dropout" in b][0].endswith("# kept by apply")
    ft = load_params().finetune
    assert (ft.learning_rate, ft.batch_size, ft.dropout) == (best["learning_rate"], best["batch_size"],
                                                             best["dropout"])
    diff = json.loads(subprocess.run([sys.executable, "-m", "dvc", "params", "diff", "--json"], cwd=root,
                                     check=True, capture_output=True, text=True).stdout)
    assert sorted(diff["params.yaml"]) == ["finetune.batch_size", "finetune.dropout", "finetune.learning_rate"]

    # `tunepipe sweep apply` writes the study's best without running trials.
    (root / "params.yaml").write_text("\n".join(before) + "\n")
    cli(["sweep", "apply"])
    assert (root / "params.yaml").read_text().splitlines() == after
