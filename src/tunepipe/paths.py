"""Every path the stages and commands share, relative to the project root (where `dvc repro` runs).

dvc.yaml declares the same paths as deps and outs; keep the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS_FILE = Path("params.yaml")

PREPARED = Path("data/prepared")  # prepare: one parquet file per split + meta.json
PREPARED_META = PREPARED / "meta.json"
TEST_SPLIT = PREPARED / "test.parquet"
TOKENIZED = Path("data/tokenized")  # tokenize: a datasets.DatasetDict
AUGMENTED = Path("data/augmented")  # augment: the same, train split grown

# finetune: resumable checkpoints (a persistent DVC out; after a finished run only its state.json is left)
CHECKPOINTS = Path("models/checkpoints")
MODEL = Path("models/model")  # finetune: the best checkpoint, safetensors + tokenizer + TRAINING_INFO
TRAINING_INFO = "training_info.json"  # the model's own metadata: task, labels, run id, data hashes
EXPORT = Path("models/onnx")  # export: ONNX fp32 + int8, tokenizer, EXPORT_META
EXPORT_META = "tunepipe.json"  # the served model's metadata (read by serving/pyfunc_model.py)

REPORTS = Path("reports")
PLOTS = REPORTS / "plots"
DATA_REPORT = REPORTS / "data.json"
TOKENIZE_REPORT = REPORTS / "tokenize.json"
AUGMENT_REPORT = REPORTS / "augment.json"
TRAIN_REPORT = REPORTS / "train.json"
METRICS = REPORTS / "metrics.json"
CALIBRATION = REPORTS / "calibration.json"  # evaluate: the fitted temperature, which export stores with the model
EXPLANATIONS = REPORTS / "explanations.html"  # evaluate: the most confident right/wrong test predictions, explained
RELIABILITY_CSV = PLOTS / "reliability.csv"
RELIABILITY_PNG = PLOTS / "reliability.png"
ROBUSTNESS_CSV = PLOTS / "robustness.csv"  # evaluate: the headline metric per perturbation of the test split
ROBUSTNESS_PNG = PLOTS / "robustness.png"
ZERO_SHOT = REPORTS / "zero_shot.json"  # evaluate: the no-label baseline (tunepipe/zeroshot.py) on the test split
EXPORT_REPORT = REPORTS / "export.json"
SWEEP_REPORTS = REPORTS / "sweep"
LEARNING_CURVE_REPORTS = REPORTS / "learning_curve"  # `tunepipe learning-curve`: points.csv, learning_curve.json/png

# Stores created in the project when params.yaml names none.
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
OPTUNA_DB = "optuna.db"


def project_root() -> Path:
    """Where the project's own stores (MLFLOW_DB, MLFLOW_ARTIFACTS, OPTUNA_DB) are: the working directory, except
    in the temporary copy where DVC runs a queued (or --temp) experiment, <project>/.dvc/tmp/exps/<tmp>/. DVC
    deletes that copy once the experiment is collected, and sets DVC_ROOT to the project for it, so the
    experiment's runs and registry versions go to the project's store instead."""
    cwd = Path.cwd().resolve()
    root = os.environ.get("DVC_ROOT")
    if root:
        project = Path(root).resolve()
        if cwd.is_relative_to(project / ".dvc" / "tmp" / "exps"):
            return project
    return cwd
