"""Few-shot training (issue 13): finetune.method (full | lora | setfit, the old finetune.peft refused with the new
spelling), data.train_per_class sampling, SetFit on the tiny BERT in-process, and `dvc repro` through export and
promote with it."""

from __future__ import annotations

import json
import sys

import datasets
import mlflow
import numpy as np
import pytest
import torch
import yaml

from stages import augment, evaluate, export, finetune, prepare
from stages import tokenization as tokenize
from tests.helpers import clone_repo, commit_all, sh, synthetic_rows, tiny_params, write_csv
from tunepipe import fewshot
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.modeling import load_tokenizer, load_trained
from tunepipe.params import load_params, parse_params
from tunepipe.serving.sentence_classifier import SentenceEmbeddingClassifier, load_classifier
from tunepipe.tasks import get_task

# A short SetFit run: few pairs, few head epochs (the tiny BERT is 2 layers of width 32).
QUICK = {"finetune.method": "setfit", "finetune.setfit_iterations": 4, "finetune.setfit_head_epochs": 20,
         "finetune.learning_rate": 1e-3, "finetune.setfit_head_learning_rate": 5e-2, "finetune.epochs": 1.0,
         "robustness.perturbations": [], "explain.examples_per_class": 1}


# --- params ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new"), [("lora", "lora"), ("none", "full")])
def test_old_peft_key_names_the_new_spelling(old, new):
    with pytest.raises(UserError, match=rf"finetune: finetune.peft was renamed: replace `peft: {old}` with "
                                        rf"`method: {new}` \(finetune.method: full \| lora \| setfit\)"):
        parse_params({"finetune": {"peft": old}})
    assert parse_params({"finetune": {"method": new}}).finetune.method == new


def test_setfit_and_train_per_class_are_classification_only():
    with pytest.raises(UserError, match="setfit supports task: classification"):
        parse_params({"task": "ner", "finetune": {"method": "setfit"}})
    with pytest.raises(UserError, match="data.train_per_class: samples k texts per class, for task: classification"):
        parse_params({"task": "multilabel", "data": {"train_per_class": 8}})
    with pytest.raises(UserError, match="augment.method: token_mask does not apply to finetune.method: setfit"):
        parse_params({"finetune": {"method": "setfit"}, "augment": {"method": "token_mask"}})
    with pytest.raises(UserError, match="set data.train_per_class or data.max_train_samples, not both"):
        parse_params({"data": {"train_per_class": 8, "max_train_samples": 100}})


# --- data.train_per_class ----------------------------------------------------------------------------------------

def prepared(**data):
    out = get_task("classification").prepare(parse_params({"data": {"source": "data/raw/train.csv", **data}}))
    return out.splits, out.report


def test_train_per_class_is_stratified_and_seeded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Imbalanced: 300 negative, 120 neutral, 60 positive texts.
    rows = (synthetic_rows(900, seed=1, classes=("negative",))[:300] + synthetic_rows(120, seed=2, classes=("neutral",))
            + synthetic_rows(60, seed=3, classes=("positive",)))
    write_csv(tmp_path / "data/raw/train.csv", rows)
    full, _ = prepared()
    splits, report = prepared(train_per_class=8)
    assert splits["train"]["label"].value_counts().to_dict() == {"negative": 8, "neutral": 8, "positive": 8}
    assert set(splits["train"]["text"]) <= set(full["train"]["text"])  # drawn from the train split
    for name in ("validation", "test"):  # the evaluation splits stay as they were
        assert splits[name].equals(full[name])
    assert report["train_capped_from"] == len(full["train"])
    again, _ = prepared(train_per_class=8)
    assert again["train"].equals(splits["train"])  # seeded: the same rows
    other, _ = prepared(train_per_class=8, seed=7)
    assert set(other["train"]["text"]) != set(splits["train"]["text"])  # another data.seed, other rows
    # nested draws are not promised, but a larger k holds k of every class too
    assert set(prepared(train_per_class=40)[0]["train"]["label"].value_counts()) == {40}
    with pytest.raises(UserError, match=r"data.train_per_class: class 'positive' has only 48 train example\(s\), "
                                        r"fewer than 100; lower data.train_per_class to at most 48 or add examples"):
        prepared(train_per_class=100)


# --- SetFit in-process -----------------------------------------------------------------------------------------

def test_setfit_trains_and_the_saved_model_predicts_as_setfit_does(project):
    root = project(**QUICK, **{"data.train_per_class": 12})
    prepare.main()
    tokenize.main()
    augment.main()
    p = load_params()
    labels = read_json(root / "data/prepared/meta.json")["labels"]
    validation = datasets.load_from_disk(str(root / "data/augmented"))["validation"]
    out = fewshot.train(p, get_task("classification"), root / "data/prepared", validation, labels)
    assert out["summary"]["train_examples"] == 36 and out["loss"]  # 12 per class; the contrastive loss was logged
    model, tok = out["model"], out["tokenizer"]
    assert isinstance(model, SentenceEmbeddingClassifier)
    texts = [text for text, _ in synthetic_rows(20, seed=5)]
    # The saved torch model computes setfit's own probabilities (body, mean pooling, normalisation, head).
    assert fewshot.check_head_matches(out["setfit"], model, tok, texts) < 1e-5
    # It learned the keywords: validation accuracy well above chance (1/3).
    assert out["val"]["accuracy"] > 0.6, out["val"]

    # Saved and loaded back from safetensors, without remote code: the same logits.
    model.save_pretrained(root / "saved")
    tok.save_pretrained(root / "saved")
    config = json.loads((root / "saved/config.json").read_text())
    assert config["tunepipe_pooling"] == "mean_normalized"
    assert config["architectures"] == ["SentenceEmbeddingClassifier"]
    assert not list((root / "saved").glob("*.pkl")) and not list((root / "saved").glob("*.bin"))
    again = load_classifier(root / "saved")
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, model(**enc).logits, rtol=0, atol=1e-6)


def test_finetune_stage_with_setfit_feeds_evaluate_and_export(project):
    root = project(**QUICK, **{"data.train_per_class": 10})
    prepare.main()
    tokenize.main()
    augment.main()
    finetune.main()
    report = read_json(root / "reports/train.json")
    assert report["method"] == "setfit" and report["train_examples"] == 30 and report["precision"] == "fp32"
    info, _, model, _ = load_trained(root / "models/model")
    assert isinstance(model, SentenceEmbeddingClassifier) and info["labels"] == ["negative", "neutral", "positive"]
    for name in ("train_loss.csv", "validation.csv", "training_curves.png"):
        assert (root / "reports/plots" / name).is_file(), name
    evaluate.main()
    metrics = read_json(root / "reports/metrics.json")
    assert metrics["n_test"] > 0 and 0 <= metrics["macro_f1"] <= 1
    assert (root / "reports/explanations.html").is_file()  # word attributions run on the SetFit model too
    export.main()
    exp = read_json(root / "reports/export.json")
    assert exp["fp32_max_abs_logit_diff"] <= exp["parity_tolerance"]
    assert exp["fp32_label_agreement"] == 1.0


def test_setfit_refuses_a_body_that_does_not_mean_pool(project, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    project(**QUICK)
    tiny = load_params().model.name
    cls_dir = tmp_path / "cls-pooled"
    word = Transformer(tiny)
    SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "cls")]).save(str(cls_dir))
    p = parse_params({**yaml.safe_load(open("params.yaml")), "model": {"name": str(cls_dir)}})
    with pytest.raises(UserError, match=r"needs Transformer \+ mean Pooling"):
        fewshot.sentence_body(p, "cpu")
    assert load_tokenizer(tiny) is not None


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dvc_repro_with_setfit_through_export_and_promote(tmp_path, tiny_model_dir):
    root = clone_repo(tmp_path / "repo")
    write_csv(root / "data/raw/train.csv", synthetic_rows(150))
    params = tiny_params(tiny_model_dir, **QUICK, **{"data.train_per_class": 10})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    res = sh(["dvc", "repro"], root)
    out = res.stdout
    assert "finetune: setfit on 30 texts" in out and "export: fp32 max |diff|" in out
    for noise in ("{'embedding_loss'", "Running training", "Map:", "pin_memory", "Traceback", "FutureWarning"):
        assert noise not in out + res.stderr, noise  # setfit's own chatter is kept out, as the Trainer's is
    export_report = json.loads((root / "reports/export.json").read_text())
    assert export_report["fp32_max_abs_logit_diff"] <= export_report["parity_tolerance"]
    assert json.loads((root / "reports/data.json").read_text())["splits"]["train"]["rows"] == 30

    sh([sys.executable, "-m", "tunepipe.cli", "promote"], root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='tunepipe-classifier'")
    assert len(versions) == 1
    assert client.get_registered_model("tunepipe-classifier").aliases.get("champion") == versions[0].version
    run = client.get_run(versions[0].run_id)
    assert run.data.params["finetune.method"] == "setfit" and run.data.tags["tunepipe.method"] == "setfit"

    # The champion serves raw text, and explains it from the SetFit torch model logged beside it (its class
    # travels as code with the registered version).
    res = sh([sys.executable, "-m", "tunepipe.cli", "predict", "what a great flight", "--json", "--explain",
              "--model", "models:/tunepipe-classifier@champion"], root)
    row = json.loads(res.stdout.splitlines()[0])
    assert row["label"] in {"negative", "neutral", "positive"}
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
    assert [a["word"] for a in row["attributions"]] == ["what", "a", "great", "flight"]
    assert np.isfinite([a["weight"] for a in row["attributions"]]).all()
