"""Faults around tracking and sweeps: a tracking store that does not answer stops a stage or command in seconds with
what to do (not after minutes of retries and a traceback), and a sweep trial that raises fails that trial only."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from transformers import TrainerCallback

import tunepipe.training
from tunepipe.cli import main as cli
from tunepipe.errors import UserError, run_main

STUDY = "tunepipe-sweep"
SWEEP = {"finetune.eval_steps": 2, "finetune.epochs": 1.0, "sweep.pruner": "none", "sweep.heartbeat_interval": 1,
         "sweep.learning_rate": [1e-3, 2e-2], "sweep.batch_size": [16, 32], "sweep.dropout": [0.0, 0.2]}
LOCAL = "the project's local sqlite store (mlflow.db)"
BUILD_TRAINER = tunepipe.training.build_trainer


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_tracking_uri(root: Path, uri: str | None) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["uri"] = uri
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def fails_fast(run, capsys, message: str, limit_s: float = 20.0) -> str:
    """`run` exits 2 within `limit_s` with one `error:` line starting with `message`; returns that line."""
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        run()
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert took < limit_s, f"took {took:.0f}s: {err}"
    # (the tiny model is a local directory: tokenize's warning that DVC does not track it may come first)
    lines = [x for x in err.strip().splitlines() if not x.startswith("warning: model.name")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), err
    assert "Traceback" not in err and "s3cret" not in err
    return lines[0]


@pytest.fixture
def prepared(project):
    """A project with tiny data through prepare/tokenize/augment (what finetune and sweeps start from)."""

    def make(**overrides) -> Path:
        root = project(150, **overrides)
        from stages import augment, prepare
        from stages import tokenization as tokenize

        prepare.main()
        tokenize.main()
        augment.main()
        return root.resolve()

    return make


# ---------------------------------------------------------------------------------------------- unreachable store

def test_stages_and_sweep_stop_in_seconds_when_the_tracking_server_does_not_answer(prepared, capsys):
    from stages import evaluate, export, finetune

    root = prepared(**SWEEP)
    port = closed_port()
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    set_tracking_uri(root, uri)
    shown = f"http://alice:***@127.0.0.1:{port}"
    message = (f"tracking.uri: cannot reach the MLflow tracking server at {shown} (Connection refused); start it "
               f"(or fix tracking.uri), or set tracking.uri: null in params.yaml to use {LOCAL}")

    # Before training: no checkpoint, no model, no MLflow store written.
    assert fails_fast(lambda: run_main(finetune.main), capsys, message) == f"error: {message}"
    assert not list((root / "models").glob("**/checkpoint-*")) and not (root / "models/model").exists()
    assert not (root / "mlflow.db").exists()
    # The sweep says so before it creates its study.
    fails_fast(lambda: cli(["sweep", "--no-repro", "--trials", "1"]), capsys, message)
    assert not (root / "optuna.db").exists()

    # With the local store the model trains; then evaluate and export stop before their work, not after it.
    set_tracking_uri(root, None)
    run_main(finetune.main)
    capsys.readouterr()
    set_tracking_uri(root, uri)
    fails_fast(lambda: run_main(evaluate.main), capsys, message)
    assert not (root / "reports/metrics.json").exists()
    fails_fast(lambda: run_main(export.main), capsys, message)
    assert not (root / "models/onnx").exists()


@pytest.mark.parametrize("where", ["params", "env"])
def test_promote_and_models_stop_in_seconds_when_the_tracking_server_does_not_answer(project, capsys, monkeypatch,
                                                                                      where):
    root = project(30)
    uri = f"http://alice:s3cret@127.0.0.1:{closed_port()}"
    if where == "params":
        set_tracking_uri(root, uri)
        key, local = "tracking.uri", "set tracking.uri: null in params.yaml"
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        key, local = "MLFLOW_TRACKING_URI", "unset MLFLOW_TRACKING_URI"
    message = (f"{key}: cannot reach the MLflow tracking server at {uri.replace('s3cret', '***')} (Connection "
               f"refused); start it (or fix {key}), or {local} to use {LOCAL}")
    for argv in (["promote"], ["models"], ["registry", "list"], ["promote", "--rollback"]):
        assert fails_fast(lambda argv=argv: cli(argv), capsys, message) == f"error: {message}; nothing was changed"


def test_a_tracking_database_that_does_not_answer_fails_fast(project, capsys):
    root = project(30)
    port = closed_port()
    set_tracking_uri(root, f"postgresql://alice:s3cret@127.0.0.1:{port}/mlflow")
    line = fails_fast(lambda: cli(["models"]), capsys,
                      f"tracking.uri: cannot reach the MLflow tracking database at "
                      f"postgresql://alice:***@127.0.0.1:{port}/mlflow (")
    assert "Connection refused" in line and line.endswith(
        f"or set tracking.uri: null in params.yaml to use {LOCAL}; nothing was changed")


def test_a_reachable_store_passes_the_check(project):
    """The check must not refuse what works: the default local store, and a file store."""
    from tunepipe import tracking
    from tunepipe.params import load_params

    root = project(30)
    p = load_params()
    assert tracking.check_reachable(p.tracking) == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    tracking.setup(p.tracking)
    assert (root / "mlflow.db").is_file()


def test_a_server_lost_after_the_check_fails_within_a_minute(monkeypatch, tmp_path):
    """The server answers the pre-flight check, then every request gets 503 (a server gone behind its proxy):
    MLflow's default retries would keep the stage waiting for minutes; tracking.setup's bound them."""
    import http.server
    import threading

    from tunepipe import tracking
    from tunepipe.params import TrackingParams

    for var in tracking.HTTP_RETRIES:
        monkeypatch.delenv(var, raising=False)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self._answer(200, b'{"experiment": {"experiment_id": "1", "name": "tunepipe"}}')

        def do_POST(self):
            self._answer(503, b"unavailable")

        def _answer(self, code, body):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.setup(TrackingParams(uri=f"http://127.0.0.1:{server.server_port}"))
        t0 = time.monotonic()
        with pytest.raises(mlflow.exceptions.MlflowException):
            mlflow.MlflowClient().create_run("1")
        assert time.monotonic() - t0 < 60
    finally:
        server.shutdown()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # the user's own setting wins
    tracking.setup(TrackingParams(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


# ---------------------------------------------------------------------------------------------- failing trials

def inject(monkeypatch, failing: set[int] | None, exc: Exception) -> None:
    """Trials numbered in `failing` (all, for None) raise `exc` at their third optimizer step."""
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise exc

    def build_trainer(p, dsd, labels, output_dir, *args, **kwargs):
        trainer = BUILD_TRAINER(p, dsd, labels, output_dir, *args, **kwargs)
        number = int(re.search(r"tunepipe-trial-(\d+)-", output_dir).group(1))
        if failing is None or number in failing:
            trainer.add_callback(Boom())
        return trainer

    monkeypatch.setattr(tunepipe.training, "build_trainer", build_trainer)


def trial_runs(root: Path) -> dict[int, mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tunepipe"], filter_string=f"tags.`optuna.study` = '{STUDY}'",
                              output_format="list")
    return {int(r.data.tags["optuna.trial_number"]): r for r in runs}


def test_a_trial_that_raises_fails_alone_and_the_sweep_goes_on(prepared, monkeypatch, capfd):
    root = prepared(**SWEEP)
    inject(monkeypatch, {1}, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(more detail)"))
    cli(["sweep", "--no-repro", "--trials", "2"])  # returns: exit 0

    err = capfd.readouterr().err
    assert "sweep: trial 1 failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n" in err
    assert "Traceback" not in err and "failed with value None" not in err
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{root / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    summary = json.loads((root / "reports/sweep/summary.json").read_text())
    assert summary["trials"]["complete"] == 2 and summary["trials"]["fail"] == 1
    assert summary["failures"] == [{"trial": 1, "params": study.trials[1].params,
                                    "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}]
    runs = trial_runs(root)
    assert runs[1].info.status == "FAILED" and runs[1].data.tags["optuna.trial_state"] == "fail"
    assert runs[1].data.tags["tunepipe.error"].startswith("RuntimeError: CUDA out of memory")
    assert runs[0].info.status == runs[2].info.status == "FINISHED"


def test_failures_in_a_row_stop_the_sweep_and_a_user_error_stops_it_at_once(prepared, monkeypatch, capfd):
    root = prepared(**SWEEP)
    inject(monkeypatch, None, ConnectionError("API request to http://alice:s3cret@mlflow.example:5000/api failed"))
    with pytest.raises(SystemExit) as exc:
        cli(["sweep", "--no-repro", "--trials", "10"])
    err = capfd.readouterr().err
    error = "ConnectionError: API request to http://alice:***@mlflow.example:5000/api failed"
    assert exc.value.code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: sweep: stopped after 3 trials in a row failed (last, trial 2: {error}); fix the cause and run "
        "`tunepipe sweep` again to go on with the study"), err
    assert "Traceback" not in err and "s3cret" not in err
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{root / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3  # not the whole budget of 10
    assert all(t.user_attrs["error"] == error for t in study.trials)
    summary = json.loads((root / "reports/sweep/summary.json").read_text())
    assert summary["trials"]["fail"] == 3 and [f["trial"] for f in summary["failures"]] == [0, 1, 2]
    (parent,) = [r for r in mlflow.search_runs(experiment_names=["tunepipe"], output_format="list",
                                               filter_string=f"tags.`tunepipe.sweep.study` = '{STUDY}'")]
    assert parent.info.status == "FAILED"

    # A mistake that fails every trial alike (a UserError) stops the sweep at its first trial, with its message.
    inject(monkeypatch, {3}, UserError("finetune.learning_rate: made up for the test; fix params.yaml"))
    with pytest.raises(SystemExit) as exc:
        cli(["sweep", "--no-repro", "--trials", "10"])
    err = capfd.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: finetune.learning_rate: made up for the test; fix params.yaml"
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{root / 'optuna.db'}")
    assert len(study.trials) == 4 and study.trials[3].state == TrialState.FAIL
