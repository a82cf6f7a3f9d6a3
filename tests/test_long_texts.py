"""Long texts (tokenize.long_text): truncate vs overlapping windows aggregated back to one prediction per text,
in tokenize, validation, evaluate and the served model; bad settings stop with a message naming the key."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import yaml

from stages import augment, evaluate, export, finetune, prepare
from stages import tokenization as tokenize
from tests.helpers import FILLER, NEGATIVE, POSITIVE, tiny_params, write_csv
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import parse_params
from tunepipe.serving import pyfunc_model
from tunepipe.tasks import get_task
from tunepipe.tasks.classification.encode import tokenize_split
from tunepipe.tasks.classification.metrics import aggregate_windows, compute_metrics


def long_rows(n: int, seed: int = 0, filler_words: int = 20) -> list[tuple[str, str]]:
    """Texts whose label-carrying words are the last three, after `filler_words` words shared by both classes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        words = [rng.choice(FILLER) for _ in range(filler_words)]
        rows.append((" ".join(words + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 3)), label))
    return rows


def test_windows_overlap_by_stride_and_map_to_their_text(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [" ".join(f"w{i}" if i % 3 else "flight" for i in range(40)), "short text", "x " * 30]
    ds = datasets.Dataset.from_dict({"text": texts, "label": ["a", "b", "a"]})
    out = tokenize_split(ds, tok, 16, {"a": 0, "b": 1}, stride=4)
    ids, text_ids = out["input_ids"], out["text_id"]
    assert text_ids == sorted(text_ids) and set(text_ids) == {0, 1, 2}
    assert text_ids.count(1) == 1  # a short text is one window
    assert all(len(x) <= 16 for x in ids)
    # Every window carries its text's label, and consecutive windows of a text share exactly `stride` tokens.
    assert [lab for lab, t in zip(out["labels"], text_ids, strict=True)] == [[0, 1, 0][t] for t in text_ids]
    for t in (0, 2):
        rows = [x[1:-1] for x, i in zip(ids, text_ids, strict=True) if i == t]  # without [CLS]/[SEP]
        assert len(rows) > 2
        for a, b in zip(rows, rows[1:], strict=False):
            assert a[-4:] == b[:4]
        # The windows cover the whole text: joined without their overlaps they are its full tokenization.
        joined = rows[0] + [tok_id for r in rows[1:] for tok_id in r[4:]]
        assert joined == tok(texts[t], add_special_tokens=False)["input_ids"]


def test_aggregation_mean_and_max_per_text():
    logits = np.array([[1.0, 0.0], [3.0, 5.0], [0.0, 2.0], [4.0, -1.0]], dtype=np.float32)
    text_ids = [0, 0, 0, 1]
    mean, first = aggregate_windows(logits, text_ids, "mean")
    np.testing.assert_allclose(mean, [[4 / 3, 7 / 3], [4.0, -1.0]], rtol=1e-6)
    assert first.tolist() == [0, 3]
    mx, _ = aggregate_windows(logits, text_ids, "max")
    np.testing.assert_allclose(mx, [[3.0, 5.0], [4.0, -1.0]])
    # The served model's own copy (pyfunc_model.py imports nothing from tunepipe) aggregates the same way.
    for how, want in (("mean", mean), ("max", mx)):
        np.testing.assert_allclose(pyfunc_model.aggregate_windows(logits, np.array(text_ids), how), want, rtol=1e-6)
    # Validation scores texts, not windows: text 0 is right by its mean (class 1), text 1 is class 0.
    scores = compute_metrics(["a", "b"], text_ids, "mean")((logits, np.array([1, 1, 1, 0])))
    assert scores["accuracy"] == 1.0
    assert compute_metrics(["a", "b"])((logits, np.array([1, 1, 1, 0])))["accuracy"] == 0.75  # per window


def test_validation_scores_windows_in_split_order(tiny_model_dir, tmp_path):
    """Trainer groups validation batches by length like training ones; windows must come back in split order, or
    compute_metrics would give windows to the wrong texts."""
    from transformers import AutoTokenizer

    from tunepipe.tasks.classification.evaluate import predict_logits
    from tunepipe.training import build_trainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [(text, label) for n in (3, 30, 9, 45, 14, 22) for text, label in long_rows(6, seed=n, filler_words=n)]
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]})
    val = tokenize_split(ds, tok, 16, {"negative": 0, "positive": 1}, stride=4)
    assert len(set(val["length"])) > 3 and len(val) > len(rows)
    p = parse_params({"model": {"name": str(tiny_model_dir)}, "tokenize": {"long_text": "window"},
                      "finetune": {"precision": "fp32"}})
    trainer = build_trainer(p, datasets.DatasetDict({"train": val, "validation": val}), ["negative", "positive"],
                            str(tmp_path / "out"), save_checkpoints=False)
    seen = {}
    score = trainer.compute_metrics

    def capture(eval_pred):
        seen["logits"], seen["labels"] = eval_pred
        return score(eval_pred)

    trainer.compute_metrics = capture
    metrics = trainer.evaluate()
    assert seen["labels"].tolist() == val["labels"]
    np.testing.assert_allclose(seen["logits"], predict_logits(trainer.model, tok, val), atol=1e-5)
    logits, first = aggregate_windows(seen["logits"], val["text_id"], "mean")
    assert metrics["eval_accuracy"] == pytest.approx(
        float((logits.argmax(-1) == np.asarray(val["labels"])[first]).mean()))


def write_project(root: Path, model_dir: Path, rows, **overrides) -> None:
    write_csv(root / "data/raw/train.csv", rows)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(model_dir, **overrides)))


def test_stride_that_leaves_no_room_is_a_user_error(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, tiny_model_dir, long_rows(60),
                  **{"tokenize.max_length": 16, "tokenize.long_text": "window", "tokenize.stride": 16})
    prepare.main()
    with pytest.raises(UserError, match=r"tokenize\.stride: 16 leaves windows no room.*set tokenize\.stride below 14"):
        tokenize.main()
    assert not (tmp_path / "data/tokenized").exists()
    with pytest.raises(UserError, match=r"tokenize\.stride: .*greater than or equal to 0"):
        parse_params({"tokenize": {"stride": -1}})
    with pytest.raises(UserError, match=r"tokenize\.long_text: .*'truncate' or 'window'"):
        parse_params({"tokenize": {"long_text": "chunks"}})


def test_window_for_a_task_without_windows_is_a_user_error(tmp_path):
    p = parse_params({"task": "ner", "tokenize": {"long_text": "window"}})
    with pytest.raises(UserError, match=r"tokenize\.long_text: window is not available for task: ner "
                                        r"\(use truncate\)"):
        get_task("ner").tokenize(p, tmp_path)


def train_and_evaluate(root: Path, model_dir: Path, rows, long_text: str) -> dict:
    write_project(root, model_dir, rows, **{
        "tokenize.max_length": 16, "tokenize.long_text": long_text, "tokenize.stride": 4,
        "finetune.epochs": 4.0, "finetune.eval_steps": 10})
    prepare.main()
    tokenize.main()
    augment.main()
    finetune.main()
    evaluate.main()
    return read_json(root / "reports/metrics.json")


def test_label_at_the_end_is_found_with_windows_not_with_truncation(tmp_path, monkeypatch, tiny_model_dir):
    rows = long_rows(200)
    results = {}
    for mode in ("truncate", "window"):
        (tmp_path / mode).mkdir()
        monkeypatch.chdir(tmp_path / mode)
        results[mode] = train_and_evaluate(tmp_path / mode, tiny_model_dir, rows, mode)
    cut, win, root = results["truncate"], results["window"], tmp_path / "window"

    # Truncation keeps only filler: chance. Windows reach the last word.
    assert cut["macro_f1"] < 0.7, cut
    assert win["macro_f1"] >= 0.9, win
    report = read_json(root / "reports/tokenize.json")
    test_split = report["splits"]["test"]
    assert report["long_text"] == "window" and report["stride"] == 4
    assert test_split["over_max_length"] == test_split["examples"] == 20 and test_split["windows"] == 40  # 2 each
    assert read_json(tmp_path / "truncate/reports/tokenize.json")["splits"]["test"]["truncated"] == 20
    info = read_json(root / "models/model/training_info.json")
    assert (info["long_text"], info["stride"], info["window_aggregation"]) == ("window", 4, "mean")

    # One prediction per test text, in the prepared test split's order (promotion pairs rows by position).
    preds = pd.read_csv(root / "reports/predictions.csv")
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    assert preds["id"].tolist() == list(range(len(test))) == list(range(win["n_test"]))
    assert preds["label"].tolist() == test["label"].tolist()

    # The served model windows and aggregates the same way: its labels are evaluate's, per text.
    export.main()
    assert read_json(root / "reports/export.json")["fp32_max_abs_logit_diff"] <= 1e-3
    meta = read_json(root / "models/onnx/tunepipe.json")
    assert (meta["long_text"], meta["stride"], meta["window_aggregation"]) == ("window", 4, "mean")
    predictor = pyfunc_model.TextPredictor(root / "models/onnx", "model.onnx")  # fp32: PyTorch's logits to 1e-6
    served = predictor.predict(test["text"].tolist())
    assert [r["label"] for r in served] == preds["prediction"].tolist()
    logits = predictor.logits(test["text"].tolist())  # one row per text, its windows aggregated
    # evaluate's confidence is the uncalibrated softmax; served scores use the temperature fitted on validation.
    np.testing.assert_allclose(pyfunc_model.softmax(logits).max(-1), preds["confidence"], atol=1e-4)
    np.testing.assert_allclose([r["score"] for r in served], pyfunc_model.probabilities(meta, logits).max(-1),
                               atol=1e-6)


def test_dvc_repro_sweep_and_promote_with_windows(tmp_path, tiny_model_dir):
    """long_text: window through `dvc repro`, `tunepipe promote --reevaluate` (the served model windows the test
    texts) and `tunepipe sweep` (trials validate per text), in a `git clone` of the repository."""
    import json
    import sys

    from tests.helpers import clone_repo, commit_all, sh

    root = clone_repo(tmp_path / "repo")
    write_project(root, tiny_model_dir, long_rows(120), **{
        "tokenize.max_length": 16, "tokenize.long_text": "window", "tokenize.stride": 4,
        "tokenize.window_aggregation": "max", "finetune.epochs": 3.0, "finetune.eval_steps": 10,
        "promote.min_delta": 0.0})
    commit_all(root)
    out = sh(["dvc", "repro"], root).stdout
    assert "tokenize: max_length=16, windows with stride 4; over max_length train=100.00% (96 texts -> 192 windows)" \
        in out
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["n_test"] == 12 and len((root / "reports/predictions.csv").read_text().splitlines()) == 13
    assert json.loads((root / "models/onnx/tunepipe.json").read_text())["window_aggregation"] == "max"

    # The served model re-scores the test texts (windows, max) to evaluate's per-text macro-F1.
    cli = [sys.executable, "-m", "tunepipe.cli"]
    res = sh([*cli, "promote", "--reevaluate"], root).stdout
    assert "re-evaluated on the current test split" in res and "PROMOTE" in res, res
    assert f"macro_f1 {metrics['macro_f1']:.4f}" in res, res
    sweep = sh([*cli, "sweep", "--no-repro", "--trials", "1"], root)
    assert "Traceback" not in sweep.stderr
    assert (root / "reports/sweep").is_dir()
