"""NER tokenize: word-piece inputs with each word's tag on its first sub-token (or, with
tokenize.label_all_subtokens, on every sub-token); the word-level tokens/tags stay for augment and evaluate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import pandas as pd

from tunepipe.data import SPLITS, truncation_stats
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.modeling import load_tokenizer
from tunepipe.params import Params
from tunepipe.tasks.ner.scheme import parse_tag, scheme_of

IGNORED = -100  # label of sub-tokens and special tokens the loss and metrics skip


def align_labels(word_ids: list[int | None], word_labels: list[int], label_all: bool,
                 inside: dict[int, int]) -> list[int]:
    """Word labels onto sub-tokens: the first sub-token of a word gets its label; the rest get IGNORED, or with
    `label_all` the word's label with B-X turned into I-X (`inside`), so no sub-token opens a second entity."""
    out, prev = [], None
    for w in word_ids:
        if w is None:
            out.append(IGNORED)
        elif w != prev:
            out.append(word_labels[w])
        else:
            out.append(inside.get(word_labels[w], word_labels[w]) if label_all else IGNORED)
        prev = w
    return out


def word_features(labels: list[str]) -> datasets.Features:
    return datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                              "tags": datasets.List(datasets.ClassLabel(names=labels))})


def encoder(tokenizer, max_length: int, labels: list[str], label_all: bool) -> Callable[[dict], dict]:
    """A batched datasets.map function: tokens/tags (word level) -> model inputs and aligned labels."""
    ids = {lab: i for i, lab in enumerate(labels)}
    inside = {ids[lab]: ids[f"I-{parse_tag(lab)[1]}"] for lab in labels if parse_tag(lab)[0] == "B"}

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        enc["labels"], enc["word_ids"], enc["words_cut"], enc["words_empty"] = [], [], [], []
        for i, tags in enumerate(batch["tags"]):
            word_ids = enc.word_ids(i)
            enc["labels"].append(align_labels(word_ids, tags, label_all, inside))
            enc["word_ids"].append([-1 if w is None else w for w in word_ids])
            seen = {w for w in word_ids if w is not None}
            last = max(seen, default=-1)
            # Words after the last one with a sub-token were cut by truncation, unless they have none of their own
            # (a word of only no-break spaces or control characters): those count as empty, not cut.
            tail = batch["tokens"][i][last + 1:]
            tail_empty = len(tail) - len(tokenized_words(tokenizer, tail)) if tail else 0
            enc["words_cut"].append(len(tail) - tail_empty)  # words lost to truncation
            enc["words_empty"].append(last + 1 - len(seen) + tail_empty)  # words the tokenizer turns into nothing
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return dict(enc)

    return encode


def tokenized_words(tokenizer, words: list[str]) -> set[int]:
    """Indices of the words that get at least one sub-token."""
    ids = tokenizer(words, is_split_into_words=True, add_special_tokens=False).word_ids()
    return {w for w in ids if w is not None}


def tokenize_words(ds: datasets.Dataset, tokenizer, max_length: int, label_all: bool) -> datasets.Dataset:
    labels = ds.features["tags"].feature.names
    return ds.map(encoder(tokenizer, max_length, labels, label_all), batched=True, batch_size=1000,
                  desc="tokenize")


def ner_truncation_stats(ds: datasets.Dataset) -> dict:
    """The shared truncation figures (a sentence is cut when it loses words), plus the words lost."""
    return {**truncation_stats([c > 0 for c in ds["words_cut"]], ds["length"]), "words_cut": sum(ds["words_cut"]),
            "words_without_subtokens": sum(ds["words_empty"])}


def tokenizer_for(p: Params, labels: list[str]):
    if p.tokenize.label_all_subtokens and scheme_of(labels) == "BIOES":
        raise UserError("tokenize.label_all_subtokens: works with IOB1/IOB2 tags only (a BIOES S-/E- word cannot be "
                        "spread over sub-tokens); set it to false")
    return load_tokenizer(p.model.name, p.tokenize.max_length)


def tokenize(p: Params, in_dir: Path) -> tuple[datasets.DatasetDict, dict]:
    """Sub-token inputs with aligned labels; the word-level tokens/tags stay for augment and evaluate."""
    labels = read_json(in_dir / "meta.json")["labels"]
    tokenizer = tokenizer_for(p, labels)
    dsd = datasets.DatasetDict()
    for split in SPLITS:
        df = pd.read_parquet(in_dir / f"{split}.parquet")
        words = datasets.Dataset.from_dict({"tokens": [list(t) for t in df["tokens"]],
                                            "tags": [list(t) for t in df["tags"]]}, features=word_features(labels))
        dsd[split] = tokenize_words(words, tokenizer, p.tokenize.max_length, p.tokenize.label_all_subtokens)
    report = {"max_length": p.tokenize.max_length, "label_all_subtokens": p.tokenize.label_all_subtokens,
              "splits": {k: ner_truncation_stats(v) for k, v in dsd.items()}}
    return dsd.remove_columns(["words_cut", "words_empty"]), report
