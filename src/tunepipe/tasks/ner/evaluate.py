"""NER evaluate: the test split: word-level predictions, seqeval entity metrics, an entity confusion view.

Every test word is scored: a word cut off by truncation (or one the tokenizer drops) is predicted O, so the
metrics never silently skip part of the test set.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from seqeval.scheme import Entities

from tunepipe.files import write_csv, write_text
from tunepipe.modeling import MODEL_INPUTS
from tunepipe.plots import plot_confusion
from tunepipe.progress import Progress
from tunepipe.robustness import Perturb
from tunepipe.tasks import Evaluation
from tunepipe.tasks.ner.encode import IGNORED, tokenize_words, word_features
from tunepipe.tasks.ner.metrics import entity_scores, per_type, text_report
from tunepipe.tasks.ner.scheme import seqeval_scheme


def first_subtoken_positions(word_ids: list[int], n_words: int) -> list[int | None]:
    """Position of each word's first sub-token (None for words without one)."""
    pos: list[int | None] = [None] * n_words
    for i, w in enumerate(word_ids):
        if w >= 0 and pos[w] is None:
            pos[w] = i
    return pos


def token_logits(model, tokenizer, ds: datasets.Dataset, batch_size: int = 64):
    """Per batch of similar-length sentences: (their row indices, the rows, logits (batch, seq, n_tags))."""
    order = np.argsort(ds["length"], kind="stable")  # similar lengths per batch: little padding
    inputs = [k for k in MODEL_INPUTS if k in ds.column_names]
    with torch.inference_mode(), Progress("predict", len(ds), "sentences") as bar:
        for start in range(0, len(ds), batch_size):
            idx = order[start:start + batch_size].tolist()
            rows = ds.select(idx)
            batch = tokenizer.pad({k: rows[k] for k in inputs}, return_tensors="pt")
            yield idx, rows, model(**batch).logits.float().numpy()
            bar.update(len(idx))


def labelled(rows: datasets.Dataset, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (logits, gold tag id) of a batch's labelled sub-tokens (IGNORED positions and padding left out)."""
    gold = np.full(logits.shape[:2], IGNORED)
    for j, lab in enumerate(rows["labels"]):
        gold[j, :len(lab)] = lab
    keep = gold != IGNORED
    return logits[keep], gold[keep]


def calibration_data(model, tokenizer, ds: datasets.Dataset, info: dict | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Token level: the tag logits and gold tag of every labelled sub-token (the first of each word, or all of them
    with tokenize.label_all_subtokens), as the model was trained."""
    parts = [labelled(rows, logits) for _, rows, logits in token_logits(model, tokenizer, ds)]
    return _stack(parts, model.config.num_labels)


def _stack(parts: list[tuple[np.ndarray, np.ndarray]], n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros((0, n_labels), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def predict_words(model, tokenizer, ds: datasets.Dataset, labels: list[str], batch_size: int = 64,
                  calibration: list | None = None) -> list[list[str]]:
    """Each word's tag from its first sub-token's argmax (O where the word has no sub-token). With `calibration`
    (a list), each batch's labelled (logits, gold) is appended to it."""
    out: list[list[str]] = [[] for _ in range(len(ds))]
    for idx, rows, logits in token_logits(model, tokenizer, ds, batch_size):
        pred = logits.argmax(-1)
        for j, (i, word_ids, n) in enumerate(zip(idx, rows["word_ids"], map(len, rows["tokens"]), strict=True)):
            out[i] = ["O" if p is None else labels[pred[j, p]] for p in first_subtoken_positions(word_ids, n)]
        if calibration is not None:
            calibration.append(labelled(rows, logits))
    return out


def entity_confusion(y_true: list[list[str]], y_pred: list[list[str]], labels: list[str]) -> list[tuple[str, str]]:
    """(actual, predicted) per entity: a gold entity against the type of the predicted entity with the same span
    (O if none); a predicted entity matching no gold span counts as (O, its type)."""
    scheme = seqeval_scheme(labels)
    gold = {(e.sent_id, e.start, e.end): e.tag for sent in Entities(y_true, scheme).entities for e in sent}
    pred = {(e.sent_id, e.start, e.end): e.tag for sent in Entities(y_pred, scheme).entities for e in sent}
    pairs = [(tag, pred.get(span, "O")) for span, tag in sorted(gold.items())]
    pairs += [("O", tag) for span, tag in sorted(pred.items()) if span not in gold]
    return pairs


def confusion_matrix(pairs: list[tuple[str, str]], names: list[str]) -> list[list[int]]:
    index = {n: i for i, n in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for actual, predicted in pairs:
        matrix[index[actual]][index[predicted]] += 1
    return matrix


def predictions_csv(tokens: list[list[str]], y_true: list[list[str]], y_pred: list[list[str]], labels: list[str]
                    ) -> str:
    """One row per test sentence: label/prediction are space-joined tags (equal = fully right), plus the
    sentence's gold, predicted and correct entity counts, from which a paired test can resample entity F1."""
    scheme = seqeval_scheme(labels)
    gold = [set(sent) for sent in Entities(y_true, scheme).entities]
    pred = [set(sent) for sent in Entities(y_pred, scheme).entities]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", "prediction", "correct", "gold_entities", "pred_entities", "correct_entities",
                "text"])
    for i, (toks, t, p) in enumerate(zip(tokens, y_true, y_pred, strict=True)):
        w.writerow([i, " ".join(t), " ".join(p), int(t == p), len(gold[i]), len(pred[i]), len(gold[i] & pred[i]),
                    " ".join(toks)])
    return buf.getvalue()


def gold_words(ds: datasets.Dataset) -> list[list[str]]:
    names = ds.features["tags"].feature.names
    return [[names[i] for i in row] for row in ds["tags"]]


def robust_score(model, tokenizer, test: pd.DataFrame, perturb: Perturb, info: dict) -> float:
    """Entity F1 on the prepared test split with every sentence perturbed: each surviving word keeps its tag
    (perturbations keep a word one word and never drop an entity word), re-tokenized at the model's max_length
    and scored word by word like evaluate."""
    tokens, tags = [], []
    for words, word_tags in zip(test["tokens"], test["tags"], strict=True):
        kept = perturb(list(words), [t != "O" for t in word_tags])
        tokens.append([w for _, w in kept])
        tags.append([word_tags[i] for i, _ in kept])
    labels = info["labels"]
    words = datasets.Dataset.from_dict({"tokens": tokens, "tags": tags}, features=word_features(labels))
    # Labels on later sub-tokens do not change the word-level predictions scored here.
    ds = tokenize_words(words, tokenizer, info["max_length"], label_all=False)
    return entity_scores(gold_words(ds), predict_words(model, tokenizer, ds, labels), labels)["f1"]


def evaluate(model, tokenizer, test: datasets.Dataset, labels: list[str], reports: Path) -> Evaluation:
    y_true = gold_words(test)
    token_level: list[tuple[np.ndarray, np.ndarray]] = []
    y_pred = predict_words(model, tokenizer, test, labels, calibration=token_level)
    tokens = [list(t) for t in test["tokens"]]

    metrics = {**entity_scores(y_true, y_pred, labels), "n_test": len(y_true),
               "n_entities": sum(len(e) for e in Entities(y_true, seqeval_scheme(labels)).entities),
               "scheme": seqeval_scheme(labels).__name__, "per_type": per_type(y_true, y_pred, labels)}
    types = sorted({lab[2:] for lab in labels if lab != "O"})
    pairs = entity_confusion(y_true, y_pred, labels)
    plots = reports / "plots"
    write_text(reports / "classification_report.txt", text_report(y_true, y_pred, labels))
    write_text(reports / "predictions.csv", predictions_csv(tokens, y_true, y_pred, labels))
    write_csv(plots / "confusion.csv", [{"actual": a, "predicted": p} for a, p in pairs], ["actual", "predicted"])
    plot_confusion(confusion_matrix(pairs, [*types, "O"]), [*types, "O"], plots / "confusion_matrix.png",
                   title="entity confusion (O = missed / spurious)")
    return Evaluation(metrics, {kind: row["f1"] for kind, row in metrics["per_type"].items()},
                      [reports / "classification_report.txt", reports / "predictions.csv",
                       plots / "confusion_matrix.png"], calibration=_stack(token_level, len(labels)))
