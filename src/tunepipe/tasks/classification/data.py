"""Classification data: labelled texts from a file, a directory of split files, the hub or the embedded corpus;
cleaned, deduplicated and split (stratified). Plain functions over pandas frames."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from tunepipe.data import (
    SPLITS,
    builtin_path,
    content_hash,
    data_hash,
    decode_error,
    describe,
    fill_missing_splits,
    hf_frame,
    imbalance_ratio,
    load_hf,
    read_encoding,
    split_files,
)
from tunepipe.errors import UserError
from tunepipe.params import Params
from tunepipe.tasks import Prepared

READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


def load_source(source: str, encoding: str | None = None, header: bool | list[str] = True
                ) -> dict[str, pd.DataFrame]:
    """Read `source` into frames: {"all": df} for an unsplit source, else {split: df}. `header`: data.header."""
    if source.startswith("builtin:"):
        path, builtin_encoding = builtin_path(source.removeprefix("builtin:"))
        return {"all": read_table(path, encoding or builtin_encoding)}
    if source.startswith("hf:"):
        return {split: hf_frame(ds) for split, ds in load_hf(source.removeprefix("hf:")).items()}
    path = Path(source)
    if path.is_dir():
        # Every file named like a split is taken (suffixes in any case): one read_table cannot read fails loudly
        # instead of being skipped, and a second file for a split is an error, not a silent choice.
        files = split_files(path, lambda f: True, f"train/validation/test with one of {', '.join(READERS)}")
        return {split: read_table(f, encoding, header) for split, f in files.items()}
    return {"all": read_table(path, encoding, header)}


def read_table(path: Path, encoding: str | None, header: bool | list[str] = True) -> pd.DataFrame:
    if not path.exists():
        raise UserError(f"data.source: file not found: {path}")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"data.source: {path}: unsupported file type '{path.suffix}' "
                        f"(use {', '.join(READERS)}, hf:NAME or builtin:tweets)")
    if path.stat().st_size == 0:
        raise UserError(f"data.source: {path} is empty")
    try:
        if kind == "parquet":
            df = pd.read_parquet(path)
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True, encoding=read_encoding(encoding), encoding_errors="strict")
        else:
            df = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", encoding=read_encoding(encoding),
                             encoding_errors="strict", dtype=str, keep_default_na=False,
                             header=0 if header is True else None)
            if header is not True:
                df.columns = name_columns(df.shape[1], header, path)
    except (UnicodeDecodeError, LookupError) as exc:
        raise decode_error(path, encoding, exc) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"data.source: {path} is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise UserError(f"data.source: {path} could not be parsed as {kind}: {str(exc).splitlines()[0]}") from None
    if df.empty:
        raise UserError(f"data.source: {path} has a header but no rows")
    return df


def name_columns(n: int, header: bool | list[str], path: Path) -> list[str]:
    """A header-less file's columns: data.header's names, or 0, 1, 2... (strings: params name columns by string)."""
    if header is False:
        return [str(i) for i in range(n)]
    if len(header) != n:
        raise UserError(f"data.header: names {len(header)} columns ({', '.join(header)}) but {path} has {n}; "
                        "list one name per column")
    return list(header)


def select_columns(df: pd.DataFrame, text_col: str, label_col: str, where: str) -> pd.DataFrame:
    for key, col in (("data.text_column", text_col), ("data.label_column", label_col)):
        if col not in df.columns:
            raise UserError(f"{key}: column '{col}' not found in {where} "
                            f"(columns: {', '.join(map(str, df.columns))}); set {key} in params.yaml")
    return pd.DataFrame({"text": as_text(df[text_col]), "label": as_text(df[label_col])})


def as_text(values: pd.Series) -> pd.Series:
    """Cells as strings, missing ones (None, NaN, pd.NA of a nullable column) as "", which clean() drops and
    counts. A float column holding only whole numbers is an int column with gaps as pandas reads it: 1, not 1.0."""
    whole = values.dropna() if pd.api.types.is_float_dtype(values) else None
    if whole is not None and ((whole % 1 == 0) & (whole.abs() < 2**53)).all():
        values = values.astype("Int64")
    return values.map(lambda v: "" if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else str(v))


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Strip, then drop empty texts/labels, texts whose copies disagree on the label, exact duplicates."""
    df = df.assign(text=df["text"].str.strip(), label=df["label"].str.strip())
    drops = {"empty_text": int((df["text"] == "").sum())}
    df = df[df["text"] != ""]
    drops["missing_label"] = int((df["label"] == "").sum())
    df = df[df["label"] != ""]
    n_labels = df.groupby("text")["label"].transform("nunique")
    drops["conflicting_label"] = int((n_labels > 1).sum())
    df = df[n_labels == 1]
    dup = df.duplicated(subset=["text"], keep="first")
    drops["duplicate"] = int(dup.sum())
    return df[~dup].reset_index(drop=True), drops


def check_classes(train: pd.DataFrame, min_count: int, where: str) -> None:
    counts = train["label"].value_counts()
    if len(counts) < 2:
        only = counts.index[0] if len(counts) else "none"
        raise UserError(f"data.label_column: {where} has only one class ('{only}'); "
                        "a classifier needs at least two")
    small = counts[counts < min_count]
    if len(small):
        label, n = small.index[0], int(small.iloc[0])
        raise UserError(f"data: class '{label}' has {n} example(s) in {where}; a stratified split needs at least "
                        f"{min_count}: add examples, merge the class, or drop it from the source")


def stratified_split(df: pd.DataFrame, validation_size: float, test_size: float, seed: int
                     ) -> dict[str, pd.DataFrame]:
    n_classes = df["label"].nunique()
    # Each of the three splits must receive at least one example of every class.
    min_count = max(3, int(-(-1 // min(validation_size, test_size))))
    check_classes(df, min_count, "the data")
    holdout = validation_size + test_size
    if round(len(df) * min(validation_size, test_size)) < n_classes:
        raise UserError(f"data: {len(df)} rows are too few to give every one of {n_classes} classes a place "
                        "in validation and test; add data or raise data.validation_size/test_size")
    train, rest = train_test_split(df, test_size=holdout, stratify=df["label"], random_state=seed)
    val, test = train_test_split(rest, test_size=test_size / holdout, stratify=rest["label"], random_state=seed)
    return {"train": train, "validation": val, "test": test}


def remove_cross_split_overlap(splits: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], int]:
    """A text seen in an earlier split (train, then validation) is removed from the later ones."""
    seen: set[str] = set()
    removed = 0
    out = {}
    for name in SPLITS:
        if name not in splits:
            continue
        df = splits[name]
        keep = ~df["text"].isin(seen)
        removed += int((~keep).sum())
        out[name] = df[keep]
        seen.update(out[name]["text"])
    return out, removed


def cap_train(train: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """A seeded, stratified sample of `max_samples` train rows that keeps every class: each class keeps one row and
    the rest is shared in proportion to class size (largest remainders first), so validation and test never hold
    a class that train lost."""
    if max_samples is None or max_samples >= len(train):
        return train
    counts = train["label"].value_counts().sort_index()
    if max_samples < len(counts):
        raise UserError(f"data.max_train_samples: {max_samples} is fewer than the {len(counts)} classes in the train "
                        f"split, so a class would be lost; set it to at least {len(counts)} (or null for no cap)")
    share = counts * (max_samples - len(counts)) / len(train)
    quota = 1 + share.astype(int)
    rest = max_samples - int(quota.sum())
    by_remainder = (share - share.astype(int)).sort_values(ascending=False, kind="stable").index
    while rest:
        for label in by_remainder:
            if rest and quota[label] < counts[label]:
                quota[label] += 1
                rest -= 1
    train = train.reset_index(drop=True)
    kept = [group.sample(n=int(quota[label]), random_state=seed)
            for label, group in train.groupby("label", sort=True)]
    return train.loc[sorted(pd.concat(kept).index)]


def per_class_sample(train: pd.DataFrame, k: int | None, seed: int) -> pd.DataFrame:
    """data.train_per_class: k rows of every class, drawn with `seed` (rows in their split order). A class with
    fewer than k rows stops with its name and count: a silent shortfall would make "k-shot" figures lie."""
    if k is None:
        return train
    counts = train["label"].value_counts().sort_index()
    short = counts[counts < k].sort_values(kind="stable")  # the smallest class first: it bounds k
    if len(short):
        label, n = short.index[0], int(short.iloc[0])
        raise UserError(f"data.train_per_class: class '{label}' has only {n} train example(s), fewer than {k}; lower "
                        f"data.train_per_class to at most {int(counts.min())} or add examples of that class")
    train = train.reset_index(drop=True)
    kept = [group.sample(n=k, random_state=seed) for _, group in train.groupby("label", sort=True)]
    return train.loc[sorted(pd.concat(kept).index)]


def check_labels_seen(splits: dict[str, pd.DataFrame]) -> None:
    known = set(splits["train"]["label"])
    for name in ("validation", "test"):
        unseen = sorted(set(splits[name]["label"]) - known)
        if unseen:
            raise UserError(f"data: label(s) {', '.join(map(repr, unseen[:5]))} appear in the {name} split but "
                            "never in train; add training examples or remove them from the source")


def split_stats(df: pd.DataFrame) -> dict:
    return {
        "rows": len(df),
        "class_counts": {str(k): int(v) for k, v in df["label"].value_counts().sort_index().items()},
        "chars": describe(df["text"].str.len()),
        "words": describe(df["text"].str.split().str.len()),
    }


def records(df: pd.DataFrame):
    """A split's rows as the lines its content hash is taken over."""
    return (f"{label}\t{text}\n" for text, label in zip(df["text"], df["label"], strict=True))


def prepare(p: Params) -> Prepared:
    """Plain frames in, clean stratified splits and a data report out."""
    raw = load_source(p.data.source, p.data.encoding, p.data.header)
    drops = {"empty_text": 0, "missing_label": 0, "conflicting_label": 0, "duplicate": 0}
    where = p.data.source
    if "all" in raw:
        df, drops = clean(select_columns(raw["all"], p.data.text_column, p.data.label_column, where))
        splits = stratified_split(df, p.data.validation_size, p.data.test_size, p.data.seed)
        drops["cross_split_duplicate"] = 0
    else:
        splits = {}
        for name, frame in raw.items():
            splits[name], d = clean(select_columns(frame, p.data.text_column, p.data.label_column,
                                                   f"{where} ({name})"))
            drops = {k: drops[k] + d[k] for k in drops}
            if splits[name].empty and name != "train":
                # e.g. a hub test split without labels (ClassLabel -1): treated like a split the source lacks
                del splits[name]
                print(f"prepare: the {name} split of {where} has no labelled rows; carving {name} out of train",
                      file=sys.stderr, flush=True)
        splits = fill_missing_splits(
            splits, lambda train: stratified_split(train, p.data.validation_size, p.data.test_size, p.data.seed),
            lambda a, b: pd.concat([a, b]))
        splits, drops["cross_split_duplicate"] = remove_cross_split_overlap(splits)
    # The cap comes before the class checks, so they judge the train split that tokenize will see.
    before_cap = len(splits["train"])
    splits["train"] = cap_train(splits["train"], p.data.max_train_samples, p.data.seed)
    splits["train"] = per_class_sample(splits["train"], p.data.train_per_class, p.data.seed)
    check_classes(splits["train"], 1, "the train split")
    check_labels_seen(splits)
    splits = {k: splits[k].reset_index(drop=True) for k in SPLITS}
    hashes = {k: content_hash(records(v)) for k, v in splits.items()}
    stats = {k: split_stats(v) for k, v in splits.items()}
    report = {
        "source": p.data.source,
        "labels": sorted(splits["train"]["label"].unique()),
        "drops": drops,
        "train_capped_from": before_cap if before_cap != len(splits["train"]) else None,
        "splits": stats,
        "imbalance_ratio": imbalance_ratio(stats["train"]["class_counts"].values()),  # train: largest/smallest class
        "hashes": hashes,
        "data_hash": data_hash(hashes),
    }
    return Prepared(splits, report, write_splits)


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    for name, df in splits.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
