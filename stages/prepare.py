"""Stage prepare: load data.source, clean it, split it, write data/prepared and reports/data.json."""

from __future__ import annotations

import pandas as pd

from tunepipe import data
from tunepipe.errors import run_main
from tunepipe.files import atomic_dir, write_json
from tunepipe.params import Params, load_params
from tunepipe.paths import DATA_REPORT, PREPARED
from tunepipe.progress import say


def prepare_classification(p: Params) -> tuple[dict[str, pd.DataFrame], dict]:
    """Plain frames in, clean stratified splits and a data report out."""
    raw = data.load_source(p.data.source, p.data.encoding)
    drops = {"empty_text": 0, "missing_label": 0, "conflicting_label": 0, "duplicate": 0}
    where = p.data.source
    if "all" in raw:
        df, drops = data.clean(data.select_columns(raw["all"], p.data.text_column, p.data.label_column, where))
        splits = data.stratified_split(df, p.data.validation_size, p.data.test_size, p.data.seed)
        drops["cross_split_duplicate"] = 0
    else:
        splits = {}
        for name, frame in raw.items():
            splits[name], d = data.clean(data.select_columns(frame, p.data.text_column, p.data.label_column,
                                                             f"{where} ({name})"))
            drops = {k: drops[k] + d[k] for k in drops}
        if "test" not in splits or "validation" not in splits:
            # Carve what the source lacks out of its train split, stratified.
            missing = [s for s in ("validation", "test") if s not in splits]
            carved = data.stratified_split(splits["train"], p.data.validation_size, p.data.test_size, p.data.seed)
            splits["train"] = carved["train"] if len(missing) == 2 else pd.concat(
                [carved["train"], carved["validation" if missing == ["test"] else "test"]])
            for s in missing:
                splits[s] = carved[s]
        splits, drops["cross_split_duplicate"] = data.remove_cross_split_overlap(splits)
        data.check_classes(splits["train"], 1, "the train split")
    data.check_labels_seen(splits)
    before_cap = len(splits["train"])
    splits["train"] = data.cap_train(splits["train"], p.data.max_train_samples, p.data.seed)
    splits = {k: splits[k].reset_index(drop=True) for k in data.SPLITS}
    labels = sorted(splits["train"]["label"].unique())
    hashes = {k: data.content_hash(v) for k, v in splits.items()}
    report = {
        "source": p.data.source,
        "labels": labels,
        "drops": drops,
        "train_capped_from": before_cap if before_cap != len(splits["train"]) else None,
        "splits": {k: data.split_stats(v) for k, v in splits.items()},
        "hashes": hashes,
        "data_hash": data.content_hash(pd.concat([splits[k] for k in data.SPLITS])),
    }
    return splits, report


def main() -> None:
    p = load_params()
    if p.task == "ner":
        from tunepipe.ner_data import prepare_ner

        splits, report, writer = prepare_ner(p)
    else:
        splits, report = prepare_classification(p)
        writer = None
    with atomic_dir(PREPARED) as tmp:
        if writer is not None:
            writer(splits, tmp)
        else:
            for name, df in splits.items():
                df.to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / "meta.json", {"task": p.task, "labels": report["labels"], "hashes": report["hashes"],
                                       "data_hash": report["data_hash"]})
    write_json(DATA_REPORT, report)
    sizes = ", ".join(f"{k}={v['rows']}" for k, v in report["splits"].items())
    say(f"prepare: {sizes}; dropped {report['drops']}; labels {report['labels']}")


if __name__ == "__main__":
    run_main(main)
