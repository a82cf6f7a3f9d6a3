"""The zero-shot baseline evaluate reports beside the fine-tuned model: no labels, each test text given the label
whose description is nearest (embedding: cosine of sentence embeddings of model.name's pretrained encoder) or most
entailed (nli: transformers' zero-shot-classification pipeline). The task scores it with its own metrics, so the
gap to the fine-tuned model is what fine-tuning buys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunepipe.embeddings import SentenceEncoder
from tunepipe.errors import UserError
from tunepipe.params import check_label_descriptions

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from tunepipe.params import Params
    from tunepipe.tasks import Task


def label_texts(descriptions: dict[str, str] | None, labels: list[str]) -> list[str]:
    """What stands for each label: its description where given, else its name."""
    check_label_descriptions(descriptions, labels)
    return [(descriptions or {}).get(label, label) for label in labels]


def embedding_scores(model_name: str, texts: list[str], label_sentences: list[str], batch_size: int = 64
                     ) -> np.ndarray:
    """(n_texts, n_labels) cosine similarities."""
    enc = SentenceEncoder(model_name, batch_size=batch_size)
    return enc.encode(texts) @ enc.encode(label_sentences).T


def nli_scores(model_name: str, texts: list[str], label_sentences: list[str], template: str, multi_label: bool,
               batch_size: int = 64) -> np.ndarray:
    """(n_texts, n_labels) entailment scores from transformers' zero-shot-classification pipeline (a hub NLI
    model; not available offline)."""
    import numpy as np
    from transformers import pipeline

    try:
        clf = pipeline("zero-shot-classification", model=model_name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"evaluate.zero_shot.model: could not load NLI model {model_name!r}: "
                        f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    index = {s: i for i, s in enumerate(label_sentences)}
    out = np.zeros((len(texts), len(label_sentences)), dtype=np.float32)
    results = clf(texts, candidate_labels=label_sentences, hypothesis_template=template, multi_label=multi_label,
                  batch_size=batch_size)
    for row, res in enumerate(results if isinstance(results, list) else [results]):
        for lab, score in zip(res["labels"], res["scores"], strict=True):
            out[row, index[lab]] = score
    return out


def zero_shot(p: Params, task: Task, labels: list[str], test: pd.DataFrame) -> dict:
    """reports/zero_shot.json: the method, the model, what stood for each label, and the task's metrics (or why
    there are none: evaluate.zero_shot.method none, or a task without a zero-shot form)."""
    import time

    zs = p.evaluate.zero_shot
    report: dict = {"method": zs.method}
    if zs.method == "none":
        return {**report, "skipped": "evaluate.zero_shot.method is none"}
    if task.zero_shot_unsupported:
        return {**report, "skipped": task.zero_shot_unsupported}
    sentences = label_texts(p.data.label_descriptions, labels)
    model = zs.model or p.model.name
    texts = [str(t) for t in test["text"]]
    t0 = time.perf_counter()
    if zs.method == "embedding":
        scores = embedding_scores(model, texts, sentences, zs.batch_size)
    else:
        scores = nli_scores(model, texts, sentences, zs.hypothesis_template, task.calibrator == "sigmoid",
                            zs.batch_size)
    metrics = task.zero_shot_metrics(scores, test, labels)
    return {**report, "model": model, "label_texts": dict(zip(labels, sentences, strict=True)),
            "seconds": round(time.perf_counter() - t0, 1), "metrics": metrics}
