"""Classification augment: label-preserving edits of token ids (after tokenize), so tokenizer-agnostic and cheap:
- token_mask: each non-special token becomes the mask token with probability p;
- random_deletion: each non-special token is dropped with probability p (at least one is kept);
- span_cutoff: one contiguous span of ~p of the tokens is removed.
"""

from __future__ import annotations

import datasets
import numpy as np

from tunepipe.errors import UserError
from tunepipe.modeling import load_tokenizer
from tunepipe.params import AugmentParams, Params

METHODS = ("none", "token_mask", "random_deletion", "span_cutoff")


def augment_ids(ids: list[int], method: str, p: float, rng: np.random.Generator, special: set[int],
                mask_id: int | None) -> list[int]:
    """One augmented copy of a token-id sequence; special tokens ([CLS], [SEP]) stay where they are."""
    body = [i for i, t in enumerate(ids) if t not in special]
    if not body:
        return list(ids)
    if method == "token_mask":
        hit = rng.random(len(body)) < p
        out = list(ids)
        for pos, h in zip(body, hit, strict=True):
            if h:
                out[pos] = mask_id
        return out
    if method == "random_deletion":
        drop = set(np.asarray(body)[rng.random(len(body)) < p].tolist())
        if len(drop) == len(body):
            drop.discard(body[int(rng.integers(len(body)))])
        return [t for i, t in enumerate(ids) if i not in drop]
    if method == "span_cutoff":
        span = max(1, round(p * len(body)))
        if span >= len(body):
            span = len(body) - 1
        if span <= 0:
            return list(ids)
        start = int(rng.integers(0, len(body) - span + 1))
        cut = set(body[start:start + span])
        return [t for i, t in enumerate(ids) if i not in cut]
    raise ValueError(f"unknown augmentation method {method}")


def augment_train(train: datasets.Dataset, a: AugmentParams, special: set[int], mask_id: int | None
                  ) -> datasets.Dataset:
    """Train plus round(ratio * len) augmented copies of randomly chosen examples, same labels."""
    n_new = round(a.ratio * len(train))
    if a.method == "none" or n_new == 0:
        return train
    rng = np.random.default_rng(a.seed)
    sources = rng.choice(len(train), size=n_new, replace=n_new > len(train))
    picked = train.select(sources.tolist())
    rows = {"input_ids": [augment_ids(ids, a.method, a.probability, rng, special, mask_id)
                          for ids in picked["input_ids"]]}
    for col in picked.column_names:
        if col == "input_ids":
            continue
        if col in ("attention_mask", "token_type_ids"):
            fill = 1 if col == "attention_mask" else 0
            rows[col] = [[fill] * len(ids) for ids in rows["input_ids"]]
        elif col == "length":
            rows[col] = [len(ids) for ids in rows["input_ids"]]
        else:
            rows[col] = picked[col]
    added = datasets.Dataset.from_dict(rows, features=train.features)
    return datasets.concatenate_datasets([train, added])


def augment(train: datasets.Dataset, p: Params) -> datasets.Dataset:
    if p.augment.method not in METHODS:
        raise UserError(f"augment.method: {p.augment.method} is not available for task: classification; use "
                        f"{', '.join(METHODS)}")
    tokenizer = load_tokenizer(p.model.name)
    if p.augment.method == "token_mask" and tokenizer.mask_token_id is None:
        raise UserError(f"augment.method: token_mask needs a mask token and '{p.model.name}' has none; "
                        "use random_deletion or span_cutoff")
    return augment_train(train, p.augment, set(tokenizer.all_special_ids), tokenizer.mask_token_id)
