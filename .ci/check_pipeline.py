"""CI: check what the README's first command left in a fresh clone (run from that clone, its venv active).

Every stage ran, the test macro-F1 clears the bar, the registry holds a version, nothing DVC wrote is left
untracked by git, and a second `dvc repro` is a no-op. Usage: python .ci/check_pipeline.py pipeline.log
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

MIN_MACRO_F1 = 0.77


def fail(msg: str) -> None:
    print(f"CI check failed: {msg}")
    sys.exit(1)


def main(log_path: str) -> None:
    import yaml

    log = Path(log_path).read_text()
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    model_name = yaml.safe_load(Path("params.yaml").read_text())["tracking"]["model_name"]
    missing = [s for s in stages if f"Running stage '{s}'" not in log]
    if missing:
        fail(f"stages that did not run: {missing}")

    metrics = json.loads(Path("reports/metrics.json").read_text())
    train = json.loads(Path("reports/train.json").read_text())
    export = json.loads(Path("reports/export.json").read_text())
    print(f"test macro_f1 {metrics['macro_f1']:.4f}, accuracy {metrics['accuracy']:.4f} (n={metrics['n_test']}); "
          f"{train['device']}, precision {train['precision']}; training {train['train_runtime_s']}s at "
          f"{train['train_tokens_per_s']} real tokens/s; int8 agreement {export['int8_label_agreement']:.4f}")
    if metrics["macro_f1"] < MIN_MACRO_F1:
        fail(f"test macro_f1 {metrics['macro_f1']:.4f} < {MIN_MACRO_F1}")

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').resolve()}")
    versions = mlflow.MlflowClient().search_model_versions(f"name='{model_name}'")
    if not versions:
        fail(f"the registry holds no version of {model_name}")
    print(f"registry: {model_name} has {len(versions)} version(s)")

    untracked = [line for line in subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                                                 capture_output=True, text=True, check=True).stdout.splitlines()
                 if line.startswith("??") and line[3:] != "pipeline.log"]
    if untracked:
        fail(f"files neither committed nor git-ignored after dvc repro: {untracked[:10]}")

    t0 = time.time()
    again = subprocess.run(["dvc", "repro"], capture_output=True, text=True)
    took = time.time() - t0
    if again.returncode != 0 or "Running stage" in again.stdout or "up to date" not in again.stdout.lower():
        fail(f"a second `dvc repro` was not a no-op:\n{again.stdout[-2000:]}\n{again.stderr[-2000:]}")
    print(f"second dvc repro: up to date in {took:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1])
