"""Robustness: seeded, label-preserving word-level perturbations of the test split, and the report evaluate
writes from the task's headline metric on each perturbed copy.

A perturbation works on one example's words and returns the surviving words with their original index, so a
task with a label per word (NER) keeps its tags aligned: every word stays one word (char noise never empties or
splits one), and words marked `labelled` (entity words) are never dropped and are left alone by context_noise.

  char_noise     per word, at robustness.char_rate: swap two adjacent letters, drop a letter, or type a QWERTY
                 keyboard neighbour instead of one
  word_dropout   drop words at robustness.word_rate (never a labelled word; an example keeps at least one)
  lower, upper   the whole text in lower / upper case
  context_noise  char noise and word dropout on the unlabelled (O) words only (tasks with word labels: NER)
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tunepipe.errors import UserError
from tunepipe.params import RobustnessParams

if TYPE_CHECKING:
    import pandas as pd

    from tunepipe.tasks import Task

# (original index, word) of each word that survives, in order.
Perturbed = list[tuple[int, str]]
Perturb = Callable[[Sequence[str], Sequence[bool] | None], Perturbed]

# Perturbations that need a label per word; only a task listing them in Task.extra_perturbations runs them.
WORD_LABEL_PERTURBATIONS = ("context_noise",)
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Each letter's neighbours on a QWERTY keyboard: left/right on its row, and the two keys touching it on the
    rows above and below (each row sits half a key to the right of the one above)."""
    out = {}
    for r, row in enumerate(_ROWS):
        for i, key in enumerate(row):
            near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
            if r > 0:
                near += [_ROWS[r - 1][j] for j in (i, i + 1) if j < len(_ROWS[r - 1])]
            if r + 1 < len(_ROWS):
                near += [_ROWS[r + 1][j] for j in (i - 1, i) if 0 <= j < len(_ROWS[r + 1])]
            out[key] = "".join(near)
    return out


NEIGHBOURS = _keyboard_neighbours()


def typo(word: str, rng: random.Random) -> str:
    """One typing error in `word` (the word always changes where an edit is possible; a word without letters
    stays as it is): swap two adjacent, different letters, drop a letter (words of 2+ characters only, so a word
    never vanishes), or replace an ASCII letter with a keyboard neighbour (case kept)."""
    swaps = [i for i in range(len(word) - 1) if word[i].isalpha() and word[i + 1].isalpha() and word[i] != word[i + 1]]
    drops = [i for i, c in enumerate(word) if c.isalpha()] if len(word) > 1 else []
    keys = [i for i, c in enumerate(word) if c.lower() in NEIGHBOURS]
    edits = [e for e, places in (("swap", swaps), ("drop", drops), ("key", keys)) if places]
    if not edits:
        return word
    edit = rng.choice(edits)
    if edit == "swap":
        i = rng.choice(swaps)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == "drop":
        i = rng.choice(drops)
        return word[:i] + word[i + 1:]
    i = rng.choice(keys)
    new = rng.choice(NEIGHBOURS[word[i].lower()])
    return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1:]


def perturber(name: str, s: RobustnessParams) -> Perturb:
    """The perturbation `name` as a function of one example's words (and which of them carry a label; None = a
    text whose label is the whole text). Seeded by robustness.seed and the name (one perturbation's output does
    not depend on which others run); call it over a split in order: the same seed gives the same copy."""
    rng = random.Random(f"{s.seed}:{name}")

    def noisy(word: str, touch: bool) -> str:
        return typo(word, rng) if touch and rng.random() < s.char_rate else word

    def dropout(words: Sequence[str], labelled: Sequence[bool] | None) -> Perturbed:
        keep = [(i, w) for i, w in enumerate(words)
                if (labelled is not None and labelled[i]) or rng.random() >= s.word_rate]
        if not keep and words:  # an example keeps one word
            i = rng.randrange(len(words))
            keep = [(i, words[i])]
        return keep

    def char_noise(words, labelled):
        return [(i, noisy(w, True)) for i, w in enumerate(words)]

    def word_dropout(words, labelled):
        return dropout(words, labelled)

    def lower(words, labelled):
        return [(i, w.lower()) for i, w in enumerate(words)]

    def upper(words, labelled):
        return [(i, w.upper()) for i, w in enumerate(words)]

    def context_noise(words, labelled):
        if labelled is None:
            raise UserError("robustness.perturbations: context_noise needs word labels (task: ner); remove it")
        kept = dropout(words, labelled)
        return [(i, w if labelled[i] else noisy(w, True)) for i, w in kept]

    funcs = {"char_noise": char_noise, "word_dropout": word_dropout, "lower": lower, "upper": upper,
             "context_noise": context_noise}
    return funcs[name]


def perturb_text(text: str, perturb: Perturb) -> str:
    """A text perturbed word by word; the whitespace after each surviving word is the original's."""
    pieces = re.findall(r"(\S+)(\s*)", text)  # (word, the whitespace after it)
    if not pieces:
        return text
    kept = perturb([w for w, _ in pieces], None)
    out = text[:len(text) - len(text.lstrip())] + "".join(w + pieces[i][1] for i, w in kept)
    return out if kept[-1][0] == len(pieces) - 1 else out.rstrip() + pieces[-1][1]


def selected(s: RobustnessParams, task: Task) -> list[str]:
    """The perturbations to run: robustness.perturbations plus the ones the task adds (NER: context_noise); none
    when the list is empty (the report is off)."""
    if not s.perturbations:
        return []
    names = [*s.perturbations, *(x for x in task.extra_perturbations if x not in s.perturbations)]
    for name in names:
        if name in WORD_LABEL_PERTURBATIONS and name not in task.extra_perturbations:
            raise UserError(f"robustness.perturbations: {name} needs word labels, which task {task.name} has not "
                            "(ner adds it by itself); remove it")
    return names


def robustness(task: Task, s: RobustnessParams, model, tokenizer, test: pd.DataFrame, info: dict, clean: float
               ) -> tuple[dict, list[dict]]:
    """The task's headline metric on a perturbed copy of the prepared test split per perturbation: the
    metrics.json keys (robustness.<name>.<headline> and .drop, robust_<headline> = their mean, robust_drop =
    clean - that mean) and the plot rows (clean first). Nothing when robustness.perturbations is empty."""
    names = selected(s, task)
    if not names:
        return {}, []
    m = task.headline_metric
    scores = {name: float(task.robust_score(model, tokenizer, test, perturber(name, s), info)) for name in names}
    robust = sum(scores.values()) / len(scores)
    metrics = {"robustness": {name: {m: v, "drop": clean - v} for name, v in scores.items()},
               f"robust_{m}": robust, "robust_drop": clean - robust}
    rows = [{"perturbation": "clean", "metric": round(clean, 6), "drop": 0.0},
            *({"perturbation": name, "metric": round(v, 6), "drop": round(clean - v, 6)} for name, v in scores.items())]
    return metrics, rows
