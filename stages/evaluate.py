"""Stage evaluate: the fine-tuned model on the test split -> metrics, a report, a confusion matrix and
per-example predictions (the task's own), logged to the training run; calibration: a temperature fitted on the
validation split (reports/calibration.json, which export stores with the model), ECE and Brier score on the test
split before and after it (metrics.json) and a reliability diagram; robustness: the headline metric on seeded,
label-preserving perturbed copies of the prepared test split (tunepipe/robustness.py), in metrics.json and a plot;
explanations: the most confident right and wrong test predictions per label with their word attributions
(reports/explanations.html); zero-shot: the same metrics for a classifier that saw no labels (the nearest label
description by sentence embedding, tunepipe/zeroshot.py), in reports/zero_shot.json and metrics.json's zero_shot
block, so every run shows what fine-tuning buys."""

from __future__ import annotations

import time

import datasets
import mlflow
import pandas as pd

from tunepipe import tracking
from tunepipe.calibration import calibrate, calibrator, describe_temperature
from tunepipe.errors import run_main
from tunepipe.explanations import write_explanations
from tunepipe.files import write_csv, write_json, write_text
from tunepipe.modeling import load_trained
from tunepipe.params import check_label_descriptions, load_params
from tunepipe.paths import (
    CALIBRATION,
    EXPLANATIONS,
    METRICS,
    MODEL,
    RELIABILITY_CSV,
    RELIABILITY_PNG,
    REPORTS,
    ROBUSTNESS_CSV,
    ROBUSTNESS_PNG,
    TEST_SPLIT,
    TOKENIZED,
    ZERO_SHOT,
)
from tunepipe.plots import plot_reliability, plot_robustness
from tunepipe.progress import say
from tunepipe.robustness import robustness, selected
from tunepipe.zeroshot import zero_shot


def main() -> None:
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    datasets.disable_progress_bars()  # robustness re-tokenizes each perturbed copy: no per-batch bars in DVC's log
    p = load_params()
    tracking.check_reachable(p.tracking)  # before evaluating, not after it
    info, task, model, tokenizer = load_trained(MODEL)  # the task comes from the model's own metadata
    selected(p.robustness, task)  # a perturbation the task cannot run fails now, not after the clean scoring
    check_label_descriptions(p.data.label_descriptions, info["labels"])  # likewise a mistyped label
    splits = datasets.load_from_disk(str(TOKENIZED))
    test = splits["test"]
    result = task.evaluate(model, tokenizer, test, info["labels"], REPORTS, info=info)
    cal = calibrator(task.calibrator)
    test_data = result.calibration or task.calibration_data(model, tokenizer, test, info)
    scores, record, rows = calibrate(
        cal, p.calibration.method,
        validation=task.calibration_data(model, tokenizer, splits["validation"], info), test=test_data)
    write_reliability(rows, record["temperature"])
    write_json(CALIBRATION, record)
    m = task.headline_metric
    test_rows = pd.read_parquet(TEST_SPLIT)
    robust, robust_rows = robustness(task, p.robustness, model, tokenizer, test_rows, info, result.metrics[m])
    write_csv(ROBUSTNESS_CSV, robust_rows, ["perturbation", "metric", "drop"])
    plot_robustness(robust_rows, m, ROBUSTNESS_PNG)
    zs = zero_shot(p, task, info["labels"], test_rows)
    write_json(ZERO_SHOT, zs)
    # Its scalar metrics beside the fine-tuned model's, and the headline gap, so `dvc metrics show` has both.
    zs_block = {k: v for k, v in zs.get("metrics", {}).items() if isinstance(v, int | float) and k != "n_test"}
    gain = {"zero_shot": zs_block, "fine_tuning_gain": result.metrics[m] - zs_block[m]} if zs_block else {}
    metrics = {**result.metrics, **scores, **robust, **gain, "test_data_hash": info["test_data_hash"]}
    write_json(METRICS, metrics)
    n_explained = write_explanations(p.explain, task, info, *test_data, TEST_SPLIT, MODEL, EXPLANATIONS)

    tracking.setup(p.tracking)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    flat.update({f"test_f1_{label}": f1 for label, f1 in result.per_label_f1.items()})
    flat.update({f"test_robust_{name}_{m}": row[m] for name, row in robust.get("robustness", {}).items()})
    flat.update({f"test_zero_shot_{k}": v for k, v in zs_block.items()})
    if isinstance(record["temperature"], float):
        flat["calibration_temperature"] = record["temperature"]
    client.log_batch(info["run_id"], metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in flat.items()])
    for path in [METRICS, CALIBRATION, RELIABILITY_PNG, ROBUSTNESS_PNG, EXPLANATIONS, ZERO_SHOT, *result.artifacts]:
        client.log_artifact(info["run_id"], str(path), "evaluation")
    say(f"evaluate: test {task.headline_metric} {metrics[task.headline_metric]:.4f}, accuracy "
        f"{metrics.get('accuracy', 0):.4f}, n_test {metrics['n_test']} (per-class report: "
        f"{REPORTS / 'classification_report.txt'})")
    say(f"evaluate: calibration {record['method']}: temperature {describe_temperature(record['temperature'])} "
        "(fitted on validation), "
        f"test ECE {scores['ece_uncalibrated']:.4f} -> {scores['ece']:.4f}, Brier {scores['brier_uncalibrated']:.4f} "
        f"-> {scores['brier']:.4f} (reliability diagram: {RELIABILITY_PNG})")
    if robust:
        worst = max(robust["robustness"], key=lambda name: robust["robustness"][name]["drop"])
        say(f"evaluate: robustness: robust_{m} {robust[f'robust_{m}']:.4f} over {len(robust['robustness'])} "
            f"perturbations (drop {robust['robust_drop']:+.4f} from clean); worst: {worst} "
            f"{robust['robustness'][worst][m]:.4f} (drop {robust['robustness'][worst]['drop']:+.4f}; plot: "
            f"{ROBUSTNESS_PNG})")
    else:
        say("evaluate: robustness report off (robustness.perturbations: [])")
    if zs_block:
        say(f"evaluate: zero-shot ({zs['method']}, {zs['model']}, no labels): test {m} {zs_block[m]:.4f}; "
            f"fine-tuning adds {gain['fine_tuning_gain']:+.4f} ({ZERO_SHOT}, {zs['seconds']} s)")
    else:
        say(f"evaluate: zero-shot baseline skipped: {zs['skipped']}")
    if n_explained:
        say(f"evaluate: explained {n_explained} of the most confident right and wrong test predictions "
            f"({EXPLANATIONS})")


def write_reliability(rows: list[dict], temperature) -> None:
    """The reliability diagram's data (for `dvc plots`; empty bins have empty cells) and its PNG."""
    cols = list(rows[0])
    write_text(RELIABILITY_CSV, ",".join(cols) + "\n" + "".join(
        ",".join("" if r[c] is None else f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols)
        + "\n" for r in rows))
    plot_reliability(rows, temperature, RELIABILITY_PNG)


if __name__ == "__main__":
    run_main(main)
