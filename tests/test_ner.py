"""Token classification (task: ner): CoNLL reading, tag schemes, alignment, augmentation, metrics, spans, e2e."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import (
    ORGS,
    PEOPLE,
    PLACES,
    REPO,
    clone_repo,
    commit_all,
    sh,
    synthetic_sentences,
    tiny_params,
    write_conll,
    write_tiny_dir,
)
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import parse_params
from tunepipe.tasks.ner import augment as ner_augment
from tunepipe.tasks.ner import scheme as ner_scheme
from tunepipe.tasks.ner.data import read_conll
from tunepipe.tasks.ner.encode import IGNORED, align_labels
from tunepipe.tasks.ner.evaluate import entity_confusion
from tunepipe.tasks.ner.metrics import compute_metrics as ner_metrics
from tunepipe.tasks.ner.metrics import entity_scores, per_type
from tunepipe.tasks.ner.scheme import detect_and_validate
from tunepipe.tasks.ner.serve import split_words, tag_spans

SHARED_CONLL = REPO.parent / "shared/data/conll2003"


def iob2_to_iob1(tags: list[str]) -> list[str]:
    """IOB1 keeps B- only where an entity directly follows one of the same type."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") and not (i and tags[i - 1] != "O" and tags[i - 1][2:] == tag[2:]):
            tag = "I-" + tag[2:]
        out.append(tag)
    return out


@pytest.fixture
def ner_project(tmp_path, monkeypatch, tiny_model_dir):
    """A working directory with NER params; `make(**overrides)` writes params.yaml (data written by the test)."""

    def make(**overrides) -> Path:
        params = tiny_params(tiny_model_dir, **{"task": "ner", "data.source": "data/raw/conll", **overrides})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return tmp_path

    monkeypatch.chdir(tmp_path)
    return make


def run_prepare(root: Path) -> dict:
    from stages import prepare

    prepare.main()
    return read_json(root / "reports/data.json")


# --- reading and tag schemes ----------------------------------------------------------------------------------

def test_read_conll_skips_docstart_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
                    "Peter\tB-PER\nBlackburn\tI-PER\n")
    sents = read_conll(path)
    assert [s.tokens for s in sents] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sents] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert sents[1].where(1) == f"{path}:8"

    path.write_text("EU B-ORG\nlonely\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: expected a token and its tag"):
        read_conll(path)


@pytest.mark.parametrize(("text", "scheme", "line", "message"), [
    ("EU B-ORG\n\nthe O\nUnion I-ORG\n", "IOB2", 4, "I-ORG cannot follow O, which IOB2 does not allow"),
    ("the O\nBig B-ORG\nBank I-LOC\n", "BIO", 3, "I-LOC cannot follow B-ORG"),
    ("a O\nNew B-LOC\nYork I-LOC\n\nParis S-LOC\nin O\n", "BIOES", 3, "I-LOC is not closed by I-/E-LOC before"),
    ("a O\nNew B-LOC\nYork I-LOC\n\nParis S-LOC\n", "auto", 3, "not closed"),
    ("a O\nYork E-LOC\n\nParis S-LOC\n", "auto", 2, "E-LOC cannot follow O, which BIOES does not allow"),
    ("Paris S-LOC\n", "IOB2", 1, "'S-LOC' is not allowed in IOB2"),
    ("EU B_ORG\n", "auto", 1, "tag 'B_ORG' is not O or PREFIX-TYPE"),
    # I- opening an entity (IOB1) and B- opening one after O (IOB2) in the same data: neither scheme fits.
    ("a O\nEU I-ORG\n\nthe O\nUN B-ORG\n", "auto", 2, "not IOB2, and B-ORG at .*:5 rules out IOB1"),
    ("a O\nEU I-ORG\n\nthe O\nUN B-ORG\n", "IOB1", 5, "B-ORG after O .IOB1 starts entities with I-"),
])
def test_tag_scheme_errors_name_the_file_and_line(tmp_path, text, scheme, line, message):
    path = tmp_path / "train.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:{line}: .*{message}"):
        detect_and_validate(read_conll(path), scheme)


def test_scheme_detection(tmp_path):
    def found(text):
        (tmp_path / "f").write_text(text)
        return detect_and_validate(read_conll(tmp_path / "f"), "auto")

    assert found("John B-PER\nSmith I-PER\nsaid O\n") == "IOB2"
    assert found("John I-PER\nSmith I-PER\nMary B-PER\n") == "IOB1"
    assert found("John B-PER\nSmith E-PER\nin O\nParis S-LOC\n") == "BIOES"
    assert ner_scheme.iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == [
        "B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]


def test_prepare_stage_reports_scheme_error_in_one_line(ner_project, capsys):
    from stages import prepare
    from tunepipe.errors import run_main

    root = ner_project()
    write_tiny_dir(root)
    with open(root / "data/raw/conll/eng.testa", "a") as fh:
        fh.write("\nthe DT O O\nUnion NNP I-NP I-ORG\n")
    with pytest.raises(SystemExit) as exc:
        run_main(prepare.main)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    n_lines = len((root / "data/raw/conll/eng.testa").read_text().splitlines())
    assert err.splitlines() == [err] and err.startswith(f"error: data/raw/conll/eng.testa:{n_lines}: I-ORG")
    assert not (root / "data/prepared").exists()


# --- prepare ---------------------------------------------------------------------------------------------------

def count_entities(sentences) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, tags in sentences:
        for t in tags:
            if t.startswith("B-"):
                counts[t[2:]] = counts.get(t[2:], 0) + 1
    return counts


def test_prepare_conll_directory(ner_project):
    root = ner_project()
    write_tiny_dir(root)
    report = run_prepare(root)
    assert report["scheme"] == {"found": "IOB2", "stored": "IOB2"}
    assert report["labels"] == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    for split, seed, n in (("train", 1, 120), ("validation", 2, 30), ("test", 3, 30)):
        assert report["splits"][split]["rows"] == n
        assert report["splits"][split]["entities"] == dict(sorted(count_entities(synthetic_sentences(n, seed))
                                                                  .items()))
    meta = read_json(root / "data/prepared/meta.json")
    assert meta["task"] == "ner" and meta["labels"] == report["labels"] and meta["data_hash"] == report["data_hash"]
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    assert [list(t) for t in test["tokens"]] == [s[0] for s in synthetic_sentences(30, 3)]
    assert [list(t) for t in test["tags"]] == [s[1] for s in synthetic_sentences(30, 3)]


def test_prepare_single_file_split_and_cap_are_seeded(ner_project):
    root = ner_project(**{"data.source": "data/raw/all.conll", "data.max_train_samples": 50})
    write_conll(root / "data/raw/all.conll", synthetic_sentences(200, seed=4))
    first = run_prepare(root)
    sizes = {k: v["rows"] for k, v in first["splits"].items()}
    assert sizes == {"train": 50, "validation": 20, "test": 20} and first["train_capped_from"] == 160
    again = run_prepare(root)
    assert again["hashes"] == first["hashes"]
    other = ner_project(**{"data.source": "data/raw/all.conll", "data.max_train_samples": 50, "data.seed": 1})
    assert run_prepare(other)["hashes"]["test"] != first["hashes"]["test"]


def test_prepare_iob1_is_stored_as_iob2(ner_project):
    root = ner_project(**{"data.source": "data/raw/iob1"})
    iob1 = [(t, iob2_to_iob1(g)) for t, g in synthetic_sentences(60, seed=5)]
    for name, part in (("train.txt", iob1[:40]), ("dev.txt", iob1[40:50]), ("test.txt", iob1[50:])):
        write_conll(root / "data/raw/iob1" / name, part)
    assert any(g[0].startswith("I-") for _, g in iob1)  # the data really is IOB1
    report = run_prepare(root)
    assert report["scheme"] == {"found": "IOB1", "stored": "IOB2"}
    train = pd.read_parquet(root / "data/prepared/train.parquet")
    assert [list(t) for t in train["tags"]] == [g for _, g in synthetic_sentences(60, seed=5)[:40]]


def test_prepare_rejects_entity_type_unseen_in_train(ner_project):
    root = ner_project()
    d = write_tiny_dir(root)
    write_conll(d / "eng.testb", [(["Zorg", "said"], ["B-ALIEN", "O"])])
    with pytest.raises(UserError, match="entity type.*ALIEN appear in the test split but never in train"):
        run_prepare(root)


def test_prepare_hf_source_names_tags_and_drops_empty_sentences(ner_project, tmp_path):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=names))})
    hub = tmp_path / "hub"
    for split, seed in (("train", 1), ("validation", 2), ("test", 3)):
        rows = synthetic_sentences(30, seed)
        ds = datasets.Dataset.from_dict({"tokens": [t for t, _ in rows] + [[]],
                                         "ner_tags": [[names.index(x) for x in g] for _, g in rows] + [[]]},
                                        features=features)
        hub.mkdir(exist_ok=True)
        ds.to_parquet(hub / f"{split}.parquet")
    root = ner_project(**{"data.source": f"hf:{hub}"})
    report = run_prepare(root)
    assert report["drops"]["empty_sentence"] == 3
    assert report["splits"]["train"]["rows"] == 30
    assert report["splits"]["train"]["entities"] == dict(sorted(count_entities(synthetic_sentences(30, 1)).items()))


# --- tokenize: sub-token alignment ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from tunepipe.modeling import load_tokenizer

    return load_tokenizer("builtin:minilm-l6")


TRICKY = ["U.S.", "Hochschulrektorenkonferenz", "\u200b", "São", "Paulo", "1996-08-22", "😀", "'s"]
TRICKY_TAGS = ["B-LOC", "B-ORG", "O", "B-LOC", "I-LOC", "O", "O", "O"]


def test_alignment_labels_first_subtoken_of_tricky_words(tokenizer):
    labels = ["B-LOC", "B-ORG", "I-LOC", "I-ORG", "O"]
    ids = [labels.index(t) for t in TRICKY_TAGS]
    enc = tokenizer(TRICKY, is_split_into_words=True)
    word_ids = enc.word_ids()
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    inside = {0: 2, 1: 3}
    first = align_labels(word_ids, ids, label_all=False, inside=inside)
    assert first[0] == first[-1] == IGNORED  # [CLS], [SEP]
    # "U.S." is four pieces (u . s .), the long word many; only each word's first piece is labelled.
    assert pieces[1:5] == ["u", ".", "s", "."] and first[1:5] == [0, IGNORED, IGNORED, IGNORED]
    assert 2 not in word_ids  # the zero-width space has no sub-token at all: nothing to label
    labelled = [(w, lab) for w, lab in zip(word_ids, first, strict=True) if lab != IGNORED]
    assert labelled == [(w, ids[w]) for w in (0, 1, 3, 4, 5, 6, 7)]
    assert len(first) == len(word_ids) and first.count(IGNORED) == len(word_ids) - 7

    every = align_labels(word_ids, ids, label_all=True, inside=inside)
    by_word = {}
    for w, lab in zip(word_ids, every, strict=True):
        by_word.setdefault(w, []).append(lab)
    assert by_word[None] == [IGNORED, IGNORED]
    assert by_word[0] == [0, 2, 2, 2]  # B-LOC then I-LOC: no piece opens a second entity
    assert by_word[1][0] == 1 and set(by_word[1][1:]) == {3} and len(by_word[1]) > 3
    assert len(by_word[5]) == 5 and set(by_word[5]) == {4}  # 1996 - 08 - 22: O stays O


def test_tokenize_stage_aligns_and_reports_truncation(ner_project):
    from stages import prepare
    from stages import tokenization as tokenize

    root = ner_project(**{"tokenize.max_length": 10})
    d = write_tiny_dir(root)
    write_conll(d / "eng.testb", [(TRICKY, TRICKY_TAGS), *synthetic_sentences(5, 3)])
    prepare.main()
    tokenize.main()
    test = datasets.load_from_disk(str(root / "data/tokenized"))["test"]
    assert {"input_ids", "attention_mask", "labels", "length", "word_ids", "tokens", "tags"} <= set(test.column_names)
    assert all(len(x) <= 10 for x in test["input_ids"]) and test["length"] == [len(x) for x in test["input_ids"]]
    names = test.features["tags"].feature.names
    row = test[0]
    assert row["tokens"] == TRICKY and len(row["word_ids"]) == 10
    labelled = {w: names[lab] for w, lab in zip(row["word_ids"], row["labels"], strict=True) if lab != IGNORED}
    assert labelled == {0: "B-LOC", 1: "B-ORG"}  # [CLS] u . s . hoc ##hs ##chu ##lr [SEP]: two words fit
    cut = read_json(root / "reports/tokenize.json")["splits"]["test"]
    assert cut["examples"] == 6 and cut["truncated"] >= 1 and cut["words_cut"] >= len(TRICKY) - 2

    ner_project(**{"tokenize.max_length": 64})
    tokenize.main()
    cut = read_json(root / "reports/tokenize.json")["splits"]["test"]
    assert cut["truncated"] == 0 and cut["words_without_subtokens"] == 1  # the zero-width space


# --- augmentation ----------------------------------------------------------------------------------------------

def test_entity_swap_keeps_tags_aligned(ner_project):
    from stages import augment, prepare
    from stages import tokenization as tokenize

    root = ner_project(**{"augment.method": "entity_swap", "augment.ratio": 1.0, "augment.probability": 0.5})
    write_tiny_dir(root, n_train=40)
    prepare.main()
    tokenize.main()
    augment.main()
    train = datasets.load_from_disk(str(root / "data/augmented"))["train"]
    names = train.features["tags"].feature.names
    mentions = {k: {tuple(m) for m in v} for k, v in (("PER", PEOPLE), ("LOC", PLACES), ("ORG", ORGS))}
    assert len(train) == 80
    originals = {tuple(t) for t in train.select(range(40))["tokens"]}
    changed = 0
    for row in train.select(range(40, 80)):
        tags = [names[i] for i in row["tags"]]
        spans = ner_scheme.entity_spans(tags)
        assert spans and len(tags) == len(row["tokens"])
        for kind, a, b in spans:  # every mention is a whole mention of the same type
            assert tuple(row["tokens"][a:b]) in mentions[kind]
        changed += tuple(row["tokens"]) not in originals
        first = [lab for lab in row["labels"] if lab != IGNORED]
        assert first == row["tags"]  # re-tokenized: labels follow the new words
    assert changed >= 30


def test_token_mask_masks_only_outside_words():
    rng = np.random.default_rng(0)
    toks, tags = ["John", "Smith", "went", "to", "Paris", "today"], ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]
    out, out_tags = ner_augment.mask_outside(toks, tags, 0.99, "[MASK]", rng)
    assert out_tags == tags and out == ["John", "Smith", "[MASK]", "[MASK]", "Paris", "[MASK]"]
    out, _ = ner_augment.mask_outside(toks, tags, 0.01, "[MASK]", rng)
    assert out.count("[MASK]") == 1  # at least one word changes


def test_augment_refuses_methods_that_break_alignment():
    p = parse_params({"task": "ner", "augment": {"method": "random_deletion", "ratio": 0.5}})
    with pytest.raises(UserError, match="augment.method: random_deletion is not available for task: ner"):
        ner_augment.augment(datasets.Dataset.from_dict({"x": [1]}), p)


# --- metrics, confusion, spans -------------------------------------------------------------------------------

LABELS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]


def test_entity_metrics_are_strict_and_entity_level():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["I-LOC", "I-LOC", "O"]]  # wrong type; no B- (invalid in IOB2)
    m = entity_scores(gold, pred, LABELS)
    # Gold: PER, LOC, LOC. Predicted (strict): PER, PER. Correct: 1 -> P 1/2, R 1/3, F1 0.4.
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4) and m["accuracy"] == pytest.approx(5 / 7)
    types = per_type(gold, pred, LABELS)
    assert types["PER"]["f1"] == pytest.approx(2 / 3) and types["LOC"]["f1"] == 0 and types["LOC"]["support"] == 2
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_trainer_metrics_skip_ignored_positions():
    ids = {lab: i for i, lab in enumerate(LABELS)}
    gold = np.array([[IGNORED, ids["B-PER"], IGNORED, ids["O"], IGNORED]])
    logits = np.zeros((1, 5, len(LABELS)))
    for pos, lab in enumerate(["O", "B-PER", "I-LOC", "O", "B-LOC"]):  # noise at the ignored positions
        logits[0, pos, ids[lab]] = 5.0
    m = ner_metrics(LABELS)((logits, gold))
    assert m["f1"] == 1.0 and m["accuracy"] == 1.0
    logits[0, 1] = 0.0
    logits[0, 1, ids["O"]] = 5.0
    assert ner_metrics(LABELS)((logits, gold))["f1"] == 0.0


def test_entity_confusion_pairs():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["B-LOC", "O"]]
    assert sorted(entity_confusion(gold, pred, LABELS)) == [("LOC", "PER"), ("O", "LOC"), ("PER", "PER")]
    assert entity_confusion([["B-PER", "I-PER"]], [["B-PER", "O"]], LABELS) == [("PER", "O"), ("O", "PER")]


def test_tag_spans_aggregate_words_leniently():
    assert tag_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7)]
    assert tag_spans(["O", "I-LOC", "I-PER"]) == [("LOC", 1, 2), ("PER", 2, 3)]
    assert tag_spans(["B-ORG", "I-ORG", "E-ORG", "S-LOC", "S-LOC", "B-PER"]) == [
        ("ORG", 0, 3), ("LOC", 3, 4), ("LOC", 4, 5), ("PER", 5, 6)]
    assert tag_spans([]) == [] and tag_spans(["O"]) == []


def test_split_words_cuts_like_conll():
    text = "U.S. envoy O'Neill's AT&T deal, worth $1,000.50 on 1996-08-22 (New York-based)."
    words = split_words(text)
    assert [w for w, _, _ in words] == ["U.S.", "envoy", "O'Neill", "'s", "AT&T", "deal", ",", "worth", "$",
                                        "1,000.50", "on", "1996-08-22", "(", "New", "York-based", ")", "."]
    assert all(text[a:b] == w for w, a, b in words)


# --- end to end ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ner_repo(tmp_path_factory, tiny_model_dir):
    """`dvc repro` with task: ner on a tiny CoNLL sample, in a fresh copy of the repository."""
    root = clone_repo(tmp_path_factory.mktemp("ner") / "repo")
    write_tiny_dir(root, n_train=240, n_eval=30)
    params = tiny_params(tiny_model_dir, **{
        "task": "ner", "data.source": "data/raw/conll", "tracking.model_name": "tunepipe-ner",
        "augment.method": "entity_swap", "augment.ratio": 0.25, "finetune.epochs": 4.0, "finetune.eval_steps": 20})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    out = sh(["dvc", "repro"], root).stdout
    for stage in ("prepare", "tokenize", "augment", "finetune", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    return root


@pytest.mark.slow
def test_dvc_repro_ner_end_to_end(ner_repo):
    metrics = read_json(ner_repo / "reports/metrics.json")
    assert set(metrics) >= {"f1", "macro_f1", "precision", "recall", "accuracy", "n_test", "per_type"}
    assert metrics["n_test"] == 30 and set(metrics["per_type"]) == {"LOC", "ORG", "PER"}
    assert sum(t["support"] for t in metrics["per_type"].values()) == sum(
        count_entities(synthetic_sentences(30, 3)).values())
    assert metrics["f1"] > 0.5  # closed mention lists: even the tiny model finds most entities
    assert read_json(ner_repo / "reports/train.json")["best_val_f1"] > 0.5
    assert read_json(ner_repo / "reports/augment.json")["added"] == 60
    preds = pd.read_csv(ner_repo / "reports/predictions.csv")
    assert list(preds.columns[:3]) == ["id", "label", "prediction"] and len(preds) == 30
    # Per-sentence entity counts add up to the entity-level F1 (what a paired test would resample).
    assert preds["gold_entities"].sum() == sum(t["support"] for t in metrics["per_type"].values())
    assert 2 * preds["correct_entities"].sum() / (preds["gold_entities"].sum() + preds["pred_entities"].sum()) \
        == pytest.approx(metrics["f1"])
    assert all(len(a.split()) == len(b.split()) for a, b in zip(preds["label"], preds["prediction"], strict=True))
    confusion = pd.read_csv(ner_repo / "reports/plots/confusion.csv")
    assert set(confusion["actual"]) <= {"LOC", "ORG", "PER", "O"}
    assert (confusion["actual"] != "O").sum() == sum(t["support"] for t in metrics["per_type"].values())
    assert "micro avg" in (ner_repo / "reports/classification_report.txt").read_text()
    export = read_json(ner_repo / "reports/export.json")
    assert export["fp32_max_abs_logit_diff"] <= export["parity_tolerance"] and export["fp32_label_agreement"] == 1
    assert export["n_compared"] > 30  # every real sub-token of the test split, not one per sentence


@pytest.mark.slow
def test_registered_pyfunc_returns_entity_spans(ner_repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ner_repo / 'mlflow.db'}")
    version = read_json(ner_repo / "reports/export.json")["registered"]["version"]
    model = mlflow.pyfunc.load_model(f"models:/tunepipe-ner/{version}")
    texts = ["John Smith visited Paris on Monday .", "Globex opened an office in New York.", "nothing here ."]
    out = model.predict(texts)
    results = out["entities"].tolist()
    for text, ents in zip(texts, results, strict=True):
        for e in ents:
            assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    found = [{(e["text"], e["type"]) for e in ents} for ents in results]
    assert {("John Smith", "PER"), ("Paris", "LOC")} <= found[0]
    assert ("Globex", "ORG") in found[1] and found[2] == set()

    from tunepipe.serving.pyfunc_model import TextPredictor

    local = TextPredictor(ner_repo / "models/onnx").predict(texts)
    assert [r["entities"] for r in local] == results
    res = sh([sys.executable, "-m", "tunepipe.cli", "predict", "Wei Chen works for Initech now .", "--json"], ner_repo)
    row = json.loads(res.stdout)
    assert {(e["text"], e["type"]) for e in row["entities"]} >= {("Wei Chen", "PER"), ("Initech", "ORG")}
    plain = sh([sys.executable, "-m", "tunepipe.cli", "predict", "Maria Garcia visited Tokyo ."], ner_repo).stdout
    assert "entities: Maria Garcia [PER]" in plain


# --- the quality bar on real CoNLL-2003 -----------------------------------------------------------------------

@pytest.mark.skipif(not SHARED_CONLL.is_dir(), reason=f"CoNLL-2003 not found at {SHARED_CONLL} (see ../shared/data)")
def test_real_conll_prepares_with_published_counts(ner_project):
    root = ner_project(**{"data.source": str(SHARED_CONLL)})
    report = run_prepare(root)
    # Counts as published with the data (../shared/data/README.md).
    assert {k: v["rows"] for k, v in report["splits"].items()} == {"train": 14041, "validation": 3250, "test": 3453}
    assert {k: v["entities_total"] for k, v in report["splits"].items()} == {
        "train": 23499, "validation": 5942, "test": 5648}
    assert report["scheme"]["found"] == "IOB2" and report["entity_types"] == ["LOC", "MISC", "ORG", "PER"]
