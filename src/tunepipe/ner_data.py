"""Token classification (NER) data: CoNLL/hub loading, tag-scheme checks, word-piece alignment, augmentation.

Tags are kept per word through prepare; IOB1 is rewritten to IOB2 there (the entities are the same), so every
later stage sees either IOB2 or BIOES, told apart by the label set alone.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import Params

SPLITS = ("train", "validation", "test")
# File names (stem or extension) seen in CoNLL releases, mapped onto our splits.
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
               "val": "validation", "testa": "validation", "test": "test", "testb": "test"}
IGNORED = -100  # label of sub-tokens and special tokens the loss and metrics skip


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


# --- loading -------------------------------------------------------------------------------------------------

def read_conll(path: Path, encoding: str | None = None) -> list[Sentence]:
    """`TOKEN [more columns] TAG` per line, a blank line between sentences, `-DOCSTART-` lines skipped."""
    try:
        lines = path.read_text(encoding=encoding or "utf-8", errors="strict").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"data.source: {path} is not valid {encoding or 'UTF-8'} (byte {exc.object[exc.start]:#x} "
                        f"at offset {exc.start}); set data.encoding in params.yaml (e.g. latin-1)") from None
    except LookupError:
        raise UserError(f"data.encoding: unknown encoding '{encoding}'") from None
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for n, line in enumerate([*lines, ""], start=1):
        parts = line.split()
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


def split_of(path: Path) -> str | None:
    """eng.train -> train, eng.testa -> validation, dev.conll -> validation, test.txt -> test."""
    for part in (path.suffix.lstrip(".").lower(), path.stem.lower(), path.name.lower()):
        if part in SPLIT_NAMES:
            return SPLIT_NAMES[part]
    return None


def load_conll_dir(path: Path, encoding: str | None) -> dict[str, list[Sentence]]:
    files: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        split = split_of(f) if f.is_file() and not f.name.startswith(".") else None
        if split is None:
            continue
        if split in files:
            raise UserError(f"data.source: {path} has two {split} files ({files[split].name}, {f.name}); keep one")
        files[split] = f
    if "train" not in files:
        raise UserError(f"data.source: directory {path} has no train file (expected e.g. eng.train/eng.testa/"
                        "eng.testb or train/dev/test with any extension)")
    return {split: read_conll(f, encoding) for split, f in files.items()}


def load_hf_ner(spec: str) -> dict[str, list[Sentence]]:
    """hf:NAME[:CONFIG] with `tokens` and `ner_tags` columns (tag ids are named through the ClassLabel feature)."""
    name, _, config = spec.partition(":")
    try:
        dsd = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the hub raises many types; the user needs the message
        raise UserError(f"data.source: could not load hf:{spec}: {str(exc).splitlines()[0]}") from None
    out: dict[str, list[Sentence]] = {}
    for split, ds in dsd.items():
        ours = SPLIT_NAMES.get(split)
        if ours is None:
            continue
        missing = [c for c in ("tokens", "ner_tags") if c not in ds.column_names]
        if missing:
            raise UserError(f"data.source: hf:{spec} ({split}) lacks column(s) {', '.join(missing)}; task: ner needs "
                            f"'tokens' and 'ner_tags' (columns: {', '.join(ds.column_names)})")
        feature = getattr(ds.features["ner_tags"], "feature", None)
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        origin = f"hf:{spec} ({split})"
        out[ours] = [Sentence(list(toks), [names[t] if names else str(t) for t in tags], origin, row=i)
                     for i, (toks, tags) in enumerate(zip(ds["tokens"], ds["ner_tags"], strict=True))]
    if "train" not in out:
        raise UserError(f"data.source: hf:{spec} has no train split (splits: {', '.join(dsd)})")
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


# --- tag schemes ---------------------------------------------------------------------------------------------

def parse_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '')."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        return "?", ""
    return prefix, kind


def scheme_of(labels: list[str]) -> str:
    """The stored scheme, read off the label set: BIOES has E-/S- tags, IOB2 has not."""
    return "BIOES" if any(parse_tag(lab)[0] in ("E", "S") for lab in labels) else "IOB2"


def _iob2_violation(s: Sentence) -> tuple[int, str] | None:
    """First I-X that does not continue an X entity (IOB2 needs B-X first)."""
    prev = ("O", "")
    for i, tag in enumerate(s.tags):
        prefix, kind = parse_tag(tag)
        if prefix == "I" and (prev[0] not in ("B", "I") or prev[1] != kind):
            return i, f"{tag} cannot follow {s.tags[i - 1] if i else 'the sentence start'}"
        prev = (prefix, kind)
    return None


def _iob1_violation(s: Sentence) -> tuple[int, str] | None:
    """First B-X that is not between two X entities (IOB1 only uses B- to split adjacent same-type entities)."""
    prev = ("O", "")
    for i, tag in enumerate(s.tags):
        prefix, kind = parse_tag(tag)
        if prefix == "B" and (prev[0] not in ("B", "I") or prev[1] != kind):
            return i, f"{tag} after {s.tags[i - 1] if i else 'the sentence start'} (IOB1 starts entities with I-)"
        prev = (prefix, kind)
    return None


def _bioes_violation(s: Sentence) -> tuple[int, str] | None:
    """I-X/E-X must continue a B-X/I-X of the same type, and every B-X/I-X must be continued."""
    prev = ("O", "")
    for i, tag in enumerate([*s.tags, "O"]):
        prefix, kind = parse_tag(tag)
        open_entity = prev[0] in ("B", "I")
        continues = open_entity and prefix in ("I", "E") and kind == prev[1]
        if prefix in ("I", "E") and not continues:
            return i, f"{tag} cannot follow {s.tags[i - 1] if i else 'the sentence start'}"
        if open_entity and not continues:
            return i - 1, f"{s.tags[i - 1]} is not closed by I-/E-{prev[1]}" + (
                "" if i < len(s.tags) else " before the sentence ends")
        prev = (prefix, kind)
    return None


def _first_violation(sentences: list[Sentence], check) -> tuple[Sentence, int, str] | None:
    for s in sentences:
        hit = check(s)
        if hit:
            return s, hit[0], hit[1]
    return None


def detect_and_validate(sentences: list[Sentence], scheme: str) -> str:
    """Check every tag against `scheme` (auto: detect it); returns the scheme found (IOB1, IOB2 or BIOES)."""
    prefixes: set[str] = set()
    for s in sentences:
        for i, tag in enumerate(s.tags):
            prefix = parse_tag(tag)[0]
            if prefix == "?":
                raise UserError(f"{s.where(i)}: tag {tag!r} is not O or PREFIX-TYPE with PREFIX one of B, I, E, S")
            prefixes.add(prefix)
    if scheme == "BIO":
        scheme = "IOB2"
    bioes = bool(prefixes & {"E", "S"})
    if scheme == "auto":
        if bioes:
            scheme = "BIOES"
        else:
            bad_iob2 = _first_violation(sentences, _iob2_violation)
            bad_iob1 = _first_violation(sentences, _iob1_violation) if bad_iob2 else None
            if bad_iob2 and bad_iob1:
                s, i, why = bad_iob2
                s1, i1, _ = bad_iob1
                raise UserError(f"{s.where(i)}: {why}: not IOB2, and {s1.tags[i1]} at {s1.where(i1)} rules out IOB1; "
                                "fix the tags (or set data.tag_scheme to the scheme the file should follow)")
            scheme = "IOB1" if bad_iob2 else "IOB2"
    elif bioes and scheme != "BIOES":
        s, i = next((s, i) for s in sentences for i, t in enumerate(s.tags) if parse_tag(t)[0] in ("E", "S"))
        raise UserError(f"{s.where(i)}: tag {s.tags[i]!r} is not allowed in {scheme} (data.tag_scheme); "
                        "set data.tag_scheme: BIOES or auto")
    check = {"IOB1": _iob1_violation, "IOB2": _iob2_violation, "BIOES": _bioes_violation}[scheme]
    bad = _first_violation(sentences, check)
    if bad:
        s, i, why = bad
        hint = " (set data.tag_scheme: IOB1 if the file uses IOB1)" if scheme == "IOB2" else ""
        raise UserError(f"{s.where(i)}: {why}, which {scheme} does not allow; fix the tag{hint}")
    return scheme


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """An I-X that opens an entity becomes B-X; the entities do not change."""
    out, prev = [], ("O", "")
    for tag in tags:
        prefix, kind = parse_tag(tag)
        if prefix == "I" and (prev[0] == "O" or prev[1] != kind):
            tag = f"B-{kind}"
        out.append(tag)
        prev = (prefix, kind)
    return out


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, end word) of each entity in valid IOB2/BIOES tags: each starts with B- or S-."""
    spans, i = [], 0
    while i < len(tags):
        prefix, kind = parse_tag(tags[i])
        end = i + 1
        if prefix == "B":
            while end < len(tags) and parse_tag(tags[end]) == ("I", kind):
                end += 1
            if end < len(tags) and parse_tag(tags[end]) == ("E", kind):
                end += 1
        if prefix in ("B", "S"):
            spans.append((kind, i, end))
        i = end
    return spans


def mention_tags(kind: str, n: int, scheme: str) -> list[str]:
    if scheme == "BIOES":
        return [f"S-{kind}"] if n == 1 else [f"B-{kind}", *[f"I-{kind}"] * (n - 2), f"E-{kind}"]
    return [f"B-{kind}", *[f"I-{kind}"] * (n - 1)]


# --- prepare -------------------------------------------------------------------------------------------------

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


def content_hash(sentences: list[Sentence]) -> str:
    h = hashlib.sha256()
    for s in sentences:
        h.update(("".join(f"{t}\t{g}\n" for t, g in zip(s.tokens, s.tags, strict=True)) + "\n").encode())
    return h.hexdigest()


def split_stats(sentences: list[Sentence]) -> dict:
    counts = Counter(kind for s in sentences for kind, _, _ in entity_spans(s.tags))
    lengths = pd.Series([len(s.tokens) for s in sentences], dtype=float)
    return {"rows": len(sentences), "tokens": int(lengths.sum()), "entities_total": sum(counts.values()),
            "entities": dict(sorted(counts.items())),
            "words_per_sentence": {"mean": round(float(lengths.mean()), 2), "max": int(lengths.max())}}


def prepare_ner(p: Params) -> tuple[dict[str, list[Sentence]], dict, Callable[[dict, Path], None]]:
    """Load, check tags, split, cap train; returns the splits, the data report and their writer."""
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
        splits = dict(raw)
        missing = [s for s in ("validation", "test") if s not in splits]
        if missing:  # carve what the source lacks out of train; a part carved but not needed goes back
            carved = random_split(splits["train"], p.data.validation_size, p.data.test_size, p.data.seed)
            splits["train"] = carved["train"]
            for name in ("validation", "test"):
                if name in missing:
                    splits[name] = carved[name]
                else:
                    splits["train"] = splits["train"] + carved[name]
    for name in SPLITS:
        if not splits[name]:
            raise UserError(f"data.source: the {name} split of {p.data.source} has no sentences")
    before_cap = len(splits["train"])
    if p.data.max_train_samples and p.data.max_train_samples < before_cap:
        keep = np.random.default_rng(p.data.seed).choice(before_cap, p.data.max_train_samples, replace=False)
        splits["train"] = [splits["train"][i] for i in sorted(keep)]
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
    hashes = {k: content_hash(splits[k]) for k in SPLITS}
    report = {
        "source": p.data.source,
        "scheme": {"found": found, "stored": stored},
        "labels": labels,
        "entity_types": types,
        "drops": drops,
        "train_capped_from": before_cap if before_cap != len(splits["train"]) else None,
        "splits": stats,
        "hashes": hashes,
        "data_hash": hashlib.sha256("".join(hashes[k] for k in SPLITS).encode()).hexdigest(),
    }
    return splits, report, write_splits


def write_splits(splits: dict[str, list[Sentence]], out_dir: Path) -> None:
    for name, sents in splits.items():
        pd.DataFrame({"tokens": [s.tokens for s in sents], "tags": [s.tags for s in sents]}).to_parquet(
            out_dir / f"{name}.parquet", index=False)


# --- tokenize ------------------------------------------------------------------------------------------------

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
            enc["words_cut"].append(len(tags) - 1 - last)  # words lost to truncation
            enc["words_empty"].append(last + 1 - len(seen))  # words the tokenizer turns into nothing
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return dict(enc)

    return encode


def tokenize_words(ds: datasets.Dataset, tokenizer, max_length: int, label_all: bool) -> datasets.Dataset:
    labels = ds.features["tags"].feature.names
    return ds.map(encoder(tokenizer, max_length, labels, label_all), batched=True, batch_size=1000,
                  desc="tokenize")


def truncation_stats(ds: datasets.Dataset) -> dict:
    cut, empty, n = ds["words_cut"], ds["words_empty"], len(ds)
    return {"examples": n, "truncated": sum(1 for c in cut if c), "truncation_rate": round(
        sum(1 for c in cut if c) / max(n, 1), 4), "words_cut": sum(cut), "words_without_subtokens": sum(empty),
        "mean_tokens": round(sum(ds["length"]) / max(n, 1), 2)}


def _tokenizer_for(p: Params, labels: list[str]):
    from tunepipe.modeling import load_tokenizer

    if p.tokenize.label_all_subtokens and scheme_of(labels) == "BIOES":
        raise UserError("tokenize.label_all_subtokens: works with IOB1/IOB2 tags only (a BIOES S-/E- word cannot be "
                        "spread over sub-tokens); set it to false")
    return load_tokenizer(p.model.name)


def tokenize_ner(p: Params, in_dir: Path) -> tuple[datasets.DatasetDict, dict]:
    """Sub-token inputs with aligned labels; the word-level tokens/tags stay for augment and evaluate."""
    labels = read_json(in_dir / "meta.json")["labels"]
    tokenizer = _tokenizer_for(p, labels)
    dsd = datasets.DatasetDict()
    for split in SPLITS:
        df = pd.read_parquet(in_dir / f"{split}.parquet")
        words = datasets.Dataset.from_dict({"tokens": [list(t) for t in df["tokens"]],
                                            "tags": [list(t) for t in df["tags"]]}, features=word_features(labels))
        dsd[split] = tokenize_words(words, tokenizer, p.tokenize.max_length, p.tokenize.label_all_subtokens)
    report = {"max_length": p.tokenize.max_length, "label_all_subtokens": p.tokenize.label_all_subtokens,
              "splits": {k: truncation_stats(v) for k, v in dsd.items()}}
    return dsd.remove_columns(["words_cut", "words_empty"]), report


# --- augment -------------------------------------------------------------------------------------------------

def swap_entities(tokens: list[str], tags: list[str], bank: dict[str, list[tuple[str, ...]]], prob: float,
                  scheme: str, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Each mention is replaced, with probability `prob` (at least one), by another train mention of its type."""
    spans = entity_spans(tags)
    hit = rng.random(len(spans)) < prob
    if not hit.any():
        hit[rng.integers(len(spans))] = True
    out_tok, out_tag, pos = [], [], 0
    for (kind, start, end), swap in zip(spans, hit, strict=True):
        out_tok += tokens[pos:start]
        out_tag += tags[pos:start]
        mention = tuple(tokens[start:end])
        if swap:
            others = [m for m in bank[kind] if m != mention] or bank[kind]
            mention = others[rng.integers(len(others))]
        out_tok += list(mention)
        out_tag += mention_tags(kind, len(mention), scheme)
        pos = end
    return out_tok + tokens[pos:], out_tag + tags[pos:]


def mask_outside(tokens: list[str], tags: list[str], prob: float, mask: str, rng: np.random.Generator
                 ) -> tuple[list[str], list[str]]:
    """Words tagged O become the mask token with probability `prob` (at least one); entity words stay."""
    outside = [i for i, t in enumerate(tags) if t == "O"]
    hit = set(np.asarray(outside)[rng.random(len(outside)) < prob].tolist())
    if not hit:
        hit = {outside[rng.integers(len(outside))]}
    return [mask if i in hit else t for i, t in enumerate(tokens)], list(tags)


def augment_ner(train: datasets.Dataset, p: Params) -> datasets.Dataset:
    """Train plus round(ratio * len) augmented sentences whose tags stay aligned with their words."""
    a = p.augment
    if a.method in ("random_deletion", "span_cutoff"):
        raise UserError(f"augment.method: {a.method} is not available for task: ner (it would cut entities apart); "
                        "use entity_swap, token_mask or none")
    n_new = round(a.ratio * len(train))
    if a.method == "none" or n_new == 0:
        return train
    labels = train.features["tags"].feature.names
    scheme = scheme_of(labels)
    tokenizer = _tokenizer_for(p, labels)
    words = [list(t) for t in train["tokens"]]
    tags = [[labels[i] for i in row] for row in train["tags"]]
    rng = np.random.default_rng(a.seed)
    if a.method == "entity_swap":
        bank: dict[str, list[tuple[str, ...]]] = {}
        for toks, tg in zip(words, tags, strict=True):
            for kind, s, e in entity_spans(tg):
                bank.setdefault(kind, []).append(tuple(toks[s:e]))
        bank = {k: sorted(set(v)) for k, v in bank.items()}
        pool = [i for i, tg in enumerate(tags) if entity_spans(tg)]
        make = lambda i: swap_entities(words[i], tags[i], bank, a.probability, scheme, rng)  # noqa: E731
    elif a.method == "token_mask":
        if tokenizer.mask_token is None:
            raise UserError(f"augment.method: token_mask needs a mask token and '{p.model.name}' has none; "
                            "use entity_swap")
        pool = [i for i, tg in enumerate(tags) if "O" in tg]
        make = lambda i: mask_outside(words[i], tags[i], a.probability, tokenizer.mask_token, rng)  # noqa: E731
    else:
        raise UserError(f"augment.method: {a.method} is not available for task: ner; use entity_swap, token_mask "
                        "or none")
    if not pool:
        return train
    picked = rng.choice(pool, size=n_new, replace=n_new > len(pool))
    new_tokens, new_tags = zip(*(make(int(i)) for i in picked), strict=True)
    added = datasets.Dataset.from_dict({"tokens": list(new_tokens), "tags": list(new_tags)},
                                       features=word_features(labels))
    added = tokenize_words(added, tokenizer, p.tokenize.max_length, p.tokenize.label_all_subtokens)
    added = added.remove_columns(["words_cut", "words_empty"]).cast(train.features)
    return datasets.concatenate_datasets([train, added])
