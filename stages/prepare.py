"""Stage prepare: load data.source, clean it, split it (the task's way); write data/prepared and reports/data.json."""

from __future__ import annotations

import sys

from tunepipe.data import untracked_source
from tunepipe.errors import run_main
from tunepipe.files import atomic_dir, write_json
from tunepipe.params import check_label_descriptions, load_params
from tunepipe.paths import DATA_REPORT, PREPARED
from tunepipe.progress import say
from tunepipe.tasks import get_task


def main() -> None:
    p = load_params()
    # dvc.yaml can only declare data/raw (a source may be hf: or builtin:), so say when a change will go unseen.
    warning = untracked_source(p.data.source)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    prepared = get_task(p.task).prepare(p)
    report = prepared.report
    check_label_descriptions(p.data.label_descriptions, report["labels"])  # now, not after training
    with atomic_dir(PREPARED) as tmp:
        prepared.write(prepared.splits, tmp)
        write_json(tmp / "meta.json", {"task": p.task, "labels": report["labels"], "hashes": report["hashes"],
                                       "data_hash": report["data_hash"]})
    write_json(DATA_REPORT, report)
    sizes = ", ".join(f"{k}={v['rows']}" for k, v in report["splits"].items())
    ratio = report.get("imbalance_ratio")
    say(f"prepare: {sizes}; dropped {report['drops']}; labels {report['labels']}"
        + (f"; imbalance {ratio:g}:1 (largest/smallest train class)" if ratio else ""))


if __name__ == "__main__":
    run_main(main)
