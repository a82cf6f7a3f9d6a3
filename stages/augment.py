"""Stage augment: label-preserving augmentation of the train split only (the task's methods); validation and
test pass through. Writes data/augmented and reports/augment.json."""

from __future__ import annotations

import datasets

from tunepipe.errors import run_main
from tunepipe.files import atomic_dir, write_json
from tunepipe.params import load_params
from tunepipe.paths import AUGMENT_REPORT, AUGMENTED, TOKENIZED
from tunepipe.progress import say
from tunepipe.tasks import get_task


def main() -> None:
    datasets.disable_progress_bars()  # per-batch bars drown the stage's one-line summary in DVC's log
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    dsd = datasets.load_from_disk(str(TOKENIZED))
    train = get_task(p.task).augment(dsd["train"], p)
    out = datasets.DatasetDict({"train": train, "validation": dsd["validation"], "test": dsd["test"]})
    with atomic_dir(AUGMENTED) as tmp:
        out.save_to_disk(str(tmp))
    report = {"method": p.augment.method, "ratio": p.augment.ratio, "train_before": len(dsd["train"]),
              "added": len(train) - len(dsd["train"]), "train_after": len(train)}
    write_json(AUGMENT_REPORT, report)
    say(f"augment: {report['method']} added {report['added']} train examples ({report['train_after']} total)")


if __name__ == "__main__":
    run_main(main)
