"""NER data: CoNLL files or directories and hub data sets with tokens/ner_tags, tag checks, a seeded split."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tunepipe.data import (
    SPLITS,
    content_hash,
    data_hash,
    decode_error,
    describe,
    fill_missing_splits,
    imbalance_ratio,
    load_hf,
    read_encoding,
    split_files,
)
from tunepipe.errors import UserError
from tunepipe.params import Params
from tunepipe.tasks import Prepared
from tunepipe.tasks.ner.scheme import detect_and_validate, entity_spans, iob1_to_iob2

# What separates CoNLL columns (the \n that ends a line is gone by then).
ASCII_SPACE = " \t\r\f\v"


@dataclass(frozen=True)
class Sentence:
    tokens: list[str]
    tags: list[str]
    origin: str  # file path or hf:NAME (split)
    line: int | None = None  # first token's line in a CoNLL file
    row: int | None = None  # row in a hub split

    def where(self, i: int) -> str:
        """Location of token i, for error messages."""
        if self.line is not None:
            return f"{self.origin}:{self.line + i}"
        return f"{self.origin} row {self.row}, token {i + 1}"


def read_conll(path: Path, encoding: str | None = None) -> list[Sentence]:
    """`TOKEN [more columns] TAG` per line, a blank line between sentences, `-DOCSTART-` lines skipped."""
    try:
        codec = read_encoding(encoding)  # a byte-order mark (Windows editors write one) is not part of a token
        # Lines end at \n only (read_text turns \r\n and \r into \n): str.splitlines would also cut a token at
        # U+0085 or U+2028.
        lines = path.read_text(encoding=codec, errors="strict").split("\n")
    except (UnicodeDecodeError, LookupError) as exc:
        raise decode_error(path, encoding, exc) from None
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for n, line in enumerate([*lines, ""], start=1):
        parts = columns(line)
        if not parts or parts[0] == "-DOCSTART-":
            if tokens:
                sentences.append(Sentence(tokens, tags, str(path), line=start))
            tokens, tags = [], []
            continue
        if len(parts) < 2:
            raise UserError(f"{path}:{n}: expected a token and its tag separated by whitespace, got {line.strip()!r}")
        if not tokens:
            start = n
        tokens.append(parts[0])
        tags.append(parts[-1])
    if not sentences:
        raise UserError(f"data.source: {path} has no sentences (expected CoNLL format: one 'TOKEN TAG' per line)")
    return sentences


def columns(line: str) -> list[str]:
    """A CoNLL line's columns, split at ASCII whitespace only: a token may hold other spaces (a no-break space
    U+00A0 in text from web pages) and stays one token; str.split() would cut it and drop the rest silently."""
    line = line.strip(ASCII_SPACE)
    return re.split(f"[{ASCII_SPACE}]+", line) if line else []


def load_conll_dir(path: Path, encoding: str | None) -> dict[str, list[Sentence]]:
    files = split_files(path, lambda f: True, "e.g. eng.train/eng.testa/eng.testb or train/dev/test with any "
                                              "extension")
    return {split: read_conll(f, encoding) for split, f in files.items()}


def load_hf_ner(spec: str) -> dict[str, list[Sentence]]:
    """hf:NAME[:CONFIG] with `tokens` and `ner_tags` columns (tag ids are named through the ClassLabel feature)."""
    import datasets

    out: dict[str, list[Sentence]] = {}
    for split, ds in load_hf(spec).items():
        missing = [c for c in ("tokens", "ner_tags") if c not in ds.column_names]
        if missing:
            raise UserError(f"data.source: hf:{spec} ({split}) lacks column(s) {', '.join(missing)}; task: ner needs "
                            f"'tokens' and 'ner_tags' (columns: {', '.join(ds.column_names)})")
        feature = getattr(ds.features["ner_tags"], "feature", None)
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        origin = f"hf:{spec} ({split})"
        out[split] = [Sentence(list(toks), [names[t] if names else str(t) for t in tags], origin, row=i)
                     for i, (toks, tags) in enumerate(zip(ds["tokens"], ds["ner_tags"], strict=True))]
    return out


def load_ner_source(source: str, encoding: str | None) -> dict[str, list[Sentence]]:
    """{"all": [...]} for one file, else {split: [...]}."""
    if source.startswith("hf:"):
        return load_hf_ner(source.removeprefix("hf:"))
    if source.startswith("builtin:"):
        raise UserError(f"data.source: {source} is a classification data set; task: ner needs a CoNLL file or "
                        "directory, or hf:NAME with tokens/ner_tags columns")
    path = Path(source)
    if path.is_dir():
        return load_conll_dir(path, encoding)
    if not path.is_file():
        raise UserError(f"data.source: file not found: {path}")
    return {"all": read_conll(path, encoding)}


def random_split(sentences: list[Sentence], validation_size: float, test_size: float, seed: int
                 ) -> dict[str, list[Sentence]]:
    n = len(sentences)
    n_val, n_test = round(n * validation_size), round(n * test_size)
    if min(n_val, n_test) < 1 or n - n_val - n_test < 1:
        raise UserError(f"data: {n} sentences are too few to split into train/validation/test; add data or raise "
                        "data.validation_size/test_size")
    order = np.random.default_rng(seed).permutation(n)
    parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {k: [sentences[i] for i in sorted(idx)] for k, idx in parts.items()}


def cap_train(train: list[Sentence], max_samples: int | None, seed: int) -> list[Sentence]:
    """A seeded sample of `max_samples` train sentences that keeps every entity type: in a random order, first a
    sentence for each type not yet covered, then the rest; so the cap never makes a type unseen in train."""
    if not max_samples or max_samples >= len(train):
        return train
    order = np.random.default_rng(seed).permutation(len(train))
    types = [{kind for kind, _, _ in entity_spans(s.tags)} for s in train]
    needed = set().union(*types)
    keep = []
    for i in order:
        if types[i] & needed:
            keep.append(i)
            needed -= types[i]
    if len(keep) > max_samples:
        raise UserError(f"data.max_train_samples: {max_samples} train sentences cannot hold all "
                        f"{len(set().union(*types))} entity types of the train split (this seed needs {len(keep)}); "
                        "raise it, or set it to null for no cap")
    chosen = set(keep)
    keep += [i for i in order if i not in chosen][:max_samples - len(keep)]
    return [train[i] for i in sorted(keep)]


def records(sentences: list[Sentence]):
    """A split's sentences as the records its content hash is taken over (CoNLL lines, a blank line after each)."""
    return ("".join(f"{t}\t{g}\n" for t, g in zip(s.tokens, s.tags, strict=True)) + "\n" for s in sentences)


def split_stats(sentences: list[Sentence]) -> dict:
    counts = Counter(kind for s in sentences for kind, _, _ in entity_spans(s.tags))
    lengths = pd.Series([len(s.tokens) for s in sentences], dtype=float)
    words = describe(lengths)
    return {"rows": len(sentences), "tokens": int(lengths.sum()), "entities_total": sum(counts.values()),
            "entities": dict(sorted(counts.items())),
            "words_per_sentence": {"mean": words.get("mean"), "max": words.get("max")}}


def prepare(p: Params) -> Prepared:
    """Load, check tags, split, cap train."""
    raw = load_ner_source(p.data.source, p.data.encoding)
    drops = {"empty_sentence": 0}
    for name, sents in raw.items():
        kept = [s for s in sents if s.tokens and any(t.strip() for t in s.tokens)]
        drops["empty_sentence"] += len(sents) - len(kept)
        raw[name] = kept
    found = detect_and_validate([s for sents in raw.values() for s in sents], p.data.tag_scheme)
    if found == "IOB1":
        raw = {k: [Sentence(s.tokens, iob1_to_iob2(s.tags), s.origin, s.line, s.row) for s in v]
               for k, v in raw.items()}
    if "all" in raw:
        splits = random_split(raw["all"], p.data.validation_size, p.data.test_size, p.data.seed)
    else:
        splits = fill_missing_splits(
            raw, lambda train: random_split(train, p.data.validation_size, p.data.test_size, p.data.seed),
            lambda a, b: a + b)
    for name in SPLITS:
        if not splits[name]:
            raise UserError(f"data.source: the {name} split of {p.data.source} has no sentences")
    before_cap = len(splits["train"])
    splits["train"] = cap_train(splits["train"], p.data.max_train_samples, p.data.seed)
    stats = {k: split_stats(splits[k]) for k in SPLITS}
    types = sorted(stats["train"]["entities"])
    if not types:
        raise UserError(f"data.source: the train split of {p.data.source} has no entities (all tags are O)")
    for name in ("validation", "test"):
        unseen = sorted(set(stats[name]["entities"]) - set(types))
        if unseen:
            raise UserError(f"data: entity type(s) {', '.join(unseen)} appear in the {name} split but never in "
                            "train; add training sentences with them or retag them")
    stored = "BIOES" if found == "BIOES" else "IOB2"
    prefixes = ("B", "E", "I", "S") if stored == "BIOES" else ("B", "I")
    labels = sorted(f"{pre}-{t}" for t in types for pre in prefixes) + ["O"]
    hashes = {k: content_hash(records(splits[k])) for k in SPLITS}
    report = {
        "source": p.data.source,
        "scheme": {"found": found, "stored": stored},
        "labels": labels,
        "entity_types": types,
        "drops": drops,
        "train_capped_from": before_cap if before_cap != len(splits["train"]) else None,
        "splits": stats,
        # train word tags (O included), largest/smallest: what finetune.class_weights weighs
        "imbalance_ratio": imbalance_ratio(Counter(t for s in splits["train"] for t in s.tags).values()),
        "hashes": hashes,
        "data_hash": data_hash(hashes),
    }
    return Prepared(splits, report, write_splits)


def write_splits(splits: dict[str, list[Sentence]], out_dir: Path) -> None:
    for name, sents in splits.items():
        pd.DataFrame({"tokens": [s.tokens for s in sents], "tags": [s.tags for s in sents]}).to_parquet(
            out_dir / f"{name}.parquet", index=False)
