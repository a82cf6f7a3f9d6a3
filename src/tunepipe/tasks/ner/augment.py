"""NER augment: new train sentences whose tags stay aligned with their words (entity_swap, token_mask)."""

from __future__ import annotations

import datasets
import numpy as np

from tunepipe.errors import UserError
from tunepipe.params import Params
from tunepipe.tasks.ner.encode import tokenize_words, tokenizer_for, word_features
from tunepipe.tasks.ner.scheme import entity_spans, mention_tags, scheme_of


def swap_entities(tokens: list[str], tags: list[str], bank: dict[str, list[tuple[str, ...]]], prob: float,
                  scheme: str, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Each mention is replaced, with probability `prob` (at least one), by another train mention of its type."""
    spans = entity_spans(tags)
    hit = rng.random(len(spans)) < prob
    if not hit.any():
        hit[rng.integers(len(spans))] = True
    out_tok, out_tag, pos = [], [], 0
    for (kind, start, end), swap in zip(spans, hit, strict=True):
        out_tok += tokens[pos:start]
        out_tag += tags[pos:start]
        mention = tuple(tokens[start:end])
        if swap:
            others = [m for m in bank[kind] if m != mention] or bank[kind]
            mention = others[rng.integers(len(others))]
        out_tok += list(mention)
        out_tag += mention_tags(kind, len(mention), scheme)
        pos = end
    return out_tok + tokens[pos:], out_tag + tags[pos:]


def mask_outside(tokens: list[str], tags: list[str], prob: float, mask: str, rng: np.random.Generator
                 ) -> tuple[list[str], list[str]]:
    """Words tagged O become the mask token with probability `prob` (at least one); entity words stay."""
    outside = [i for i, t in enumerate(tags) if t == "O"]
    hit = set(np.asarray(outside)[rng.random(len(outside)) < prob].tolist())
    if not hit:
        hit = {outside[rng.integers(len(outside))]}
    return [mask if i in hit else t for i, t in enumerate(tokens)], list(tags)


def augment(train: datasets.Dataset, p: Params) -> datasets.Dataset:
    """Train plus round(ratio * len) augmented sentences whose tags stay aligned with their words."""
    a = p.augment
    if a.method in ("random_deletion", "span_cutoff"):
        raise UserError(f"augment.method: {a.method} is not available for task: ner (it would cut entities apart); "
                        "use entity_swap, token_mask or none")
    n_new = round(a.ratio * len(train))
    if a.method == "none" or n_new == 0:
        return train
    labels = train.features["tags"].feature.names
    scheme = scheme_of(labels)
    tokenizer = tokenizer_for(p, labels)
    words = [list(t) for t in train["tokens"]]
    tags = [[labels[i] for i in row] for row in train["tags"]]
    rng = np.random.default_rng(a.seed)
    if a.method == "entity_swap":
        bank: dict[str, list[tuple[str, ...]]] = {}
        for toks, tg in zip(words, tags, strict=True):
            for kind, s, e in entity_spans(tg):
                bank.setdefault(kind, []).append(tuple(toks[s:e]))
        bank = {k: sorted(set(v)) for k, v in bank.items()}
        pool = [i for i, tg in enumerate(tags) if entity_spans(tg)]
        make = lambda i: swap_entities(words[i], tags[i], bank, a.probability, scheme, rng)  # noqa: E731
    elif a.method == "token_mask":
        if tokenizer.mask_token is None:
            raise UserError(f"augment.method: token_mask needs a mask token and '{p.model.name}' has none; "
                            "use entity_swap")
        pool = [i for i, tg in enumerate(tags) if "O" in tg]
        make = lambda i: mask_outside(words[i], tags[i], a.probability, tokenizer.mask_token, rng)  # noqa: E731
    else:
        raise UserError(f"augment.method: {a.method} is not available for task: ner; use entity_swap, token_mask "
                        "or none")
    if not pool:
        return train
    picked = rng.choice(pool, size=n_new, replace=n_new > len(pool))
    new_tokens, new_tags = zip(*(make(int(i)) for i in picked), strict=True)
    added = datasets.Dataset.from_dict({"tokens": list(new_tokens), "tags": list(new_tags)},
                                       features=word_features(labels))
    added = tokenize_words(added, tokenizer, p.tokenize.max_length, p.tokenize.label_all_subtokens)
    added = added.remove_columns(["words_cut", "words_empty"]).cast(train.features)
    return datasets.concatenate_datasets([train, added])
