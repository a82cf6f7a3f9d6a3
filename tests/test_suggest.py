"""`tunepipe suggest` and the active-learning loop behind it (tunepipe/active.py): uncertainty ranking, k-means
diversity, duplicates of labelled texts left out, and a small simulation on the tiny model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import synthetic_rows, tiny_params, write_csv
from tunepipe.active import exact_duplicates, finetune_learner, near_duplicates, select, simulate, uncertainty
from tunepipe.errors import UserError

PROBS = np.array([[0.98, 0.01, 0.01],   # sure
                  [0.34, 0.33, 0.33],   # most uncertain
                  [0.45, 0.45, 0.10],   # smallest margin
                  [0.70, 0.20, 0.10],
                  [0.90, 0.05, 0.05]])


def test_entropy_and_margin_rank_the_least_sure_first():
    chosen, score, clusters = select(PROBS, 2, "entropy")
    assert chosen.tolist() == [1, 2] and clusters is None and score[0] > score[1]
    assert select(PROBS, 1, "margin")[0].tolist() == [2]
    assert uncertainty(PROBS, "entropy")[1] == pytest.approx(np.log(3), abs=1e-3)
    randoms = {tuple(select(PROBS, 2, "random", seed)[0]) for seed in range(10)}
    assert len(randoms) > 1  # seeded shuffles, not the uncertainty order


def test_diversify_picks_the_most_uncertain_text_of_each_cluster():
    # two tight clusters; the most uncertain rows (1, 2) sit in the same one: diversity takes 1, then cluster B's best
    emb = np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1], [0.01, 1]], dtype=np.float64)
    chosen, _, clusters = select(PROBS, 2, "entropy", embeddings=emb)
    assert chosen.tolist() == [1, 3] and len(set(clusters.tolist())) == 2


def test_duplicates_of_labelled_texts_are_left_out():
    keep, repeats, known = exact_duplicates(["Great  flight", "great flight", "new text", "NEW text", "other"],
                                            ["GREAT FLIGHT"])
    assert keep.tolist() == [2, 4] and repeats == 1 and known == 2
    emb = np.array([[1, 0], [0.6, 0.8], [0, 1]])
    assert near_duplicates(emb, np.array([[1.0, 0.0]]), 0.95).tolist() == [True, False, False]
    assert not near_duplicates(emb, np.array([[1.0, 0.0]]), 1.0).any()  # 1.0: exact (normalised) only


def test_a_small_labelling_loop_on_the_tiny_model(tiny_model_dir):
    """Two rounds from 30 labels, +20 each: uncertainty picks differ from random ones and are less sure under the
    same model (same seed: same start set and the same first model); each round is well-formed."""
    labels = ["negative", "neutral", "positive"]
    rows = synthetic_rows(150, seed=3)
    pool, pool_y = [t for t, _ in rows[:110]], np.array([labels.index(y) for _, y in rows[:110]])
    test, test_y = [t for t, _ in rows[110:]], np.array([labels.index(y) for _, y in rows[110:]])
    learner = finetune_learner(str(tiny_model_dir), 3, epochs=3.0, learning_rate=5e-3, max_length=32)
    runs = {s: simulate(pool, pool_y, test, test_y, learner, 30, 20, 2, s, seed=0) for s in ("entropy", "random")}
    for rounds in runs.values():
        assert [r["labelled"] for r in rounds] == [30, 50, 70]
        assert all(0.0 <= r["macro_f1"] <= 1.0 for r in rounds)
        picked = [i for r in rounds[:-1] for i in r["picked"]]
        assert len(picked) == len(set(picked)) == 40 and max(picked) < len(pool)
    first_u, first_r = runs["entropy"][0], runs["random"][0]
    assert set(first_u["picked"]) != set(first_r["picked"])
    assert first_u["pick_entropy"] > first_r["pick_entropy"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fine_tuned_learner_trains_in_each_precision(tiny_model_dir, precision):
    """Forced explicitly, whatever this CPU would pick: bf16 on a CPU needs Trainer's use_cpu (it refused before)."""
    labels = ["negative", "neutral", "positive"]
    rows = synthetic_rows(30, seed=5)
    learn = finetune_learner(str(tiny_model_dir), 3, epochs=1.0, learning_rate=5e-3, max_length=32,
                             precision=precision)
    probs = learn([t for t, _ in rows], np.array([labels.index(y) for _, y in rows]))(["a text", "another text"])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(-1), 1.0)


# ---- the command ----

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model trained on keyword data, evaluated and exported (models/onnx) in a project."""
    from stages import augment, evaluate, export, finetune, prepare
    from stages import tokenization as tokenize

    root = tmp_path_factory.mktemp("suggest-project")
    write_csv(root / "data/raw/train.csv", synthetic_rows(150))
    params = tiny_params(tiny_model_dir, **{"robustness.perturbations": [], "explain.examples_per_class": 0,
                                            "suggest.near_duplicate": 0.9999,
                                            # below the pools' sizes: suggest must send its texts in parts
                                            "serve.max_texts_per_request": 8})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (prepare, tokenize, augment, finetune, evaluate, export):
            stage.main()
    return root


def cli(*argv: str) -> None:
    from tunepipe.cli import build_parser

    args = build_parser().parse_args(list(argv))
    args.func(args)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_suggest_writes_a_ranked_csv_without_labelled_texts(exported, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(exported)
    labelled = pd.read_parquet(exported / "data/prepared/train.parquet")["text"].tolist()
    fresh = [t for t, _ in synthetic_rows(40, seed=11)]
    texts = fresh + labelled[:5] + [labelled[0].upper(), fresh[0], 'a "quoted", comma text']
    write_csv(exported / "pool.csv", [(t, "") for t in texts], header=("text", "unused"))
    cli("suggest", "--input", "pool.csv", "--output", "out/suggestions.csv", "--n", "10")
    rows = read_rows(exported / "out/suggestions.csv")
    assert len(rows) == 10 and list(rows[0]) == ["text", "suggested_label", "score"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert not {r["text"] for r in rows} & {t.casefold() for t in labelled}
    assert not {r["text"].casefold() for r in rows} & {t.casefold() for t in labelled}
    assert {r["suggested_label"] for r in rows} <= {"negative", "neutral", "positive"}
    assert len({r["text"] for r in rows}) == 10

    cli("suggest", "--input", "pool.csv", "--output", "div.csv", "--n", "5", "--diversify", "--strategy", "entropy")
    rows = read_rows(exported / "div.csv")
    assert len(rows) == 5 and len({r["cluster"] for r in rows}) == 5


def test_suggest_reads_jsonl_and_parquet(exported, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(exported)
    df = pd.DataFrame({"body": [t for t, _ in synthetic_rows(12, seed=5)]})
    df.to_json(exported / "pool.jsonl", orient="records", lines=True)
    df.to_parquet(exported / "pool.parquet")
    for name in ("pool.jsonl", "pool.parquet"):
        cli("suggest", "--input", name, "--output", "s.csv", "--n", "3", "--text-column", "body")
        assert len(read_rows(exported / "s.csv")) == 3


def test_suggest_bad_input_is_one_clear_line(exported, monkeypatch, capsys):
    from tunepipe.cli import main

    monkeypatch.chdir(exported)
    with pytest.raises(SystemExit) as exc:
        main(["suggest", "--input", "missing.csv", "--output", "s.csv"])
    assert exc.value.code == 2
    assert "error: --input: missing.csv: file not found" in capsys.readouterr().err
    write_csv(exported / "nocol.csv", [("a", "b")], header=("body", "x"))
    with pytest.raises(UserError, match=r"--input: nocol.csv has no column 'text' \(columns: body, x\)"):
        cli("suggest", "--input", "nocol.csv", "--output", "never.csv")
    assert not (exported / "never.csv").exists()


def test_tasks_without_one_label_distribution_per_text_refuse():
    from tunepipe.tasks import get_task

    for name in ("ner", "multilabel"):
        with pytest.raises(UserError, match=f"suggest: not available for {name} models"):
            get_task(name).served_probabilities([])
