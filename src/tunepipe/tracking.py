"""MLflow glue: where runs go, one run shared by finetune/evaluate/export, and metric logging from Trainer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from transformers import TrainerCallback

from tunepipe.params import Params, TrackingParams
from tunepipe.paths import MLFLOW_ARTIFACTS, MLFLOW_DB


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

    mlflow.set_tracking_uri(tracking_uri(t, root))
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
        import time

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
