"""prepare on awkward input (issue 11): train caps that would lose a class, hub class names, missing labels in
nullable columns, ambiguous split files, byte-order marks, and sources DVC cannot track. All in-process."""

from __future__ import annotations

import codecs
import json

import datasets
import pandas as pd
import pytest
import yaml

from tests.helpers import REPO, synthetic_rows, synthetic_sentences, write_conll, write_csv
from tunepipe import data as shared_data
from tunepipe.errors import UserError
from tunepipe.params import parse_params
from tunepipe.tasks import get_task


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty project directory to run prepare in (no model needed)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def prepare(task: str = "classification", **data):
    prepared = get_task(task).prepare(parse_params({"task": task, "data": data}))
    return prepared.splits, prepared.report


def write_jsonl(path, rows: list[dict], bom: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
    return path


# --- 1. data.max_train_samples ---------------------------------------------------------------------------------

def rare_class_dir(root):
    """Pre-split data whose class 'c' is rare in train but present in validation and test."""
    rows = synthetic_rows(260, classes=("negative", "positive"))
    rare = [(f"rare example number {i}", "c") for i in range(6)]
    d = root / "data/raw/split"
    write_csv(d / "train.csv", rows[:200] + rare[:2])
    write_csv(d / "validation.csv", rows[200:230] + rare[2:4])
    write_csv(d / "test.csv", rows[230:] + rare[4:])
    return d


def test_cap_keeps_every_class_the_other_splits_have(workdir):
    rare_class_dir(workdir)
    # Before: the cap ran after the unseen-label check and dropped 'c' from train (tokenize: KeyError: 'c').
    splits, report = prepare(source="data/raw/split", max_train_samples=10)
    assert len(splits["train"]) == 10 and report["train_capped_from"] == 202
    assert set(splits["train"]["label"]) == {"negative", "positive", "c"}
    assert report["labels"] == ["c", "negative", "positive"]
    assert prepare(source="data/raw/split", max_train_samples=10)[1]["hashes"] == report["hashes"]  # seeded


@pytest.mark.parametrize("cap", [199, 201])
def test_cap_near_the_train_size_is_no_sklearn_error(workdir, cap):
    rare_class_dir(workdir)
    # Before: ValueError from scikit-learn ("The test_size = 1 should be greater or equal to the number of classes").
    splits, _ = prepare(source="data/raw/split", max_train_samples=cap)
    assert len(splits["train"]) == cap and set(splits["train"]["label"]) == {"negative", "positive", "c"}


def test_cap_below_the_class_count_names_the_key(workdir):
    rare_class_dir(workdir)
    with pytest.raises(UserError, match=r"data.max_train_samples: 2 is fewer than the 3 classes .*set it to at "
                                        r"least 3"):
        prepare(source="data/raw/split", max_train_samples=2)


def rare_entity_dir(root):
    """CoNLL splits where MISC appears in one train sentence and in test."""
    sents = synthetic_sentences(140, seed=6)
    misc = (["the", "Euro", "rose"], ["O", "B-MISC", "O"])
    d = root / "data/raw/conll"
    write_conll(d / "train.txt", [misc] + sents[:100])
    write_conll(d / "dev.txt", sents[100:120])
    write_conll(d / "test.txt", sents[120:] + [(["a", "Euro", "fell"], ["O", "B-MISC", "O"])])
    return d


def test_ner_cap_keeps_every_entity_type(workdir):
    rare_entity_dir(workdir)
    # Before: a plain random sample lost MISC, and prepare blamed the data ("appear in the test split but never in
    # train") for what the cap did.
    _, report = prepare("ner", source="data/raw/conll", max_train_samples=5)
    assert report["splits"]["train"]["rows"] == 5 and report["train_capped_from"] == 101
    assert report["entity_types"] == ["LOC", "MISC", "ORG", "PER"]
    with pytest.raises(UserError, match=r"data.max_train_samples: 2 train sentences cannot hold all 4 entity types"):
        prepare("ner", source="data/raw/conll", max_train_samples=2)


def test_multilabel_cap_keeps_every_label(workdir):
    """A rare label (one train text of 200) survives a cap of 5; a cap below the label count names the key."""
    rows = [(t, "joy|love" if lab == "positive" else lab) for t, lab in synthetic_rows(230)]
    rare = [(f"rare anger text {i}", "anger") for i in range(3)]
    d = workdir / "data/raw/split"
    write_csv(d / "train.csv", rows[:200] + rare[:1])
    write_csv(d / "validation.csv", rows[200:215] + rare[1:2])
    write_csv(d / "test.csv", rows[215:] + rare[2:])
    splits, report = prepare("multilabel", source="data/raw/split", max_train_samples=5)
    assert len(splits["train"]) == 5
    assert {x for ls in splits["train"]["labels"] for x in ls} == {"anger", "joy", "love", "negative", "neutral"}
    with pytest.raises(UserError, match=r"data.max_train_samples: 4 is fewer than the 5 labels in the train split"):
        prepare("multilabel", source="data/raw/split", max_train_samples=4)


# --- 2. hub class names ----------------------------------------------------------------------------------------

def hub_dir(root, test_labels: list[int] | None = None):
    """A local data set in the layout `datasets.load_dataset` reads (parquet keeps the ClassLabel feature)."""
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = synthetic_rows(120, classes=("negative", "positive"))
    parts = {"train": rows[:80], "validation": rows[80:100], "test": rows[100:]}
    d = root / "hub"
    d.mkdir()
    for split, part in parts.items():
        labels = test_labels if split == "test" and test_labels is not None else \
            [int(lab == "positive") for _, lab in part]
        datasets.Dataset.from_dict({"text": [t for t, _ in part], "label": labels}, features=features) \
            .to_parquet(d / f"{split}.parquet")
    return d


def test_hf_class_labels_keep_their_names(workdir):
    d = hub_dir(workdir)
    # Before: labels '0' and '1', and the served model answered "1".
    splits, report = prepare(source=f"hf:{d}", label_column="label")
    assert report["labels"] == ["neg", "pos"]
    assert set(splits["test"]["label"]) == {"neg", "pos"}


def test_hf_frame_maps_class_ids_and_no_label():
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, -1, 0]},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["neg", "pos"])}))
    df = shared_data.hf_frame(ds)
    assert df["label"].tolist()[0::2] == ["pos", "neg"] and pd.isna(df["label"][1])


def test_hf_multilabel_class_lists_keep_their_names(workdir):
    """A hub multi-label column (a list of class ids, as GoEmotions on the hub) prepares as label names."""
    names = ["anger", "joy", "love"]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "labels": datasets.List(datasets.ClassLabel(names=names))})
    d = workdir / "hub"
    d.mkdir()
    rows = synthetic_rows(150)
    sets = [[0], [1, 2], []]
    for split, part in {"train": rows[:100], "validation": rows[100:125], "test": rows[125:]}.items():
        datasets.Dataset.from_dict({"text": [t for t, _ in part],
                                    "labels": [sets[i % 3] for i in range(len(part))]},
                                   features=features).to_parquet(d / f"{split}.parquet")
    # Before: label sets of ids, '0', '1', '2'.
    splits, report = prepare("multilabel", source=f"hf:{d}", label_column="labels")
    assert report["labels"] == names
    assert {tuple(x) for x in splits["test"]["labels"]} == {("anger",), ("joy", "love"), ()}


def test_hf_unlabelled_test_split_is_carved_from_train(workdir, capsys):
    d = hub_dir(workdir, test_labels=[-1] * 20)  # hub test splits often hide their labels
    splits, report = prepare(source=f"hf:{d}", label_column="label")
    assert report["drops"]["missing_label"] == 20
    assert set(splits["test"]["label"]) == {"neg", "pos"}
    assert "the test split of hf:" in capsys.readouterr().err


# --- 3. missing labels in a nullable integer column ------------------------------------------------------------

def test_nullable_int_labels_drop_missing_values(workdir):
    rows = synthetic_rows(90, classes=("negative", "positive"))
    labels = pd.array([int(lab == "positive") for _, lab in rows] + [None] * 4, dtype="Int64")
    path = workdir / "data/raw/train.parquet"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"text": [t for t, _ in rows] + [f"no label {i}" for i in range(4)], "label": labels}) \
        .to_parquet(path)
    # Before: a class '<NA>'.
    splits, report = prepare(source=str(path), label_column="label")
    assert report["labels"] == ["0", "1"]
    assert report["drops"]["missing_label"] == 4  # counted like an empty label in a CSV


def test_null_labels_in_jsonl_and_empty_labels_in_csv_are_dropped_alike(workdir):
    rows = synthetic_rows(90, classes=("negative", "positive"))
    write_jsonl(workdir / "data/raw/train.jsonl", [{"text": t, "label": int(lab == "positive")} for t, lab in rows]
                + [{"text": "no label here", "label": None}])
    _, report = prepare(source="data/raw/train.jsonl", label_column="label")
    assert report["labels"] == ["0", "1"]  # not '0.0'/'1.0' from the float column pandas makes of ints with a null
    assert report["drops"]["missing_label"] == 1
    write_csv(workdir / "data/raw/train.csv", [(t, str(int(lab == "positive"))) for t, lab in rows]
              + [("no label here", "")], header=("text", "label"))
    _, from_csv = prepare(source="data/raw/train.csv", label_column="label")
    assert from_csv["labels"] == report["labels"] and from_csv["drops"] == report["drops"]


# --- 4. split files in a directory -----------------------------------------------------------------------------

def test_upper_case_suffix_is_read(workdir):
    write_csv(workdir / "data/raw/split/TRAIN.CSV", synthetic_rows(150))
    # Before: "has no train file".
    splits, _ = prepare(source="data/raw/split")
    assert sum(len(s) for s in splits.values()) == 150


@pytest.mark.parametrize("first, second, split", [
    ("train.csv", "train.jsonl", "train"),
    ("train.csv", "train.CSV", "train"),
    ("dev.csv", "validation.CSV", "validation"),
])
def test_two_files_for_one_split_are_an_error(workdir, first, second, split):
    d = workdir / "data/raw/split"
    write_csv(d / "train.csv", synthetic_rows(150))
    for name in (first, second):
        if name.endswith("jsonl"):
            write_jsonl(d / name, [{"text": t, "sentiment": lab} for t, lab in synthetic_rows(20, seed=1)])
        else:
            write_csv(d / name, synthetic_rows(20, seed=1) if name != "train.csv" else synthetic_rows(150))
    if not any(f.name == second for f in d.iterdir()):
        pytest.skip("case-insensitive file system")
    names = sorted([first, second])
    with pytest.raises(UserError, match=rf"has two {split} files \({names[0]}, {names[1]}\); keep one of them .*move "
                                        "the other file out"):
        prepare(source="data/raw/split")


def test_split_file_of_unreadable_type_is_not_skipped(workdir):
    d = workdir / "data/raw/split"
    write_csv(d / "train.csv", synthetic_rows(150))
    (d / "test.xlsx").write_bytes(b"PK")
    # Before: test.xlsx was ignored and a test split carved out of train without a word.
    with pytest.raises(UserError, match=r"test.xlsx: unsupported file type '.xlsx'"):
        prepare(source="data/raw/split")


# --- 5. byte-order marks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", [None, "utf-8", "UTF8"])
def test_utf8_bom_is_accepted_in_jsonl_csv_and_tsv(workdir, encoding):
    rows = synthetic_rows(90)
    write_jsonl(workdir / "data/raw/train.jsonl", [{"text": t, "sentiment": lab} for t, lab in rows], bom=True)
    # Before: "could not be parsed as jsonl: Expected object or value", no word of the BOM.
    splits, _ = prepare(source="data/raw/train.jsonl", encoding=encoding)
    assert sum(len(s) for s in splits.values()) == 90
    for name, sep in (("train.csv", ","), ("train.tsv", "\t")):
        text = "text" + sep + "sentiment\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in rows)
        (workdir / "data/raw" / name).write_bytes(codecs.BOM_UTF8 + text.encode())
        # Before: "data.text_column: column 'text' not found" (the header read '\ufefftext').
        splits, _ = prepare(source=f"data/raw/{name}", encoding=encoding)
        assert sum(len(s) for s in splits.values()) == 90
        assert not any(t.startswith("\ufeff") for s in splits.values() for t in s["text"])


def test_utf16_bom_names_the_encoding_to_set(workdir):
    text = "text,sentiment\n" + "".join(f"{t},{lab}\n" for t, lab in synthetic_rows(30))
    (workdir / "data/raw").mkdir(parents=True)
    (workdir / "data/raw/train.csv").write_bytes(text.encode("utf-16"))
    with pytest.raises(UserError, match=r"train.csv starts with a UTF-16 byte-order mark; set data.encoding: utf-16"):
        prepare(source="data/raw/train.csv")
    splits, _ = prepare(source="data/raw/train.csv", encoding="utf-16")
    assert sum(len(s) for s in splits.values()) == 30


# --- 6. sources DVC does not track -----------------------------------------------------------------------------

def run_prepare_stage(root, source: str) -> None:
    """stages/prepare.py in-process, in `root`, against a params.yaml naming `source`."""
    import stages.prepare

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = source
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    stages.prepare.main()


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_source_outside_data_raw_warns_once(workdir, capsys, monkeypatch, where):
    project = workdir / "project"
    shared = workdir / "shared/train.csv"
    write_csv(shared, synthetic_rows(90))
    project.mkdir()
    monkeypatch.chdir(project)
    run_prepare_stage(project, str(shared) if where == "absolute" else "../shared/train.csv")
    err = capsys.readouterr().err
    assert err.count("DVC does not track") == 1
    assert "shared/train.csv is outside data/raw/" in err and "`dvc repro -f prepare`" in err
    assert (project / "reports/data.json").exists()


def test_source_under_data_raw_does_not_warn(workdir, capsys):
    write_csv(workdir / "data/raw/train.csv", synthetic_rows(90))
    run_prepare_stage(workdir, "data/raw/train.csv")
    assert "DVC" not in capsys.readouterr().err
    assert shared_data.untracked_source(str(workdir / "data/raw/train.csv")) is None
    assert shared_data.untracked_source("builtin:tweets") is None
    assert "hf:imdb is read from the Hugging Face hub" in shared_data.untracked_source("hf:imdb")
    for d in ("data/raw/hub", "data/hub"):  # local data sets read through datasets.load_dataset
        (workdir / d).mkdir()
    assert shared_data.untracked_source("hf:data/raw/hub") is None
    assert "hf:data/raw/../hub is outside data/raw/" in shared_data.untracked_source("hf:data/raw/../hub")
