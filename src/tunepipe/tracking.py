"""MLflow glue: where runs go, one run shared by finetune/evaluate/export, metric logging from Trainer, and the
registration of each exported model."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from transformers import TrainerCallback

from tunepipe.params import Params, TrackingParams
from tunepipe.paths import MLFLOW_ARTIFACTS, MLFLOW_DB
from tunepipe.serving import PYFUNC_CODE
from tunepipe.tasks import get_task


def tracking_uri(t: TrackingParams, root: Path | None = None) -> str:
    """params > $MLFLOW_TRACKING_URI > an embedded sqlite database in the project (registry included)."""
    if t.uri:
        return t.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{((root or Path.cwd()) / MLFLOW_DB).resolve()}"


def setup(t: TrackingParams, root: Path | None = None) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(t, root)
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(t.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if tracking_uri(t, root).startswith("sqlite:"):
        # Keep artifacts beside the database, not in whatever directory the process started in.
        artifacts = ((root or Path.cwd()) / MLFLOW_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(t.experiment, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel process
        return client.get_experiment_by_name(t.experiment).experiment_id


def _create_sqlite_store(db: Path) -> None:
    """Create a new sqlite store whole: MLflow builds its schema in dozens of migrations, and a process killed
    midway leaves a database every later run refuses ("out-of-date database schema"). So the schema is built in a
    temp file beside it, renamed in only if no other process created the store meanwhile."""
    from mlflow.tracking._tracking_service.utils import _get_store

    from tunepipe.files import recover

    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    recover(db)  # half-built databases of killed processes
    tmp = db.parent / f".{db.name}.{os.getpid()}.tmp"
    try:
        _get_store(f"sqlite:///{tmp}").engine.dispose()
        os.link(tmp, db)  # fails if another process's store came in first: then that one is used
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def flat_params(p: Params, sections: tuple[str, ...] = ("task", "data", "model", "tokenize", "augment",
                                                          "finetune")) -> dict[str, str]:
    out: dict[str, str] = {}
    dumped = p.model_dump()
    for sec in sections:
        val = dumped[sec]
        if isinstance(val, dict):
            out.update({f"{sec}.{k}": str(v) for k, v in val.items()})
        else:
            out[sec] = str(val)
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


class MlflowMetricsCallback(TrainerCallback):
    """Trainer logs -> MLflow metrics on one run, by id (works for nested sweep runs without global state)."""

    # Trainer's end-of-training summary reuses "train_loss" for the mean loss: keep it apart from the curve.
    RENAME = {"loss": "train_loss", "train_loss": "train_loss_mean"}

    def __init__(self, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient()
        self.run_id = run_id

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for key, value in logs.items():
            if not isinstance(value, int | float) or key in ("epoch", "total_flos", "step"):
                continue
            name = self.RENAME.get(key) or ("val_" + key.removeprefix("eval_") if key.startswith("eval_") else key)
            metrics.append(Metric(name, float(value), now, state.global_step))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)


def start_training_run(p: Params, run_id: str | None, meta: dict, fp: str, device: str, precision: str) -> str:
    """finetune's MLflow run (or the interrupted one it resumes), tagged with the data, code and hardware."""
    import mlflow

    exp_id = setup(p.tracking)
    client = mlflow.MlflowClient()
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was reset meanwhile: start a new run
    run = client.create_run(exp_id, tags={
        "tunepipe.git_commit": git_commit() or "unknown",
        "tunepipe.data_hash": meta["data_hash"],
        "tunepipe.test_data_hash": meta["hashes"]["test"],
        "tunepipe.fingerprint": fp,
        "tunepipe.task": p.task,
        "tunepipe.device": device,
        "tunepipe.precision": precision,
        "mlflow.runName": f"repro-{time.strftime('%Y%m%d-%H%M%S')}",
    })
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000])
                                              for k, v in flat_params(p).items()])
    return run.info.run_id


def register(p: Params, run_id: str, onnx_dir: Path, info: dict, metrics: dict, parity_report: dict) -> dict:
    """Log the served model (pyfunc from code, the ONNX export as its artifact) on the run and register it as a new
    version of tracking.model_name, tagged with what it was trained and scored on."""
    import json

    import mlflow


    setup(p.tracking)
    example = ["what a great flight", "the service was awful"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: float(v) for k, v in parity_report.items() if isinstance(v, int | float)})
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"model_dir": str(onnx_dir)},
            input_example=example, registered_model_name=p.tracking.model_name,
            pip_requirements=["onnxruntime", "transformers", "pandas", "numpy", "mlflow"])
    client = mlflow.MlflowClient()
    version = logged.registered_model_version
    tags = {
        "git_commit": git_commit() or "unknown",
        "data_hash": info["data_hash"],
        "test_data_hash": info["test_data_hash"],
        "run_id": run_id,
        "task": info["task"],
        "params": json.dumps(p.model_dump(exclude={"sweep", "promote"}), sort_keys=True),
        "metrics": json.dumps({k: v for k, v in metrics.items() if isinstance(v, int | float)}, sort_keys=True),
        "headline_metric": get_task(info["task"]).headline_metric,
    }
    for k, v in metrics.items():
        if isinstance(v, int | float):
            tags[f"metric.{k}"] = repr(float(v))
    for k, v in tags.items():
        client.set_model_version_tag(p.tracking.model_name, str(version), k, v)
    return {"model_name": p.tracking.model_name, "version": int(version), "model_uri": logged.model_uri}
