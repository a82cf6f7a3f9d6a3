"""prepare: cleaning, splitting, and every bad input with its message (in-process and as a real stage process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.helpers import REPO, synthetic_rows, write_csv
from tunepipe.errors import UserError
from tunepipe.params import parse_params
from tunepipe.tasks import get_task
from tunepipe.tasks.classification import data


def prepare_classification(p):
    prepared = get_task("classification").prepare(p)
    return prepared.splits, prepared.report


def params(**data_overrides):
    return parse_params({"data": {"source": "data/raw/train.csv", **data_overrides}})


def test_clean_counts_each_drop_reason():
    df = pd.DataFrame({"text": ["  a good day ", "a good day", "", "mixed", "mixed", "ok", "fine"],
                       "label": ["pos", "pos", "pos", "pos", "neg", "", "neu"]})
    cleaned, drops = data.clean(df)
    assert drops == {"empty_text": 1, "missing_label": 1, "conflicting_label": 2, "duplicate": 1}
    assert sorted(cleaned["text"]) == ["a good day", "fine"]


def test_prepare_splits_are_stratified_disjoint_and_capped(project):
    project(n_rows=300)
    rows = synthetic_rows(300)
    # Duplicates and a conflicting copy must be dropped before splitting.
    write_csv(project(n_rows=300) / "data/raw/train.csv", rows + rows[:10] + [(rows[21][0], "positive")])
    splits, report = prepare_classification(params(max_train_samples=120))
    assert report["drops"]["duplicate"] == 10
    assert report["drops"]["conflicting_label"] == 2  # both copies of the disagreeing text
    assert len(splits["train"]) == 120 and report["train_capped_from"] > 120
    texts = [set(splits[s]["text"]) for s in data.SPLITS]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for s in data.SPLITS:
        assert set(splits[s]["label"]) == {"negative", "neutral", "positive"}
    assert report["splits"]["test"]["chars"]["max"] >= report["splits"]["test"]["chars"]["min"] > 0
    again, report2 = prepare_classification(params(max_train_samples=120))
    assert report2["data_hash"] == report["data_hash"]  # same seed, same splits


def test_presplit_directory_keeps_splits_and_removes_leaks(project):
    root = project()
    rows = synthetic_rows(200)
    write_csv(root / "data/raw/split/train.csv", rows[:150])
    write_csv(root / "data/raw/split/validation.csv", rows[150:175] + rows[:3])  # 3 leaked from train
    write_csv(root / "data/raw/split/test.csv", rows[175:])
    splits, report = prepare_classification(parse_params({"data": {"source": "data/raw/split"}}))
    assert len(splits["train"]) == 150 and len(splits["validation"]) == 25 and len(splits["test"]) == 25
    assert report["drops"]["cross_split_duplicate"] == 3


def test_builtin_tweets_corpus_loads_offline():
    frames = data.load_source("builtin:tweets")
    df = frames["all"]
    assert len(df) > 30000 and {"sentiment", "text"} <= set(df.columns)
    assert set(df["sentiment"]) == {"negative", "neutral", "positive"}


@pytest.mark.parametrize("setup, overrides, message", [
    (lambda r: None, {"source": "data/raw/missing.csv"}, "file not found: data/raw/missing.csv"),
    (lambda r: (r / "data/raw/train.csv").write_text(""), {}, "data/raw/train.csv is empty"),
    (lambda r: (r / "data/raw/train.csv").write_text("text,sentiment\n"), {}, "has a header but no rows"),
    (lambda r: None, {"text_column": "tweet"}, "data.text_column: column 'tweet' not found"),
    (lambda r: None, {"label_column": "polarity"}, "data.label_column: column 'polarity' not found"),
    (lambda r: (r / "data/raw/train.csv").write_bytes("text,sentiment\ncaf\xe9 ok,positive\n".encode("latin-1")),
     {}, "not valid UTF-8 .*set data.encoding"),
    (lambda r: write_csv(r / "data/raw/train.csv", [(t, "positive") for t, _ in synthetic_rows(50)]), {},
     "only one class"),
    (lambda r: write_csv(r / "data/raw/train.csv", synthetic_rows(90, classes=("negative", "positive"))
                         + [("a rare one", "neutral"), ("another rare", "neutral")]), {},
     "class 'neutral' has 2 example"),
    (lambda r: None, {"source": "data/raw/train.xlsx"}, "unsupported file type"),
])
def test_bad_input_messages(project, setup, overrides, message):
    root = project()
    (root / "data/raw/train.xlsx").write_text("x")
    setup(root)
    with pytest.raises(UserError, match=message):
        prepare_classification(params(**overrides))


def test_unseen_label_in_test_split(project):
    root = project()
    rows = synthetic_rows(120, classes=("negative", "positive"))
    write_csv(root / "data/raw/split/train.csv", rows[:80])
    write_csv(root / "data/raw/split/validation.csv", rows[80:100])
    write_csv(root / "data/raw/split/test.csv", rows[100:] + [("something new", "neutral")])
    with pytest.raises(UserError, match="'neutral' appear in the test split but never in train"):
        prepare_classification(parse_params({"data": {"source": "data/raw/split"}}))


def test_latin1_with_encoding_param(project):
    root = project()
    rows = synthetic_rows(60)
    lines = "text,sentiment\n" + "".join(f"{t} caf\xe9,{lab}\n" for t, lab in rows)
    (root / "data/raw/train.csv").write_bytes(lines.encode("latin-1"))
    splits, _ = prepare_classification(params(encoding="latin-1"))
    assert any("café" in t for t in splits["train"]["text"])


def run_stage(root, name):
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def test_stage_process_bad_input_exits_cleanly_and_writes_nothing(project):
    root = project()
    (root / "data/raw/train.csv").write_text("")
    res = run_stage(root, "prepare")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: data.source: data/raw/train.csv is empty"
    assert "Traceback" not in res.stderr
    assert not (root / "data/prepared").exists() and not (root / "reports/data.json").exists()


def test_stage_process_invalid_param(project):
    root = project()
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["data"]["test_size"] = 0.9
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    res = run_stage(root, "prepare")
    assert res.returncode == 2
    assert res.stderr.startswith("error: params.yaml: data.test_size: Input should be less than 0.5")
    assert "Traceback" not in res.stderr


def test_prepare_stage_writes_outputs(project):
    root = project()
    res = run_stage(root, "prepare")
    assert res.returncode == 0, res.stderr
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert meta["labels"] == ["negative", "neutral", "positive"]
    assert {f.name for f in (root / "data/prepared").iterdir()} == {"train.parquet", "validation.parquet",
                                                                    "test.parquet", "meta.json"}
    report = json.loads((root / "reports/data.json").read_text())
    assert report["splits"]["train"]["rows"] + report["splits"]["validation"]["rows"] \
        + report["splits"]["test"]["rows"] == 150
