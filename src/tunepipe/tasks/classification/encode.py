"""Classification tokenize: the model's fast tokenizer over each split (batched datasets.map), no padding."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd

from tunepipe.data import SPLITS, truncation_stats
from tunepipe.files import read_json
from tunepipe.modeling import load_tokenizer
from tunepipe.params import Params
from tunepipe.progress import Progress


def tokenize_split(ds: datasets.Dataset, tokenizer, max_length: int, label2id: dict[str, int],
                   bar: Progress | None = None) -> datasets.Dataset:
    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        # Untruncated length, to report how much truncation cuts.
        full = tokenizer(batch["text"], truncation=False)["input_ids"]
        enc["n_tokens"] = [len(ids) for ids in full]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]  # for length-grouped batches
        enc["labels"] = [label2id[lab] for lab in batch["label"]]
        if bar is not None:
            bar.update(len(batch["text"]))
        return enc

    return ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenize")


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
