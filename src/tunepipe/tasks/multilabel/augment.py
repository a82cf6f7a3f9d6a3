"""Multi-label augment: classification's label-preserving edits of token ids (token_mask, random_deletion,
span_cutoff) applied to the train texts; each copy keeps its text's label set."""

from __future__ import annotations

import datasets

from tunepipe.errors import UserError
from tunepipe.modeling import load_tokenizer
from tunepipe.params import Params
from tunepipe.tasks.classification.augment import METHODS, augment_train


def augment(train: datasets.Dataset, p: Params) -> datasets.Dataset:
    if p.augment.method not in METHODS:
        raise UserError(f"augment.method: {p.augment.method} is not available for task: multilabel; use "
                        f"{', '.join(METHODS)}")
    tokenizer = load_tokenizer(p.model.name)
    if p.augment.method == "token_mask" and tokenizer.mask_token_id is None:
        raise UserError(f"augment.method: token_mask needs a mask token and '{p.model.name}' has none; "
                        "use random_deletion or span_cutoff")
    return augment_train(train, p.augment, set(tokenizer.all_special_ids), tokenizer.mask_token_id)
