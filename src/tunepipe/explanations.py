"""evaluate's reports/explanations.html: per label, the most confident right and wrong test predictions of that
label, each highlighted by its word attributions (serving/explain.py, the code the served model runs), so a
person can see what the model leans on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tunepipe.files import write_text
from tunepipe.params import ExplainParams
from tunepipe.serving.explain import Explainer, html_page
from tunepipe.tasks import Task

TITLE = "What the model leans on: most confident right and wrong test predictions"


@dataclass(frozen=True)
class Case:
    index: int  # row of the test split
    label: str  # the predicted label explained
    probability: float
    right: bool
    gold: list[str]


def select_cases(probs: np.ndarray, predicted: np.ndarray, gold: np.ndarray, labels: list[str], k: int
                 ) -> list[Case]:
    """Per label: the k test texts predicted to have it with the highest probability that do have it (right),
    then the k such texts that do not (wrong)."""
    cases = []
    for j, label in enumerate(labels):
        for right in (True, False):
            rows = np.flatnonzero(predicted[:, j] & (gold[:, j] == right))
            top = rows[np.argsort(-probs[rows, j], kind="stable")][:k]
            cases += [Case(int(i), label, float(probs[i, j]), right,
                           [labels[g] for g in np.flatnonzero(gold[i])]) for i in top]
    return cases


def write_explanations(s: ExplainParams, task: Task, info: dict, logits: np.ndarray, gold: np.ndarray,
                       test_split: Path, model_dir: Path, out: Path) -> int:
    """Writes `out` (a page saying why where there is nothing to show); returns how many texts it explains.
    logits, gold: one row per text of the prepared test split (`test_split`, whose texts are explained)."""
    if not task.explainable or s.examples_per_class == 0:
        why = (f"explanations are not available for {task.name} models" if not task.explainable
               else "explain.examples_per_class is 0")
        write_text(out, html_page(TITLE, [], intro=f"Nothing to show: {why}."))
        return 0
    texts = pd.read_parquet(test_split, columns=["text"])["text"].tolist()
    if len(texts) != len(logits):
        raise ValueError(f"explanations: {len(texts)} test texts but {len(logits)} predictions")
    labels = info["labels"]
    cases = select_cases(*task.decisions(logits, gold, info), labels, s.examples_per_class)
    results = Explainer(model_dir, n_steps=s.n_steps, max_length=info.get("max_length")).explain(
        [texts[c.index] for c in cases], [c.label for c in cases])
    sections: dict[str, list[dict]] = {}
    for c, res in zip(cases, results, strict=True):
        kind = "right" if c.right else "wrong"
        caption = (f"{kind}: test text {c.index}, predicted {c.label} (p={c.probability:.3f}), gold "
                   f"{', '.join(c.gold) or '(none)'}")
        sections.setdefault(f"{c.label}: most confident {kind}", []).append(
            {"text": texts[c.index], "caption": caption, **res})
    order = [f"{lab}: most confident {kind}" for lab in labels for kind in ("right", "wrong")]
    write_text(out, html_page(TITLE, [(h, sections.get(h, [])) for h in order], intro=(
        f"Per label, the {s.examples_per_class} test texts predicted to have it with the highest probability that "
        f"do (right) and that do not (wrong). Word weights: integrated gradients of the predicted label's logit "
        f"({s.n_steps} steps, baseline: pad tokens).")))
    return len(cases)
