"""Robustness: seeded, label-preserving perturbations, the evaluate stage's robustness report for each task family,
its params, and promotion's promote.max_robust_drop guard."""

from __future__ import annotations

import random
import string

import mlflow
import pandas as pd
import pytest

from stages import augment, evaluate, finetune, prepare
from stages import tokenization as tokenize
from tests.helpers import synthetic_sentences, write_tiny_dir
from tests.test_multilabel import ml_project, multilabel_rows  # noqa: F401  (fixture)
from tests.test_ner import ner_project  # noqa: F401  (fixture)
from tests.test_registry import onnx_exports, reg, store  # noqa: F401  (fixtures)
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.modeling import load_trained
from tunepipe.params import PERTURBATIONS, PromoteParams, RobustnessParams, parse_params
from tunepipe.registry import decision
from tunepipe.robustness import NEIGHBOURS, perturb_text, perturber, selected, typo
from tunepipe.tasks import get_task

TEXT_PERTURBATIONS = ["char_noise", "word_dropout", "lower", "upper"]


def random_words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def identity(words, labelled):
    return list(enumerate(words))


# ---------------------------------------------------------------------------------------------- perturbations

@pytest.mark.parametrize("name", PERTURBATIONS)
def test_same_seed_same_copy_other_seed_another(name):
    sentences = [random_words(12, seed=i) for i in range(50)]
    labelled = [[j % 3 == 0 for j in range(12)] for _ in sentences]

    def run(seed: int) -> list:
        f = perturber(name, RobustnessParams(seed=seed, char_rate=0.3, word_rate=0.3))
        return [f(words, mask) for words, mask in zip(sentences, labelled, strict=True)]

    assert run(0) == run(0)
    if name not in ("lower", "upper"):  # the case changes have no randomness
        assert run(0) != run(1)
    # One perturbation's copy does not depend on which others run before it (seeded by its own name).
    other = perturber("char_noise", RobustnessParams(char_rate=0.3, word_rate=0.3))
    other(sentences[0], None)
    assert run(0) == run(0)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_char_noise_gives_one_typo_to_words_at_its_rate(rate):
    words = random_words(5000)
    out = perturber("char_noise", RobustnessParams(char_rate=rate))(words, None)
    assert [i for i, _ in out] == list(range(len(words)))  # never drops or splits a word
    changed = [(a, b) for a, (_, b) in zip(words, out, strict=True) if a != b]
    assert abs(len(changed) / len(words) - rate) < 0.025  # binomial sd at 5000 words: < 0.007
    for a, b in changed:
        assert b and not any(c.isspace() for c in b)
        if len(a) == len(b):  # a swap of adjacent letters or a keyboard neighbour: one or two positions differ
            diff = [i for i in range(len(a)) if a[i] != b[i]]
            assert (len(diff) == 1 and b[diff[0]].lower() in NEIGHBOURS[a[diff[0]].lower()]) or (
                len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
        else:  # one letter dropped
            assert len(b) == len(a) - 1 and any(a[:i] + a[i + 1:] == b for i in range(len(a)))
    assert perturber("char_noise", RobustnessParams(char_rate=0.0))(words, None) == list(enumerate(words))


def test_typo_keeps_words_without_letters_and_never_empties_one():
    rng = random.Random(0)
    assert typo("1999", rng) == "1999" and typo(",", rng) == ","
    assert all(typo("a", rng) in set(NEIGHBOURS["a"]) for _ in range(50))  # one letter: only a neighbour
    assert all(typo("Q", rng) in set(NEIGHBOURS["q"].upper()) for _ in range(50))  # case kept


def test_keyboard_neighbours_are_qwerty_and_symmetric():
    assert set(NEIGHBOURS["a"]) == set("qwsz") and set(NEIGHBOURS["g"]) == set("fhtybv")
    assert set(NEIGHBOURS["p"]) == set("ol") and len(NEIGHBOURS) == 26
    assert all(a in NEIGHBOURS[b] for a, near in NEIGHBOURS.items() for b in near)


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_word_dropout_drops_words_at_its_rate_never_labelled_ones(rate):
    words = random_words(5000)
    out = perturber("word_dropout", RobustnessParams(word_rate=rate))(words, None)
    assert all(words[i] == w for i, w in out)  # survivors untouched, in order
    assert [i for i, _ in out] == sorted(i for i, _ in out)
    assert abs(1 - len(out) / len(words) - rate) < 0.025
    labelled = [i % 4 == 0 for i in range(len(words))]
    kept = {i for i, _ in perturber("word_dropout", RobustnessParams(word_rate=rate))(words, labelled)}
    assert {i for i in range(len(words)) if labelled[i]} <= kept
    dropped_o = sum(not labelled[i] and i not in kept for i in range(len(words)))
    assert abs(dropped_o / sum(not x for x in labelled) - rate) < 0.03
    # An example never loses every word.
    assert len(perturber("word_dropout", RobustnessParams(word_rate=0.99))(["one", "two"], None)) >= 1


def test_case_changes_and_text_whitespace():
    text = "  Great  flight,\tAWFUL food \n"
    assert perturb_text(text, perturber("lower", RobustnessParams())) == "  great  flight,\tawful food \n"
    assert perturb_text(text, perturber("upper", RobustnessParams())) == "  GREAT  FLIGHT,\tAWFUL FOOD \n"
    assert perturb_text(text, identity) == text
    assert perturb_text("", identity) == "" and perturb_text("   ", identity) == "   "

    def drop_last(words, labelled):
        return list(enumerate(words))[:-1]

    assert perturb_text("a b\tc ", drop_last) == "a b "


def test_context_noise_leaves_entities_and_keeps_tags_aligned():
    sentences = synthetic_sentences(400, seed=5)
    f = perturber("context_noise", RobustnessParams(char_rate=0.5, word_rate=0.3))
    n_o = changed_o = dropped_o = 0
    for tokens, tags in sentences:
        out = f(tokens, [t != "O" for t in tags])
        kept = {i: w for i, w in out}
        for i, (tok, tag) in enumerate(zip(tokens, tags, strict=True)):
            if tag != "O":
                assert kept[i] == tok  # entity words: present and untouched
            else:
                n_o += 1
                dropped_o += i not in kept
                changed_o += i in kept and kept[i] != tok
        new_tags = [tags[i] for i, _ in out]
        assert len(new_tags) == len(out) and [t for t in new_tags if t != "O"] == [t for t in tags if t != "O"]
    assert abs(dropped_o / n_o - 0.3) < 0.05
    # Words without letters (".") are never changed, so below char_rate among the survivors.
    assert 0.3 < changed_o / (n_o - dropped_o) < 0.55
    with pytest.raises(UserError, match="context_noise needs word labels"):
        f(["a", "b"], None)


def test_ner_char_noise_and_case_keep_one_word_per_word():
    tokens, tags = synthetic_sentences(1, seed=2)[0]
    for name in ("char_noise", "lower", "upper"):
        out = perturber(name, RobustnessParams(char_rate=1.0))(tokens, [t != "O" for t in tags])
        assert [i for i, _ in out] == list(range(len(tokens))) and all(w and " " not in w for _, w in out)


# ---------------------------------------------------------------------------------------------- params

@pytest.mark.parametrize("robustness, message", [
    ({"perturbations": ["char_noise", "typo"]},
     "robustness.perturbations: unknown perturbation 'typo' (valid: char_noise, word_dropout, lower, upper, "
     "context_noise)"),
    ({"perturbations": ["lower", "lower"]}, "robustness.perturbations: lists a perturbation twice"),
    ({"char_rate": 1.5}, "robustness.char_rate"),
    ({"word_rate": 1.0}, "robustness.word_rate"),
    ({"rate": 0.1}, "robustness.rate: unknown key"),
])
def test_params_errors_name_the_key(robustness, message):
    with pytest.raises(UserError) as err:
        parse_params({"robustness": robustness})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_selected_perturbations_per_task():
    s = RobustnessParams()
    assert selected(s, get_task("classification")) == TEXT_PERTURBATIONS
    assert selected(s, get_task("ner")) == [*TEXT_PERTURBATIONS, "context_noise"]  # NER adds its own
    assert selected(RobustnessParams(perturbations=["context_noise"]), get_task("ner")) == ["context_noise"]
    assert selected(RobustnessParams(perturbations=[]), get_task("ner")) == []  # the report off
    with pytest.raises(UserError, match="robustness.perturbations: context_noise needs word labels.*classification"):
        selected(RobustnessParams(perturbations=["context_noise"]), get_task("classification"))
    with pytest.raises(UserError, match="promote.max_robust_drop"):
        parse_params({"promote": {"max_robust_drop": -0.1}})


# ---------------------------------------------------------------------------------------------- evaluate stage

def check_report(root, headline: str, names: list[str]) -> dict:
    """metrics.json's robustness keys and the plot data agree with each other and with the clean metric."""
    m = read_json(root / "reports/metrics.json")
    clean = m[headline]
    assert list(m["robustness"]) == names
    for name in names:
        v = m["robustness"][name][headline]
        assert 0 <= v <= 1 and m["robustness"][name]["drop"] == pytest.approx(clean - v)
    mean = sum(m["robustness"][n][headline] for n in names) / len(names)
    assert m[f"robust_{headline}"] == pytest.approx(mean) and m["robust_drop"] == pytest.approx(clean - mean)
    plot = pd.read_csv(root / "reports/plots/robustness.csv")
    assert list(plot.columns) == ["perturbation", "metric", "drop"]
    assert list(plot["perturbation"]) == ["clean", *names]
    assert plot["metric"].tolist() == pytest.approx([clean, *(m["robustness"][n][headline] for n in names)], abs=1e-6)
    assert (root / "reports/plots/robustness.png").stat().st_size > 1000
    return m


def test_evaluate_reports_robustness_for_classification(project, capsys):
    root = project(n_rows=240, **{"finetune.epochs": 3.0, "robustness.char_rate": 0.3, "robustness.word_rate": 0.3})
    for stage in (prepare, tokenize, augment, finetune):
        stage.main()
    capsys.readouterr()
    evaluate.main()
    m = check_report(root, "macro_f1", TEXT_PERTURBATIONS)
    worst = max(TEXT_PERTURBATIONS, key=lambda n: m["robustness"][n]["drop"])
    assert f"worst: {worst} " in capsys.readouterr().out

    # Logged to the training run like the other test metrics, one per perturbation too.
    info = read_json(root / "models/model/training_info.json")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    logged = mlflow.MlflowClient().get_run(info["run_id"]).data.metrics
    assert logged["test_robust_macro_f1"] == pytest.approx(m["robust_macro_f1"])
    assert logged["test_robust_drop"] == pytest.approx(m["robust_drop"])
    for name in TEXT_PERTURBATIONS:
        assert logged[f"test_robust_{name}_macro_f1"] == pytest.approx(m["robustness"][name]["macro_f1"])

    # The re-encoding path scores an unperturbed copy exactly like the clean test split.
    info, task, model, tokenizer = load_trained(root / "models/model")
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    assert task.robust_score(model, tokenizer, test, identity, info) == pytest.approx(m["macro_f1"], abs=1e-12)


def test_evaluate_with_windows_and_with_the_report_off(project, capsys):
    """A model trained on windows is scored on windows of the perturbed texts too; [] turns the report off."""
    root = project(n_rows=240, **{"tokenize.max_length": 8, "tokenize.long_text": "window", "tokenize.stride": 2,
                                  "finetune.epochs": 3.0, "robustness.perturbations": []})
    for stage in (prepare, tokenize, augment, finetune):
        stage.main()
    capsys.readouterr()
    evaluate.main()
    m = read_json(root / "reports/metrics.json")
    assert not any(k.startswith(("robust", "robustness")) for k in m)
    assert (root / "reports/plots/robustness.csv").read_text() == "perturbation,metric,drop\n"
    assert (root / "reports/plots/robustness.png").is_file()
    assert "robustness report off" in capsys.readouterr().out
    info, task, model, tokenizer = load_trained(root / "models/model")
    assert info["long_text"] == "window"
    assert m["macro_f1"] > 0.4  # not a constant prediction, so reading texts differently would show
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    assert task.robust_score(model, tokenizer, test, identity, info) == pytest.approx(m["macro_f1"], abs=1e-12)


def test_evaluate_reports_robustness_for_ner(ner_project):  # noqa: F811 (the fixture)
    root = ner_project(**{"finetune.epochs": 3.0, "finetune.eval_steps": 20, "robustness.word_rate": 0.3})
    write_tiny_dir(root, n_train=160, n_eval=30)
    for stage in (prepare, tokenize, augment, finetune, evaluate):
        stage.main()
    m = check_report(root, "f1", [*TEXT_PERTURBATIONS, "context_noise"])
    info, task, model, tokenizer = load_trained(root / "models/model")
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    assert task.robust_score(model, tokenizer, test, identity, info) == pytest.approx(m["f1"], abs=1e-12)


def test_evaluate_reports_robustness_for_multilabel(ml_project):  # noqa: F811 (the fixture)
    root = ml_project(multilabel_rows(160), **{"finetune.max_steps": 4})
    for stage in (prepare, tokenize, augment, finetune, evaluate):
        stage.main()
    m = check_report(root, "micro_f1", TEXT_PERTURBATIONS)
    info, task, model, tokenizer = load_trained(root / "models/model")
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    assert task.robust_score(model, tokenizer, test, identity, info) == pytest.approx(m["micro_f1"], abs=1e-12)


# ---------------------------------------------------------------------------------------------- promotion guard

@pytest.mark.parametrize("cand, champ, drop, limit, ok, why", [
    (0.85, 0.80, 0.03, None, True, "gain +0.0500 >= promote.min_delta"),  # no guard
    (0.85, 0.80, 0.12, None, True, "gain +0.0500"),
    (0.85, 0.80, 0.03, 0.05, True, "robust_drop 0.0300 <= promote.max_robust_drop 0.05"),
    (0.85, 0.80, 0.05, 0.05, True, "robust_drop 0.0500 <= promote.max_robust_drop 0.05"),
    (0.85, 0.80, 0.12, 0.05, False, "robust_drop 0.1200 (the test headline metric lost under perturbation) "
                                    "exceeds promote.max_robust_drop 0.05"),
    (0.85, None, 0.12, 0.05, False, "exceeds promote.max_robust_drop 0.05"),  # a first champion too
    (0.85, 0.80, None, 0.05, False, "no robust_drop figure"),
    (0.70, 0.80, 0.12, 0.05, False, "less than promote.min_delta"),  # worse on clean data: the clean reason
])
def test_robust_drop_guard_rule(cand, champ, drop, limit, ok, why):
    got, reason = decision.decide(PromoteParams(metric="macro_f1", max_robust_drop=limit), cand, champ, True, None,
                                  drop)
    assert got is ok and why in reason


def test_promote_refuses_a_clean_better_candidate_that_is_fragile(reg):  # noqa: F811 (the fixture)
    reg.set_promote(min_delta=0.005, max_robust_drop=0.05)
    v1 = reg.add({"macro_f1": 0.70, "robust_macro_f1": 0.68, "robust_drop": 0.02})
    code, out, _ = reg.cli("promote")
    assert code == 0 and reg.champion() == v1 and "robust_drop 0.0200 <= promote.max_robust_drop 0.05" in out

    fragile = reg.add({"macro_f1": 0.80, "robust_macro_f1": 0.70, "robust_drop": 0.10})
    code, out, _ = reg.cli("promote")
    assert code == 1 and "REFUSE" in out and reg.champion() == v1
    assert ("macro_f1 gain +0.1000 >= promote.min_delta 0.005, but robust_drop 0.1000 (the test headline metric "
            "lost under perturbation) exceeds promote.max_robust_drop 0.05") in out
    assert "exceeds promote.max_robust_drop 0.05" in reg.tags(fragile)["promote.reason"]

    reg.add({"macro_f1": 0.80})  # registered before robustness figures existed
    code, out, _ = reg.cli("promote")
    assert code == 1 and "no robust_drop figure" in out and reg.champion() == v1

    sturdy = reg.add({"macro_f1": 0.78, "robust_macro_f1": 0.75, "robust_drop": 0.03})
    code, out, _ = reg.cli("promote")
    assert code == 0 and reg.champion() == sturdy and "robust_drop 0.0300 <= promote.max_robust_drop 0.05" in out

    reg.set_promote(min_delta=0.005)  # no guard: the clean gain alone decides
    code, out, _ = reg.cli("promote", "--version", str(fragile))
    assert code == 0 and reg.champion() == fragile
