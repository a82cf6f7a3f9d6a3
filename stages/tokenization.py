"""Stage tokenize: the model's fast tokenizer over each prepared split (the task's encoding), no padding; writes
data/tokenized and reports/tokenize.json.

The module is not named tokenize.py: that is a standard-library module."""

from __future__ import annotations

import sys

import datasets

from tunepipe.errors import run_main
from tunepipe.files import atomic_dir, write_json
from tunepipe.modeling import untracked_model
from tunepipe.params import load_params
from tunepipe.paths import PREPARED, TOKENIZE_REPORT, TOKENIZED
from tunepipe.progress import say
from tunepipe.tasks import get_task


def main() -> None:
    datasets.disable_progress_bars()  # per-batch bars drown the stage's one-line summary in DVC's log
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    warning = untracked_model(p.model.name)  # dvc.yaml holds model.name, not the directory's files
    if warning:
        print(warning, file=sys.stderr, flush=True)
    dsd, report = get_task(p.task).tokenize(p, PREPARED)
    with atomic_dir(TOKENIZED) as tmp:
        dsd.save_to_disk(str(tmp))
    write_json(TOKENIZE_REPORT, report)
    splits = report["splits"].items()
    if any("windows" in v for _, v in splits):  # tokenize.long_text: window
        over = ", ".join(f"{k}={v['over_max_length_rate']:.2%} ({v['examples']} texts -> {v['windows']} windows)"
                         for k, v in splits)
        say(f"tokenize: max_length={p.tokenize.max_length}, windows with stride {p.tokenize.stride}; over max_length "
            f"{over}")
        return
    rates = ", ".join(f"{k}={v['truncation_rate']:.2%}" for k, v in splits)
    say(f"tokenize: max_length={p.tokenize.max_length}, truncated {rates}")


if __name__ == "__main__":
    run_main(main)
