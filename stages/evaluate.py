"""Stage evaluate: the fine-tuned model on the test split -> metrics, a report, a confusion matrix and
per-example predictions (the task's own), logged to the training run."""

from __future__ import annotations

import time

import datasets
import mlflow

from tunepipe import tracking
from tunepipe.errors import run_main
from tunepipe.files import write_json
from tunepipe.modeling import load_trained
from tunepipe.params import load_params
from tunepipe.paths import METRICS, MODEL, REPORTS, TOKENIZED
from tunepipe.progress import say


def main() -> None:
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    tracking.check_reachable(p.tracking)  # before evaluating, not after it
    info, task, model, tokenizer = load_trained(MODEL)  # the task comes from the model's own metadata
    test = datasets.load_from_disk(str(TOKENIZED))["test"]
    result = task.evaluate(model, tokenizer, test, info["labels"], REPORTS, info=info)
    metrics = {**result.metrics, "test_data_hash": info["test_data_hash"]}
    write_json(METRICS, metrics)

    tracking.setup(p.tracking)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    flat.update({f"test_f1_{label}": f1 for label, f1 in result.per_label_f1.items()})
    client.log_batch(info["run_id"], metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in flat.items()])
    for path in [METRICS, *result.artifacts]:
        client.log_artifact(info["run_id"], str(path), "evaluation")
    say(f"evaluate: test {task.headline_metric} {metrics[task.headline_metric]:.4f}, accuracy "
        f"{metrics.get('accuracy', 0):.4f}, n_test {metrics['n_test']} (per-class report: "
        f"{REPORTS / 'classification_report.txt'})")


if __name__ == "__main__":
    run_main(main)
