"""Multi-label data: texts with a set of labels each, from the same sources as classification (files, a directory
of split files, the hub). The labels come as one column of delimited strings ("joy|love", data.label_delimiter), a
column of lists (JSONL/parquet), one 0/1 column per label (data.label_columns), or ids into a file of names
(data.label_names). Cleaned like classification (a text whose copies carry different label sets is a conflict),
split with a multi-label stratification approximation, capped keeping every label."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tunepipe.data import SPLITS, content_hash, data_hash, describe, fill_missing_splits, read_encoding
from tunepipe.errors import UserError
from tunepipe.params import DataParams, Params
from tunepipe.tasks import Prepared
from tunepipe.tasks.classification.data import as_text, load_source, remove_cross_split_overlap

TRUE, FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}


def read_label_names(path: str, encoding: str | None) -> list[str]:
    f = Path(path)
    if not f.is_file():
        raise UserError(f"data.label_names: file not found: {f}")
    names = [line.strip() for line in f.read_text(encoding=read_encoding(encoding)).splitlines() if line.strip()]
    if len(set(names)) != len(names) or not names:
        raise UserError(f"data.label_names: {f} must list distinct label names, one a line")
    return names


def cell_labels(value, delimiter: str) -> list[str] | None:
    """One label cell as a list of labels; None = missing (dropped and counted). A list is taken as is (an empty
    list is a text with no label); a string is split on the delimiter."""
    if isinstance(value, list | tuple | np.ndarray):
        return [str(v).strip() for v in value if str(v).strip()]
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    parts = [x.strip() for x in str(value).split(delimiter)]
    return [x for x in parts if x] or None


def label_frame(df: pd.DataFrame, d: DataParams, names: list[str] | None, where: str) -> pd.DataFrame:
    """Source columns -> text and labels (a sorted tuple, or None where missing)."""
    need = [("data.text_column", d.text_column)]
    need += [("data.label_columns", c) for c in d.label_columns] if d.label_columns else [
        ("data.label_column", d.label_column)]
    for key, col in need:
        if col not in df.columns:
            raise UserError(f"{key}: column '{col}' not found in {where} "
                            f"(columns: {', '.join(map(str, df.columns))}); set {key} in params.yaml")
    if d.label_columns:
        labels = [indicator_labels(df, d.label_columns, i, where) for i in range(len(df))]
    else:
        labels = [cell_labels(v, d.label_delimiter) for v in df[d.label_column]]
    if names is not None:
        labels = [None if ls is None else [label_name(x, names, d.label_names, where) for x in ls] for ls in labels]
    return pd.DataFrame({"text": as_text(df[d.text_column]).to_numpy(),
                         "labels": [None if ls is None else tuple(sorted(set(ls))) for ls in labels]})


def indicator_labels(df: pd.DataFrame, columns: list[str], row: int, where: str) -> list[str] | None:
    """The columns holding 1 in one row of 0/1 columns; any empty cell makes the row's labels missing."""
    out = []
    for col in columns:
        v = df[col].iloc[row]
        if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) or str(v).strip() == "":
            return None
        s = str(v).strip().lower()
        if s not in TRUE | FALSE:
            raise UserError(f"data.label_columns: column '{col}' row {row + 1} of {where} holds {v!r}; each label "
                            "column must hold 0 or 1 (true/false)")
        if s in TRUE:
            out.append(col)
    return out


def label_name(x: str, names: list[str], names_file: str, where: str) -> str:
    if not x.isdigit() or int(x) >= len(names):
        raise UserError(f"data.label_names: {where} has label {x!r}, which is not a 0-based id into the "
                        f"{len(names)} names of {names_file}")
    return names[int(x)]


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Strip, then drop empty texts, missing labels, texts whose copies disagree on the label set (conflicts),
    and exact duplicates (the first copy stays)."""
    df = df.assign(text=df["text"].str.strip())
    drops = {"empty_text": int((df["text"] == "").sum())}
    df = df[df["text"] != ""]
    missing = df["labels"].isna()
    drops["missing_label"] = int(missing.sum())
    df = df[~missing]
    key = df["labels"].map("\x1f".join)
    n_sets = key.groupby(df["text"]).transform("nunique")
    drops["conflicting_label"] = int((n_sets > 1).sum())
    df = df[n_sets == 1]
    dup = df.duplicated(subset=["text"], keep="first")
    drops["duplicate"] = int(dup.sum())
    return df[~dup].reset_index(drop=True), drops


def strata(df: pd.DataFrame, min_count: int) -> pd.Series:
    """Each row's stratum: its rarest label that is common enough to stratify on (>= min_count rows); rows with
    none share one stratum, folded into the largest where it is itself too small. Splitting on this keeps each
    rare label's rows apart from the frequent labels they co-occur with, which is what iterative stratification
    does exactly (Sechidis et al. 2011): a documented approximation, with scikit-learn's stratified split."""
    counts = pd.Series([x for ls in df["labels"] for x in ls]).value_counts()
    usable = counts[counts >= min_count]
    out = df["labels"].map(lambda ls: min((x for x in ls if x in usable.index), key=lambda x: (usable[x], x),
                                          default="\x00none"))
    sizes = out.value_counts()
    if sizes.get("\x00none", min_count) < min_count:
        out = out.replace("\x00none", sizes.drop("\x00none").idxmax() if len(sizes) > 1 else "\x00none")
    return out


def stratified_split(df: pd.DataFrame, validation_size: float, test_size: float, seed: int
                     ) -> dict[str, pd.DataFrame]:
    if len(df) < 10:
        raise UserError(f"data: {len(df)} labelled rows are too few to split into train, validation and test")
    min_count = max(3, int(-(-1 // min(validation_size, test_size))))
    holdout = validation_size + test_size
    s = strata(df, min_count)
    if s.nunique() < 2 or s.value_counts().min() < 2:
        s = None
    train, rest = train_test_split(df, test_size=holdout, stratify=s, random_state=seed)
    s_rest = strata(rest, 2)
    if s_rest.nunique() < 2 or s_rest.value_counts().min() < 2:
        s_rest = None
    val, test = train_test_split(rest, test_size=test_size / holdout, stratify=s_rest, random_state=seed)
    return {"train": train, "validation": val, "test": test}


def cap_train(train: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of `max_samples` train rows that keeps every label: one row per label first (rarest label
    first, a random row carrying it), the rest drawn at random."""
    if max_samples is None or max_samples >= len(train):
        return train
    train = train.reset_index(drop=True)
    counts = pd.Series([x for ls in train["labels"] for x in ls]).value_counts()
    if max_samples < len(counts):
        raise UserError(f"data.max_train_samples: {max_samples} is fewer than the {len(counts)} labels in the train "
                        f"split, so a label would be lost; set it to at least {len(counts)} (or null for no cap)")
    rng = np.random.default_rng(seed)
    kept: set[int] = set()
    for label in counts.sort_values(kind="stable").index:
        rows = train.index[train["labels"].map(lambda ls, lab=label: lab in ls)]
        if not kept.intersection(rows):
            kept.add(int(rng.choice(rows)))
    rest = np.setdiff1d(train.index.to_numpy(), np.fromiter(kept, int))
    kept.update(rng.choice(rest, size=max_samples - len(kept), replace=False).tolist())
    return train.loc[sorted(kept)]


def check_labels_seen(splits: dict[str, pd.DataFrame]) -> None:
    known = {x for ls in splits["train"]["labels"] for x in ls}
    if not known:
        raise UserError("data: the train split has no labels at all; a multi-label classifier needs at least one")
    for name in ("validation", "test"):
        unseen = sorted({x for ls in splits[name]["labels"] for x in ls} - known)
        if unseen:
            raise UserError(f"data: label(s) {', '.join(map(repr, unseen[:5]))} appear in the {name} split but "
                            "never in train; add training examples or remove them from the source")


def split_stats(df: pd.DataFrame) -> dict:
    counts = pd.Series([x for ls in df["labels"] for x in ls], dtype=object).value_counts().sort_index()
    sizes = df["labels"].map(len)
    return {
        "rows": len(df),
        "label_counts": {str(k): int(v) for k, v in counts.items()},
        "label_cardinality": round(float(sizes.mean()), 4) if len(df) else 0.0,  # mean labels per text
        "no_label_rows": int((sizes == 0).sum()),
        "chars": describe(df["text"].str.len()),
        "words": describe(df["text"].str.split().str.len()),
    }


def records(df: pd.DataFrame):
    """A split's rows as the lines its content hash is taken over."""
    return (f"{'|'.join(ls)}\t{text}\n" for text, ls in zip(df["text"], df["labels"], strict=True))


def prepare(p: Params) -> Prepared:
    d = p.data
    names = read_label_names(d.label_names, d.encoding) if d.label_names else None
    raw = load_source(d.source, d.encoding, d.header)
    drops = {"empty_text": 0, "missing_label": 0, "conflicting_label": 0, "duplicate": 0}
    if "all" in raw:
        df, drops = clean(label_frame(raw["all"], d, names, d.source))
        splits = stratified_split(df, d.validation_size, d.test_size, d.seed)
        drops["cross_split_duplicate"] = 0
    else:
        splits = {}
        for name, frame in raw.items():
            splits[name], dr = clean(label_frame(frame, d, names, f"{d.source} ({name})"))
            drops = {k: drops[k] + dr[k] for k in drops}
            if splits[name].empty and name != "train":
                del splits[name]
                print(f"prepare: the {name} split of {d.source} has no labelled rows; carving {name} out of train",
                      file=sys.stderr, flush=True)
        splits = fill_missing_splits(
            splits, lambda train: stratified_split(train, d.validation_size, d.test_size, d.seed),
            lambda a, b: pd.concat([a, b]))
        splits, drops["cross_split_duplicate"] = remove_cross_split_overlap(splits)
    before_cap = len(splits["train"])
    splits["train"] = cap_train(splits["train"], d.max_train_samples, d.seed)
    check_labels_seen(splits)
    splits = {k: splits[k].reset_index(drop=True) for k in SPLITS}
    hashes = {k: content_hash(records(v)) for k, v in splits.items()}
    report = {
        "source": d.source,
        "labels": sorted({x for ls in splits["train"]["labels"] for x in ls}),
        "drops": drops,
        "train_capped_from": before_cap if before_cap != len(splits["train"]) else None,
        "splits": {k: split_stats(v) for k, v in splits.items()},
        "hashes": hashes,
        "data_hash": data_hash(hashes),
    }
    return Prepared(splits, report, write_splits)


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    for name, df in splits.items():
        df.assign(labels=df["labels"].map(list)).to_parquet(out_dir / f"{name}.parquet", index=False)
