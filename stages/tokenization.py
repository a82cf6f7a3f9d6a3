"""Stage tokenize: the model's fast tokenizer over each split (batched datasets.map), no padding.

Run as `python -m stages.tokenization` (never as a script: a top-level tokenize.py would shadow the stdlib's).
"""

from __future__ import annotations

import datasets
import pandas as pd

from tunepipe.errors import run_main
from tunepipe.files import atomic_dir, read_json, write_json
from tunepipe.modeling import load_tokenizer
from tunepipe.params import load_params
from tunepipe.paths import PREPARED, TOKENIZE_REPORT, TOKENIZED
from tunepipe.progress import Progress, say


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


def truncation_stats(ds: datasets.Dataset, max_length: int) -> dict:
    n = ds["n_tokens"]
    cut = sum(1 for x in n if x > max_length)
    return {"examples": len(n), "truncated": cut, "truncation_rate": round(cut / max(len(n), 1), 4),
            "mean_tokens": round(sum(min(x, max_length) for x in n) / max(len(n), 1), 2)}


def main() -> None:
    datasets.disable_progress_bars()  # per-batch bars drown the stage's one-line summary in DVC's log
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    if p.task == "ner":
        from tunepipe.ner_data import tokenize_ner

        dsd, report = tokenize_ner(p, PREPARED)
    else:
        meta = read_json(PREPARED / "meta.json")
        label2id = {lab: i for i, lab in enumerate(meta["labels"])}
        tokenizer = load_tokenizer(p.model.name)
        frames = {split: pd.read_parquet(PREPARED / f"{split}.parquet") for split in ("train", "validation", "test")}
        with Progress("tokenize", sum(map(len, frames.values())), "texts") as bar:
            dsd = datasets.DatasetDict({
                split: tokenize_split(datasets.Dataset.from_pandas(df), tokenizer, p.tokenize.max_length, label2id,
                                      bar)
                for split, df in frames.items()
            })
        report = {"max_length": p.tokenize.max_length,
                  "splits": {k: truncation_stats(v, p.tokenize.max_length) for k, v in dsd.items()}}
        dsd = dsd.remove_columns("n_tokens")
    with atomic_dir(TOKENIZED) as tmp:
        dsd.save_to_disk(str(tmp))
    write_json(TOKENIZE_REPORT, report)
    rates = ", ".join(f"{k}={v['truncation_rate']:.2%}" for k, v in report["splits"].items())
    say(f"tokenize: max_length={p.tokenize.max_length}, truncated {rates}")


if __name__ == "__main__":
    run_main(main)
