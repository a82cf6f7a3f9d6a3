"""Classification tokenize: the model's fast tokenizer over each split (batched datasets.map), no padding."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd

from tunepipe.data import SPLITS, truncation_stats
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.modeling import load_tokenizer
from tunepipe.params import Params
from tunepipe.progress import Progress


def tokenize_split(ds: datasets.Dataset, tokenizer, max_length: int, label2id: dict[str, int],
                   bar: Progress | None = None, stride: int | None = None) -> datasets.Dataset:
    """One row per text (truncated at max_length); with `stride`, one row per window of a text (consecutive
    windows share `stride` tokens), each with the text's label and its index in the split as `text_id`."""

    def encode(batch, indices):
        windows = {} if stride is None else {"return_overflowing_tokens": True, "stride": stride}
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, **windows)
        # Untruncated length, to report how much truncation cuts.
        full = [len(ids) for ids in tokenizer(batch["text"], truncation=False)["input_ids"]]
        rows = enc.pop("overflow_to_sample_mapping") if stride is not None else range(len(batch["text"]))
        enc = dict(enc)
        enc["n_tokens"] = [full[r] for r in rows]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]  # for length-grouped batches
        enc["labels"] = [label2id[batch["label"][r]] for r in rows]
        if stride is not None:
            enc["text_id"] = [indices[r] for r in rows]
        if bar is not None:
            bar.update(len(batch["text"]))
        return enc

    return ds.map(encode, batched=True, batch_size=1000, with_indices=True, remove_columns=ds.column_names,
                  desc="tokenize")


def window_stride(p: Params, tokenizer) -> int | None:
    """tokenize.stride when tokenize.long_text is window (checked against the room a window has), else None."""
    if p.tokenize.long_text != "window":
        return None
    room = p.tokenize.max_length - tokenizer.num_special_tokens_to_add()
    if p.tokenize.stride >= room:
        raise UserError(f"tokenize.stride: {p.tokenize.stride} leaves windows no room to move: a window holds "
                        f"{room} text tokens (tokenize.max_length {p.tokenize.max_length} less "
                        f"{tokenizer.num_special_tokens_to_add()} special tokens); set tokenize.stride below {room}")
    return p.tokenize.stride


def split_report(ds: datasets.Dataset, max_length: int, windows: bool) -> dict:
    """Truncation figures per text; with windows, how many texts exceed max_length and how many windows they made
    (nothing is cut then)."""
    if not windows:
        return truncation_stats([n > max_length for n in ds["n_tokens"]], ds["length"])
    first = pd.Series(ds["text_id"]).drop_duplicates().index
    over = [ds["n_tokens"][i] > max_length for i in first]
    return {**truncation_stats([False] * len(first), ds["length"]), "examples": len(first),
            "over_max_length": sum(over), "over_max_length_rate": round(sum(over) / max(len(first), 1), 4),
            "windows": len(ds)}


def tokenize(p: Params, prepared: Path) -> tuple[datasets.DatasetDict, dict]:
    label2id = {lab: i for i, lab in enumerate(read_json(prepared / "meta.json")["labels"])}
    tokenizer = load_tokenizer(p.model.name, p.tokenize.max_length)
    stride = window_stride(p, tokenizer)
    frames = {split: pd.read_parquet(prepared / f"{split}.parquet") for split in SPLITS}
    with Progress("tokenize", sum(map(len, frames.values())), "texts") as bar:
        dsd = datasets.DatasetDict({
            split: tokenize_split(datasets.Dataset.from_pandas(df), tokenizer, p.tokenize.max_length, label2id, bar,
                                  stride)
            for split, df in frames.items()
        })
    m = p.tokenize.max_length
    report = {"max_length": m, "long_text": p.tokenize.long_text,
              **({"stride": stride, "window_aggregation": p.tokenize.window_aggregation} if stride is not None else {}),
              "splits": {k: split_report(v, m, stride is not None) for k, v in dsd.items()}}
    return dsd.remove_columns("n_tokens"), report
