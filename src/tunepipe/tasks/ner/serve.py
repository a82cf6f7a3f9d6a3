"""Served output of an NER model: entity spans with character offsets and a score.

Self-contained (numpy and re only): export copies this file into the exported model directory as serve.py, and
the served model (serving/pyfunc_model.py's TextPredictor) runs it from there."""

from __future__ import annotations

import re

import numpy as np

# Words cut the way CoNLL data is: abbreviations (U.S.), numbers and hyphenated or dotted words (1,000,
# 1996-08-22, York-based, O'Neill) stay whole; clitics ('s) and other punctuation stand alone. The model learned
# its tags on the first sub-token of such words.
WORD = re.compile(r"(?:[^\W\d_]\.){2,}|\w+(?:[-.,/&]\w+|'(?!(?:s|re|ve|ll|d|m|t)\b)\w+)*"
                  r"|'(?:s|re|ve|ll|d|m|t)\b|\S", re.IGNORECASE)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character spans."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def tag_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Word tags (IOB2 or BIOES) -> (type, first word, end word), read leniently as conlleval does: an I-X/E-X
    that does not continue an X entity opens one, so a missed B- does not lose the entity."""
    spans: list[tuple[str, int, int]] = []
    cur: tuple[str, int] | None = None
    for i, tag in enumerate(tags):
        prefix, _, kind = tag.partition("-")
        if cur and (prefix not in ("I", "E") or kind != cur[0]):
            spans.append((cur[0], cur[1], i))
            cur = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and cur is None):
            cur = (kind, i)
        if prefix in ("E", "S") and cur:
            spans.append((cur[0], cur[1], i + 1))
            cur = None
    if cur:
        spans.append((cur[0], cur[1], len(tags)))
    return spans


def word_probs(predictor, words: list[list[str]]) -> list[list[np.ndarray | None]]:
    """Tag probabilities of each word from its first sub-token; a long text runs as several windows."""
    enc = predictor.tokenizer(words, is_split_into_words=True, truncation=True, max_length=predictor.max_length,
                              padding=True, return_overflowing_tokens=True, stride=0, return_tensors="np")
    probs = predictor.probabilities(predictor.run(enc))
    out: list[list[np.ndarray | None]] = [[None] * len(w) for w in words]
    for row, sample in enumerate(enc["overflow_to_sample_mapping"]):
        for pos, w in enumerate(enc.word_ids(row)):
            if w is not None and out[sample][w] is None:
                out[sample][w] = probs[row, pos]
    return out


def predict(predictor, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Per text: entity spans with character offsets; a span's score is the mean of its words' tag scores."""
    results = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        words = [split_words(t) for t in chunk]
        probs = word_probs(predictor, [[w for w, _, _ in ws] for ws in words])
        for text, ws, ps in zip(chunk, words, probs, strict=True):
            tags = ["O" if p is None else predictor.labels[int(p.argmax())] for p in ps]
            scores = [0.0 if p is None else float(p.max()) for p in ps]
            results.append({"entities": [
                {"text": text[ws[a][1]:ws[b - 1][2]], "type": kind, "start": ws[a][1], "end": ws[b - 1][2],
                 "score": round(sum(scores[a:b]) / (b - a), 6)}
                for kind, a, b in tag_spans(tags)]})
    return results
