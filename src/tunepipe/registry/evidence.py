"""What a promotion decision is based on: recorded metrics, paired tests on per-example predictions, re-scoring."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams
from tunepipe.registry.decision import Version
from tunepipe.registry.store import mlflow_error
from tunepipe.tasks import Task, get_task

PREDICTIONS = "evaluation/predictions.csv"


# ---------------------------------------------------------------------------------------------- paired tests

def run_predictions(run_id: str | None, version: int):
    """The version's evaluation/predictions.csv (logged by the evaluate stage) as a DataFrame sorted by id."""
    import mlflow
    import pandas as pd

    if not run_id:
        raise UserError(f"version {version} has no run_id tag, so no per-example predictions for "
                        "promote.significance; unset it or register the model with `dvc repro`")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDICTIONS, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError):
            raise UserError(f"version {version} (run {run_id}) has no {PREDICTIONS}, which promote.significance "
                            "needs; re-run the evaluate stage or unset promote.significance") from None
        df = pd.read_csv(path, dtype={"label": str, "prediction": str}, keep_default_na=False)
    if not {"id", "label", "prediction"} <= set(df.columns):
        raise UserError(f"version {version}: {PREDICTIONS} lacks id/label/prediction columns; re-run evaluate")
    return df.sort_values("id").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- scoring

def evidence(client, name: str, s: PromoteParams, cand: Version, champ: Version | None, reevaluate: bool,
              test_path: Path) -> dict:
    """Metric values of both versions, whether they share test data, and the p-value when asked for."""
    if reevaluate:
        return _reevaluate(name, s, cand, champ, test_path)
    values = {}
    for role, v in (("candidate", cand), ("champion", champ)):
        if v is None:
            values[role] = None
            continue
        values[role] = v.metric(s.metric)
        if values[role] is None:
            have = ", ".join(v.metric_names()) or "none"
            raise UserError(f"{name} version {v.number} has no metric.{s.metric} tag (metrics: {have}); set "
                            "promote.metric to one of them, or register it again with `dvc repro`")
    cand_hash = cand.tags.get("test_data_hash")
    same = champ is not None and bool(cand_hash) and cand_hash == champ.tags.get("test_data_hash")
    p = None
    if champ is not None and same and s.significance is not None:
        new, old = run_predictions(cand.run_id, cand.number), run_predictions(champ.run_id, champ.number)
        if new["id"].tolist() != old["id"].tolist() or new["label"].tolist() != old["label"].tolist():
            raise UserError(f"versions {cand.number} and {champ.number} share a test_data_hash but their "
                            f"{PREDICTIONS} cover different examples; re-run with --reevaluate")
        p = task_of(cand, champ).paired_p_value(s, new, old)
    return {"candidate": values["candidate"], "champion": values["champion"], "same_data": same, "p_value": p,
            "test_data_hash": cand_hash if same or champ is None else None, "reevaluated": False}


def _reevaluate(name: str, s: PromoteParams, cand: Version, champ: Version | None, test_path: Path) -> dict:
    """Load both registered models and score them, the task's way, on the current prepared test split."""
    import mlflow
    import pandas as pd

    if not test_path.is_file():
        raise UserError(f"--reevaluate: {test_path} not found; run `dvc repro prepare` first")
    task = task_of(cand, champ)
    test = pd.read_parquet(test_path)
    models = {}
    for role, v in (("candidate", cand), ("champion", champ)):
        if v is None:
            models[role] = None
            continue
        print(f"promote: re-scoring version {v.number} on {len(test)} rows of {test_path}", file=sys.stderr)
        try:
            models[role] = WholeSplit(mlflow.pyfunc.load_model(f"models:/{name}/{v.number}"))
        except mlflow.exceptions.MlflowException as exc:
            raise mlflow_error(f"--reevaluate: could not load version {v.number}", exc) from None
    return {**task.rescore(s, test, models), "same_data": True, "reevaluated": True}


class WholeSplit:
    """A registered model scoring a whole test split in-process: its predictor directly, past the request-size
    limits (serve.*) that its served predict() enforces on requests."""

    def __init__(self, pyfunc):
        self.predictor = pyfunc.unwrap_python_model().predictor

    def predict(self, texts: list[str]):
        import pandas as pd

        return pd.DataFrame(self.predictor.predict(texts))


def task_of(cand: Version, champ: Version | None) -> Task:
    """The task both versions were trained for, from their `task` tags (written at registration from the model's
    own metadata); versions of different tasks are not compared."""
    tasks = {v.number: v.tags.get("task") for v in (cand, champ) if v is not None}
    missing = [n for n, t in tasks.items() if not t]
    if missing:
        raise UserError(f"version {missing[0]} has no task tag; register it again with `dvc repro`")
    if len(set(tasks.values())) > 1:
        raise UserError("the candidate and the champion are models of different tasks ("
                        + ", ".join(f"v{n}: {t}" for n, t in tasks.items()) + "); they cannot be compared")
    return get_task(tasks[cand.number])
