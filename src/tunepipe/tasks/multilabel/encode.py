"""Multi-label tokenize: the model's fast tokenizer over each split (batched datasets.map), no padding; labels as
one float 0/1 vector per text (what binary cross-entropy takes)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd

from tunepipe.data import SPLITS, truncation_stats
from tunepipe.files import read_json
from tunepipe.modeling import load_tokenizer
from tunepipe.params import Params
from tunepipe.progress import Progress


def multi_hot(label_sets, label2id: dict[str, int]) -> list[list[float]]:
    out = []
    for ls in label_sets:
        row = [0.0] * len(label2id)
        for lab in ls:
            row[label2id[lab]] = 1.0
        out.append(row)
    return out


def tokenize_split(ds: datasets.Dataset, tokenizer, max_length: int, label2id: dict[str, int],
                   bar: Progress | None = None) -> datasets.Dataset:
    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        full = tokenizer(batch["text"], truncation=False)["input_ids"]  # untruncated, to report truncation
        enc["n_tokens"] = [len(ids) for ids in full]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]  # for length-grouped batches
        enc["labels"] = multi_hot(batch["labels"], label2id)
        if bar is not None:
            bar.update(len(batch["text"]))
        return enc

    out = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenize")
    if "labels" in out.features:  # float32 vectors (not float64): the model's logits are float32
        features = out.features.copy()
        features["labels"] = datasets.Sequence(datasets.Value("float32"))
        out = out.cast(features)
    return out


def tokenize(p: Params, prepared: Path) -> tuple[datasets.DatasetDict, dict]:
    label2id = {lab: i for i, lab in enumerate(read_json(prepared / "meta.json")["labels"])}
    tokenizer = load_tokenizer(p.model.name, p.tokenize.max_length)
    frames = {split: pd.read_parquet(prepared / f"{split}.parquet") for split in SPLITS}
    with Progress("tokenize", sum(map(len, frames.values())), "texts") as bar:
        dsd = datasets.DatasetDict({
            split: tokenize_split(datasets.Dataset.from_pandas(df), tokenizer, p.tokenize.max_length, label2id, bar)
            for split, df in frames.items()
        })
    m = p.tokenize.max_length
    report = {"max_length": m, "splits": {k: truncation_stats([n > m for n in v["n_tokens"]], v["length"])
                                          for k, v in dsd.items()}}
    return dsd.remove_columns("n_tokens"), report
