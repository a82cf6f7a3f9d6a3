"""What a promotion decision is based on: recorded metrics, paired tests on per-example predictions, re-scoring."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams
from tunepipe.registry.decision import Version
from tunepipe.registry.store import mlflow_error

PREDICTIONS = "evaluation/predictions.csv"
BOOTSTRAP_SEED = 0  # fixed: the same registry state gives the same decision


# ---------------------------------------------------------------------------------------------- paired tests

def paired_p_value(s: PromoteParams, gold: list[str], new: list[str], old: list[str]) -> float:
    """The configured paired test on per-example label strings (mapped to ids over all labels seen)."""
    from tunepipe.registry.significance import BOOTSTRAP_METRICS, mcnemar, paired_bootstrap_labels

    labels = sorted(set(gold) | set(new) | set(old))
    ids = {lab: i for i, lab in enumerate(labels)}
    y, a, b = (np.array([ids[x] for x in col]) for col in (gold, new, old))
    if s.test == "mcnemar":
        return mcnemar(y, a, b)
    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"promote.test: bootstrap recomputes {', '.join(BOOTSTRAP_METRICS)} on classification "
                        f"predictions, not promote.metric {s.metric!r}; use promote.test: mcnemar")
    return paired_bootstrap_labels(y, a, b, len(labels), s.metric, s.bootstrap_samples, BOOTSTRAP_SEED)


def p_value_frames(s: PromoteParams, new, old) -> float:
    """The paired test on two evaluation/predictions.csv tables (same examples, same gold labels)."""
    from tunepipe.registry.significance import ENTITY_METRICS, mcnemar, paired_bootstrap_entities

    counts = ["correct_entities", "gold_entities", "pred_entities"]
    if not all(c in new.columns and c in old.columns for c in counts):
        return paired_p_value(s, new["label"].tolist(), new["prediction"].tolist(), old["prediction"].tolist())
    # NER: one row per sentence; McNemar on whole-sentence correctness, the bootstrap on entity counts.
    if s.test == "mcnemar":
        return mcnemar(new["label"].to_numpy(), new["prediction"].to_numpy(), old["prediction"].to_numpy())
    if s.metric not in ENTITY_METRICS:
        raise UserError(f"promote.test: bootstrap recomputes {', '.join(ENTITY_METRICS)} on NER predictions, "
                        f"not promote.metric {s.metric!r}; use promote.test: mcnemar")
    return paired_bootstrap_entities(new[counts].to_numpy(), old[counts].to_numpy(), s.metric,
                                     s.bootstrap_samples, BOOTSTRAP_SEED)


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
        p = p_value_frames(s, new, old)
    return {"candidate": values["candidate"], "champion": values["champion"], "same_data": same, "p_value": p,
            "test_data_hash": cand_hash if same or champ is None else None, "reevaluated": False}


def _reevaluate(name: str, s: PromoteParams, cand: Version, champ: Version | None, test_path: Path) -> dict:
    """Load both registered models and score them on the current test split (classification only)."""
    import mlflow
    import pandas as pd

    from stages.evaluate import classification_summary
    from tunepipe.data import content_hash
    from tunepipe.registry.significance import BOOTSTRAP_METRICS

    if not test_path.is_file():
        raise UserError(f"--reevaluate: {test_path} not found; run `dvc repro prepare` first")
    for v in (cand, champ):
        if v is not None and v.tags.get("task", "classification") != "classification":
            raise UserError(f"--reevaluate: version {v.number} is a {v.tags['task']} model; only classification "
                            "models can be re-scored here (re-run `dvc repro` on the same data instead)")
    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"--reevaluate computes {', '.join(BOOTSTRAP_METRICS)}; promote.metric is {s.metric!r}")
    test = pd.read_parquet(test_path, columns=["text", "label"])
    gold = [str(x) for x in test["label"]]
    preds: dict[str, list[str] | None] = {}
    for role, v in (("candidate", cand), ("champion", champ)):
        if v is None:
            preds[role] = None
            continue
        print(f"promote: re-scoring version {v.number} on {len(test)} rows of {test_path}", file=sys.stderr)
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{v.number}")
        except mlflow.exceptions.MlflowException as exc:
            raise mlflow_error(f"--reevaluate: could not load version {v.number}", exc) from None
        preds[role] = [str(x) for x in model.predict(test["text"].astype(str).tolist())["label"]]
    labels = sorted(set(gold).union(*(p for p in preds.values() if p)))
    ids = {lab: i for i, lab in enumerate(labels)}

    def score(pred: list[str] | None) -> float | None:
        if pred is None:
            return None
        summary = classification_summary(np.array([ids[x] for x in gold]), np.array([ids[x] for x in pred]),
                                         labels)
        return float(summary[s.metric])

    p = None
    if preds["champion"] is not None and s.significance is not None:
        p = paired_p_value(s, gold, preds["candidate"], preds["champion"])
    return {"candidate": score(preds["candidate"]), "champion": score(preds["champion"]), "same_data": True,
            "p_value": p, "test_data_hash": content_hash(test), "reevaluated": True}
