"""Learning curve: the power-law fit and its band, nested stratified subsets, bad fractions, and a tiny curve end to
end (points trained through the sweep's Objective, scored on test, reports and nested MLflow runs, the main
pipeline's model reused for the largest point)."""

from __future__ import annotations

import csv
import json

import datasets
import mlflow
import numpy as np
import pytest

from tunepipe.cli import main as cli
from tunepipe.errors import UserError
from tunepipe.learning_curve.fit import TooFewPoints, count, fit_power_law, power_law, sentence, summarize
from tunepipe.learning_curve.points import nested_order, plan
from tunepipe.params import LearningCurveParams, parse_params

A, B, C = 0.8, 2.0, 0.5  # 0.6 at n=100, 0.78 at n=10k; 95% of the plateau (0.76) at n = (B / (0.05 A))^(1/C) = 2500
SIZES = [100, 200, 500, 1000, 2500, 5000, 10000]


def test_fit_recovers_a_known_power_law_exactly_without_noise():
    a, b, c = fit_power_law(SIZES, power_law(SIZES, A, B, C))
    assert (a, b, c) == pytest.approx((A, B, C), rel=1e-4)


def test_fit_recovers_a_known_power_law_from_noisy_seeds_within_its_band():
    rng = np.random.default_rng(0)
    n = np.repeat(SIZES, 3)
    y = power_law(n, A, B, C) + rng.normal(0, 0.004, len(n))
    s = summarize(n, y, share=0.95, resamples=200)
    assert s["a"] == pytest.approx(A, abs=0.01)
    assert s["c"] == pytest.approx(C, abs=0.1)
    assert s["n95"] == pytest.approx(2500, rel=0.25)
    true_gain = power_law(20000, A, B, C) - power_law(10000, A, B, C)
    assert s["gain_doubling"] == pytest.approx(true_gain, abs=0.005)
    boot = s["bootstrap"]
    assert boot["fits"] >= 150
    assert boot["a"][0] <= A <= boot["a"][1]
    assert boot["n95"][0] <= 2500 <= boot["n95"][1]
    assert all(p["low"] <= p["metric"] <= p["high"] for p in s["curve"])
    said = sentence(s, "macro_f1")
    assert said.startswith("with ~2.") and "you reach 0.760 macro_f1 (95% of the fitted plateau 0.80" in said
    assert "the full 10k add 0.0" in said
    assert "doubling to 20k labels is expected to add" in said


def test_an_exact_fit_has_no_band_and_too_few_sizes_cannot_be_fitted():
    s = summarize([100, 1000, 10000], power_law([100, 1000, 10000], A, B, C), 0.95, 50)
    assert s["residual_dof"] == 0 and s["bootstrap"]["a"] is None and s["curve"][0]["low"] is None
    assert "95% band" not in sentence(s, "macro_f1")
    with pytest.raises(TooFewPoints, match="2 distinct training size"):
        summarize([100, 100, 1000], [0.5, 0.52, 0.7], 0.95, 50)


def test_counts_read_as_people_say_them():
    assert [count(v) for v in (740, 6200, 30000, 29757, 1.3e6)] == ["740", "6.2k", "30k", "30k", "1.3M"]


def test_subsets_are_nested_and_stratified():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    order = nested_order(labels, len(labels), seed=3)
    assert sorted(order.tolist()) == list(range(1000))
    for m in (10, 20, 50, 100, 250, 500):
        counts = np.bincount(labels[order[:m]], minlength=3)
        assert np.all(np.abs(counts - m * np.array([0.6, 0.3, 0.1])) <= 1), (m, counts)
    # Nested by construction (prefixes of one order); another seed draws other subsets, the same seed the same.
    assert set(order[:10]) <= set(order[:20])
    assert not np.array_equal(order[:100], nested_order(labels, 1000, seed=4)[:100])
    assert np.array_equal(order, nested_order(labels, 1000, seed=3))


def test_the_plan_repeats_small_fractions():
    lc = LearningCurveParams(fractions=(0.01, 0.05, 0.1, 0.5, 1.0), seeds=3, few_below=0.1)
    assert [(p.fraction, p.repeat, p.n_train) for p in plan(lc, 2000)] == [
        (0.01, 0, 20), (0.01, 1, 20), (0.01, 2, 20), (0.05, 0, 100), (0.05, 1, 100), (0.05, 2, 100),
        (0.1, 0, 200), (0.5, 0, 1000), (1.0, 0, 2000)]


@pytest.mark.parametrize(("fractions", "message"), [
    ([0.0, 0.5, 1.0], "each fraction must be in (0, 1], got 0.0"),
    ([0.1, 0.5, 1.5], "each fraction must be in (0, 1], got 1.5"),
    ([0.5, 0.1, 1.0], "fractions must be increasing without duplicates"),
    ([0.1, 0.5, 0.5, 1.0], "fractions must be increasing without duplicates"),
    ([-0.1, 1.0], "each fraction must be in (0, 1], got -0.1"),
])
def test_bad_fractions_in_params_are_refused(fractions, message):
    with pytest.raises(UserError) as err:
        parse_params({"learning_curve": {"fractions": fractions}})
    assert str(err.value).startswith("params.yaml: learning_curve.fractions") and message in str(err.value)


@pytest.mark.parametrize(("arg", "message"), [
    ("0.5,0.5,1", "--fractions: fractions must be increasing without duplicates, got [0.5, 0.5, 1.0]"),
    ("0,0.5,1", "--fractions: each fraction must be in (0, 1], got 0.0"),
    ("0.1,1.2", "--fractions: each fraction must be in (0, 1], got 1.2"),
    ("0.1,half", "--fractions: '0.1,half' is not a comma-separated list of numbers"),
])
def test_bad_fractions_on_the_command_line_are_one_line_errors(project, capsys, arg, message):
    project(30)
    with pytest.raises(SystemExit) as exc:
        cli(["learning-curve", "--no-repro", "--fractions", arg])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" and "Traceback" not in err


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_tiny_learning_curve_end_to_end(project, capsys):
    root = project(150, **{"learning_curve.fractions": [0.25, 0.5, 1.0], "learning_curve.seeds": 1,
                           "learning_curve.bootstrap": 20, "robustness.perturbations": [],
                           "explain.examples_per_class": 0})
    from stages import evaluate, finetune, prepare
    from stages import tokenization as tokenize

    prepare.main()
    tokenize.main()
    capsys.readouterr()

    # Two fractions cannot be fitted: refused before anything trains.
    with pytest.raises(SystemExit) as exc:
        cli(["learning-curve", "--no-repro", "--fractions", "0.5,1"])
    assert exc.value.code == 2
    assert "fitting the curve needs at least 3: add fractions" in capsys.readouterr().err

    # The main pipeline's model (same params and data) stands in for the largest point.
    from stages import augment

    augment.main()
    finetune.main()
    evaluate.main()
    info = json.loads((root / "models/model/training_info.json").read_text())
    main_f1 = json.loads((root / "reports/metrics.json").read_text())["macro_f1"]
    capsys.readouterr()

    cli(["learning-curve", "--no-repro"])
    said = capsys.readouterr().out
    out = root / "reports/learning_curve"
    rows = _read_csv(out / "points.csv")
    n_train = len(datasets.load_from_disk(str(root / "data/tokenized"))["train"])
    assert [(r["fraction"], r["n_train"]) for r in rows] == [
        ("0.25", str(round(0.25 * n_train))), ("0.5", str(round(0.5 * n_train))), ("1.0", str(n_train))]
    assert rows[2]["reused_run"] == info["run_id"] and float(rows[2]["macro_f1"]) == main_f1
    assert rows[0]["reused_run"] == rows[1]["reused_run"] == ""
    assert all(0.0 <= float(r["macro_f1"]) <= 1.0 for r in rows)
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "learning_curve.json").read_text())
    assert report["fit"] is not None and report["reused_main_model"] == info["run_id"]
    assert report["sentence"] and f"learning-curve: {report['sentence']}" in said
    assert "labels" in report["sentence"] and "doubling to" in report["sentence"]
    assert "3 points (3 run here" in said  # two trained, one reused

    # MLflow: one parent run, one nested run per point; trained points log their validation curve (the Trainer
    # callback the sweep's trials use) and their test metric.
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    (parent,) = mlflow.search_runs(experiment_names=["tunepipe"], output_format="list",
                                   filter_string=f"tags.`tunepipe.learning_curve.study` = '{report['study']}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tunepipe.learning_curve.sentence"] == report["sentence"]
    nested = mlflow.search_runs(experiment_names=["tunepipe"], output_format="list",
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_run = {r.info.run_id: r for r in nested}
    assert sorted(by_run) == sorted(r["mlflow_run_id"] for r in rows)
    client = mlflow.MlflowClient()
    for r in rows:
        run = by_run[r["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["test_macro_f1"] == pytest.approx(float(r["macro_f1"]))
        assert run.data.tags["tunepipe.learning_curve.n_train"] == r["n_train"]
        if not r["reused_run"]:
            assert client.get_metric_history(run.info.run_id, "val_macro_f1")
            assert run.data.params["finetune.learning_rate"] == str(5e-3)
    assert any(a.path == "learning_curve" for a in client.list_artifacts(parent.info.run_id))

    # Again: the study has every point, so nothing trains; the reports are written again from it.
    cli(["learning-curve", "--no-repro"])
    again = capsys.readouterr().out
    assert "3/3 points finished" in again and "(0 run here" in again
    assert _read_csv(out / "points.csv") == rows


def test_the_sentence_says_when_more_labels_are_needed_and_when_the_curve_is_not_bending():
    short = summarize([50, 100, 200, 500, 1000], power_law([50, 100, 200, 500, 1000], A, B, C), 0.95, 20)
    said = sentence(short, "macro_f1")
    assert said.startswith("the 1k labels reach 0.737 macro_f1, short of 95% of the fitted plateau 0.800")
    assert "which the fit puts at ~2.5k labels" in said
    sizes = np.array([20, 40, 80, 160, 320])
    straight = summarize(sizes, 0.1 + 0.05 * np.log10(sizes), 0.95, 20)
    assert straight["n95"] > 10 * 320
    assert "the curve is not levelling off yet" in sentence(straight, "macro_f1")


@pytest.mark.slow
def test_two_workers_share_the_points(project):
    """Two processes on one sqlite storage: each point is trained once, by one of them, and both write the curve."""
    import os
    import re
    import subprocess
    import sys

    import optuna

    from tests.helpers import REPO

    root = project(150, **{"learning_curve.fractions": [0.25, 0.5, 0.75, 1.0], "learning_curve.seeds": 1,
                           "learning_curve.bootstrap": 20})
    from stages import prepare
    from stages import tokenization as tokenize

    prepare.main()
    tokenize.main()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = [root / f"worker{i}.log" for i in range(2)]
    procs = []
    for path in logs:
        with path.open("w") as fh:
            procs.append(subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "learning-curve", "--no-repro"],
                                          cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=500) for p in procs]
    finally:
        for p in procs:
            p.kill()
    text = [path.read_text() for path in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in text)
    assert sorted(re.search(r"study '\S+' (created|resumed)", t).group(1) for t in text) == ["created", "resumed"]
    ran = [int(re.search(r"\((\d+) run here", t).group(1)) for t in text]
    assert sum(ran) == 4, text  # every point once, over both workers

    (name,) = optuna.get_all_study_names(f"sqlite:///{root / 'optuna.db'}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["fraction"] for t in done) == [0.25, 0.5, 0.75, 1.0]
    assert len(_read_csv(root / "reports/learning_curve/points.csv")) == 4


def test_where_the_fit_misses_the_largest_point_the_sentence_gives_the_measured_figure():
    """The default curve measured on the tweet corpus (README): one epoch barely trains the smallest subsets, then
    the curve levels off faster than a power law can, and the fit overshoots the measured 0.781 at 30k."""
    n = [298] * 3 + [595] * 3 + [1488] * 3 + [2976, 7439, 14878, 29757]
    y = [0.2012, 0.3579, 0.3660, 0.4036, 0.3584, 0.3859, 0.5853, 0.5821, 0.5810, 0.6500, 0.7244, 0.7685, 0.7809]
    s = summarize(n, y, 0.95, 50)
    assert s["measured_at_largest"] == pytest.approx(0.7809)
    assert s["metric_at_largest"] > 0.79
    said = sentence(s, "macro_f1")
    assert said.startswith(f"the 30k labels reach 0.781 macro_f1 (measured; the fitted curve says "
                           f"{s['metric_at_largest']:.3f}, so read its figures as rough)")


def test_a_curve_flat_from_the_smallest_subset_says_so():
    sizes = np.array([100, 200, 400, 800])
    s = summarize(sizes, power_law(sizes, 0.7, 0.5, 1.0), 0.95, 20)  # 0.695 at 100 already: past 95% of 0.7
    assert s["n95"] < 100
    assert sentence(s, "accuracy").startswith("already the smallest subset, 100 labels, reaches 0.695 accuracy")
