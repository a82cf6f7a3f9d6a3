"""Explanations: word-level integrated gradients (serving/explain.py) from the fine-tuned model, in `tunepipe
predict --explain`, the served pyfunc's {"explain": true} and evaluate's reports/explanations.html."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.helpers import NEGATIVE, NEUTRAL, POSITIVE, synthetic_rows, tiny_params, write_csv
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import ExplainParams
from tunepipe.serving.explain import Explainer, format_words, merge_words
from tunepipe.tasks import get_task

KEYWORDS = {"positive": set(POSITIVE), "negative": set(NEGATIVE), "neutral": set(NEUTRAL)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny BERT trained on keyword data (the label is carried by two keywords per text), then evaluate and
    export run on it: models/model, models/onnx, reports/explanations.html and a registered version."""
    from stages import augment, evaluate, export, finetune, prepare
    from stages import tokenization as tokenize

    root = tmp_path_factory.mktemp("explain-project")
    write_csv(root / "data/raw/train.csv", synthetic_rows(240))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir, **{"finetune.epochs": 5.0})))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (prepare, tokenize, augment, finetune, evaluate, export):
            stage.main()
    assert read_json(root / "reports/metrics.json")["macro_f1"] > 0.8  # learnt the keywords
    return root


@pytest.fixture
def in_project(trained, monkeypatch) -> Path:
    monkeypatch.chdir(trained)
    mlflow.set_tracking_uri(f"sqlite:///{trained / 'mlflow.db'}")
    return trained


def test_sub_tokens_merge_into_words_by_summing(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Unbelievably tokenization, ok"
    enc = tok(text, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    weights = [float(i) for i in range(n)]  # token i weighs i: a word's weight is the sum of its positions
    words = merge_words(text, enc.word_ids(), enc["offset_mapping"], weights)
    assert [w["word"] for w in words] == ["Unbelievably", "tokenization", ",", "ok"]
    for w in words:
        positions = [i for i, wid in enumerate(enc.word_ids()) if wid is not None
                     and enc["offset_mapping"][i][0] >= w["start"] and enc["offset_mapping"][i][1] <= w["end"]]
        assert w["weight"] == sum(positions)
        assert text[w["start"]:w["end"]] == w["word"]
    assert len(enc.tokens()) > len(words) + 2  # some word really was split into sub-tokens
    assert sum(w["weight"] for w in words) == sum(weights) - (n - 1)  # all but [CLS] (0) and [SEP] (n-1)


def test_keywords_of_the_predicted_class_carry_the_largest_attributions(trained):
    """Sanity: the label is carried by known keywords, so the model's explanation must point at them."""
    import pandas as pd

    test = pd.read_parquet(trained / "data/prepared/test.parquet")
    explainer = Explainer(trained / "models/model", n_steps=32)
    results = explainer.explain(test["text"].tolist())
    hits = 0
    for res in results:
        top = max(res["attributions"], key=lambda a: a["weight"])
        hits += top["word"] in KEYWORDS[res["explained_label"]] and top["weight"] > 0
        # Completeness: the weights add up to the logit's change from the baseline, up to the delta.
        assert abs(res["convergence_delta"]) < 0.2 * max(1.0, sum(abs(a["weight"]) for a in res["attributions"]))
    assert hits >= 0.8 * len(results), f"a keyword on top in only {hits} of {len(results)} texts"


def cli(*argv: str) -> None:
    """`tunepipe ARGS` with its UserError raised (main turns it into exit status 2)."""
    from tunepipe.cli import build_parser

    args = build_parser().parse_args(list(argv))
    args.func(args)


def test_a_named_label_is_explained_instead_of_the_predicted_one(trained):
    """Completeness pins the target: the weights add up to the explained label's logit on the text minus its logit
    on the baseline (the pad tokens between [CLS] and [SEP]), up to the convergence delta."""
    import torch

    explainer = Explainer(trained / "models/model", n_steps=16)
    text = "great love the flight"
    [own], [other] = explainer.explain([text]), explainer.explain([text], "negative")
    assert own["explained_label"] == "positive" and other["explained_label"] == "negative"
    enc = explainer.tokenizer([text], return_tensors="pt")
    baseline = enc["input_ids"].clone()
    baseline[0, 1:-1] = explainer.tokenizer.pad_token_id
    with torch.no_grad():
        change = (explainer.model(**enc).logits - explainer.model(**{**enc, "input_ids": baseline}).logits)[0]
    for res, label in ((own, "positive"), (other, "negative")):
        total = sum(a["weight"] for a in res["attributions"]) - res["convergence_delta"]
        assert total == pytest.approx(float(change[explainer.labels.index(label)]), abs=1e-4)
    with pytest.raises(ValueError, match="unknown label 'joy'"):
        explainer.explain([text], "joy")


def test_predict_explain_prints_words_with_weights_and_writes_html(in_project, capsys):
    from tunepipe.cli import main

    html = in_project / "out/explained.html"
    main(["predict", "--explain", "--html", str(html), "great love the flight", "awful hate it"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("positive\t") and out[2].startswith("negative\t")
    assert out[1].startswith("  why positive: ") and "great(+" in out[1] and "love(+" in out[1]
    assert out[3].startswith("  why negative: ") and "awful(+" in out[3]
    assert "\033[" not in "\n".join(out)  # not a terminal: no colour codes
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('<div class="item">') == 2
    assert 'title="+' in page and ">great</span>" in page and ">awful</span>" in page
    assert not list(html.parent.glob(".*tmp"))  # written atomically

    main(["predict", "--explain", "--label", "neutral", "--json", "great love the flight"])
    res = json.loads(capsys.readouterr().out)
    assert res["label"] == "positive" and res["explained_label"] == "neutral"
    assert [a["word"] for a in res["attributions"]] == ["great", "love", "the", "flight"]


def test_terminal_output_is_coloured():
    attributions = [{"word": "great", "weight": 0.5}, {"word": "awful", "weight": -0.25}, {"word": "a", "weight": 0.0}]
    assert format_words(attributions) == "great(+0.50) awful(-0.25) a(+0.00)"
    assert format_words(attributions, color=True) == "\033[32mgreat(+0.50)\033[0m \033[31mawful(-0.25)\033[0m a(+0.00)"


def test_predict_explain_needs_the_trained_model_beside_the_export(in_project, tmp_path):
    export = tmp_path / "elsewhere/onnx"
    shutil.copytree(in_project / "models/onnx", export)
    with pytest.raises(UserError, match=r"--explain: .* holds no PyTorch model .* run `dvc repro`"):
        cli("predict", "--model", str(export), "--explain", "great")
    shutil.copytree(in_project / "models/model", export.parent / "model")
    info = read_json(export.parent / "model/training_info.json")
    (export.parent / "model/training_info.json").write_text(json.dumps({**info, "fingerprint": "retrained"}))
    with pytest.raises(UserError, match="is not the model exported in"):
        cli("predict", "--model", str(export), "--explain", "great")
    with pytest.raises(UserError, match="--label and --html go with --explain"):
        cli("predict", "--label", "positive", "great")
    with pytest.raises(UserError, match="--label: unknown label 'joy'"):
        cli("predict", "--explain", "--label", "joy", "great")


def test_served_pyfunc_returns_attributions_with_explain_param(in_project):
    version = read_json(in_project / "reports/export.json")["registered"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{version['model_name']}/{version['version']}")
    params = {p.name for p in pyfunc.metadata.get_params_schema().params}
    assert params == {"explain", "explain_label"}  # declared, so `mlflow models serve` accepts them
    texts = ["great love the flight", "awful hate it"]
    plain = pyfunc.predict(texts)
    assert "attributions" not in plain.columns
    out = pyfunc.predict(texts, params={"explain": True})
    assert list(out["label"]) == list(plain["label"]) == list(out["explained_label"])
    top = [max(row, key=lambda a: a["weight"])["word"] for row in out["attributions"]]
    assert top[0] in KEYWORDS["positive"] and top[1] in KEYWORDS["negative"]
    assert all(isinstance(d, float) for d in out["convergence_delta"])
    named = pyfunc.predict(texts[:1], params={"explain": True, "explain_label": "neutral"})
    assert named["explained_label"][0] == "neutral" and named["label"][0] == "positive"
    # The same code path as `tunepipe predict --model models:/...`.
    from tunepipe.cli import load_predictor

    _, predict = load_predictor(f"models:/{version['model_name']}/{version['version']}", "params.yaml",
                                {"label": None})
    assert predict(texts[:1])[0]["attributions"] == out["attributions"][0]


def test_evaluate_writes_explanations_of_right_and_wrong_predictions(in_project):
    page = (in_project / "reports/explanations.html").read_text()
    for label in ("negative", "neutral", "positive"):
        assert f"<h2>{label}: most confident right</h2>" in page and f"<h2>{label}: most confident wrong</h2>" in page
    assert page.count("right: test text") == 6  # examples_per_class 2, three labels, a model that learnt them
    # Logged to the training run with the other evaluation reports.
    info = read_json(in_project / "models/model/training_info.json")
    logged = [f.path for f in mlflow.MlflowClient().list_artifacts(info["run_id"], "evaluation")]
    assert "evaluation/explanations.html" in logged


def test_cases_are_the_most_confident_right_and_wrong_per_label(in_project, tmp_path):
    from tunepipe.explanations import select_cases, write_explanations

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.7, 0.3]])
    predicted = np.eye(2, dtype=bool)[probs.argmax(1)]
    gold = np.eye(2, dtype=bool)[[0, 0, 1, 1, 1]]
    cases = select_cases(probs, predicted, gold, ["a", "b"], k=1)
    assert [(c.label, c.right, c.index) for c in cases] == [("a", True, 0), ("a", False, 2), ("b", True, 3)]

    # Through the task: the model's own test logits with some predictions swapped, so wrong ones exist.
    info = read_json(in_project / "models/model/training_info.json")
    import pandas as pd

    n = len(pd.read_parquet(in_project / "data/prepared/test.parquet"))
    gold_ids = np.arange(n) % 3
    logits = np.eye(3)[gold_ids] * 5
    logits[:3] = np.roll(logits[:3], 1, axis=1)  # three confident mistakes
    out = tmp_path / "explanations.html"
    n_explained = write_explanations(ExplainParams(examples_per_class=1, n_steps=8), get_task("classification"),
                                     info, logits, gold_ids, in_project / "data/prepared/test.parquet",
                                     in_project / "models/model", out)
    page = out.read_text()
    assert n_explained == 6 and page.count("right: test text") == 3 and page.count("wrong: test text") == 3


def test_ner_models_cannot_explain(in_project, tmp_path):
    """NER has no per-text label to attribute: a clear one-line error everywhere, and a page saying so."""
    from tunepipe.explanations import write_explanations
    from tunepipe.serving.pyfunc_model import load_explainer

    with pytest.raises(UserError, match="^--explain: not available for ner models$"):
        get_task("ner").check_explainable("--explain")
    with pytest.raises(ValueError, match="^explain: not available for ner models$"):
        load_explainer({"task": "ner", "explainable": False, "max_length": 8}, None)
    export = tmp_path / "models/onnx"
    shutil.copytree(in_project / "models/onnx", export)
    meta = read_json(export / "tunepipe.json")
    (export / "tunepipe.json").write_text(json.dumps({**meta, "task": "ner", "explainable": False}))
    with pytest.raises(UserError, match="^--explain: not available for ner models$"):
        cli("predict", "--model", str(export), "--explain", "great")
    out = tmp_path / "explanations.html"
    assert write_explanations(ExplainParams(), get_task("ner"), {}, np.zeros((0, 1)), np.zeros(0),
                              tmp_path / "absent.parquet", tmp_path, out) == 0
    assert "not available for ner models" in out.read_text()
