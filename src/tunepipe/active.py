"""Active learning: which unlabelled texts to label next. Uncertainty of the current model (entropy of its label
distribution, or the margin between its two most probable labels), optionally diversified (scikit-learn k-means on
the texts' embeddings, the most uncertain text per cluster), with exact and near-duplicates of already labelled
texts removed. `tunepipe suggest` (tunepipe/suggest.py) ranks a file with these; `simulate` replays the loop on a
labelled corpus (tests/test_suggest.py, benchmarks/active_learning.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

STRATEGIES = ("entropy", "margin", "random")


def normalised(text: str) -> str:
    """What counts as the same text: case and whitespace do not."""
    return " ".join(str(text).casefold().split())


def uncertainty(probs: np.ndarray, strategy: str) -> np.ndarray:
    """Per row, higher = less sure: entropy (nats) of the distribution, or 1 - (top1 - top2) for margin. The
    random strategy reports entropy (its order ignores it)."""
    probs = np.asarray(probs, dtype=np.float64)
    if strategy == "margin":
        top2 = np.sort(probs, axis=-1)[:, -2:] if probs.shape[1] > 1 else np.c_[np.zeros(len(probs)), probs]
        return 1.0 - (top2[:, 1] - top2[:, 0])
    return -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(-1)


def select(probs: np.ndarray, n: int, strategy: str, seed: int = 0, embeddings: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(indices of the chosen rows, most uncertain first (random: in random order), their uncertainty, their
    k-means cluster or None). With `embeddings`: k = n clusters, one pick per cluster (its most uncertain row)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    score = uncertainty(probs, strategy)
    n = min(n, len(score))
    priority = np.random.default_rng(seed).permutation(len(score)).astype(np.float64) if strategy == "random" \
        else score
    if embeddings is None or n == 0:
        chosen = np.argsort(-priority, kind="stable")[:n]
        return chosen, score[chosen], None
    from sklearn.cluster import KMeans

    clusters = KMeans(n_clusters=n, n_init=3, random_state=seed).fit_predict(np.asarray(embeddings, np.float64))
    best = {}
    for i in np.argsort(-priority, kind="stable"):
        best.setdefault(int(clusters[i]), int(i))  # first seen = highest priority in its cluster
    chosen = np.array(sorted(best.values(), key=lambda i: -priority[i]), dtype=np.int64)
    return chosen, score[chosen], clusters[chosen]


def near_duplicates(emb: np.ndarray, labelled_emb: np.ndarray, threshold: float, chunk: int = 4096) -> np.ndarray:
    """Per row of `emb`, whether some labelled embedding has cosine >= threshold with it (rows unit length)."""
    out = np.zeros(len(emb), dtype=bool)
    if threshold >= 1.0 or not len(labelled_emb):
        return out
    for start in range(0, len(emb), chunk):
        sims = emb[start:start + chunk] @ labelled_emb.T
        out[start:start + chunk] = sims.max(axis=1) >= threshold
    return out


def exact_duplicates(texts: Sequence[str], labelled: Sequence[str]) -> tuple[np.ndarray, int, int]:
    """(rows to keep, repeats within `texts` dropped, texts already labelled dropped), after normalisation."""
    seen = {normalised(t) for t in labelled}
    own: set[str] = set()
    keep, repeats, known = [], 0, 0
    for i, text in enumerate(texts):
        key = normalised(text)
        if key in seen:
            known += 1
        elif key in own:
            repeats += 1
        else:
            own.add(key)
            keep.append(i)
    return np.array(keep, dtype=np.int64), repeats, known


# A learner: (texts, label ids) -> a function from texts to an (n, n_labels) probability matrix.
Learner = Callable[[list[str], np.ndarray], Callable[[list[str]], np.ndarray]]


def simulate(pool: Sequence[str], pool_y: np.ndarray, test: Sequence[str], test_y: np.ndarray, learner: Learner,
             start: int, step: int, rounds: int, strategy: str, seed: int,
             embeddings: np.ndarray | None = None) -> list[dict]:
    """Replays labelling on a labelled pool: `start` random labels, then `rounds` times: train, score the test
    texts, and add the `step` texts `strategy` picks (diversified where `embeddings` of the pool are given).
    One row per trained model: round, labelled, macro_f1, accuracy; and, but for the last, the pool indices it
    picked and their mean uncertainty (entropy) under it."""
    from sklearn.metrics import accuracy_score, f1_score

    pool, test = list(pool), list(test)
    pool_y, test_y = np.asarray(pool_y), np.asarray(test_y)
    rng = np.random.default_rng(seed)
    labelled = rng.choice(len(pool), size=start, replace=False)
    rows = []
    for r in range(rounds + 1):
        predict = learner([pool[i] for i in labelled], pool_y[labelled])
        pred = predict(test).argmax(-1)
        rows.append({"round": r, "labelled": len(labelled), "strategy": strategy, "seed": seed,
                     "macro_f1": float(f1_score(test_y, pred, average="macro")),
                     "accuracy": float(accuracy_score(test_y, pred))})
        if r == rounds:
            break
        rest = np.setdiff1d(np.arange(len(pool)), labelled)
        probs = predict([pool[i] for i in rest])
        chosen, _, _ = select(probs, step, strategy, seed * 1000 + r,
                              None if embeddings is None else embeddings[rest])
        rows[-1].update(picked=rest[chosen].tolist(),
                        pick_entropy=float(uncertainty(probs[chosen], "entropy").mean()))
        labelled = np.concatenate([labelled, rest[chosen]])
    return rows


def finetune_learner(model_name: str, n_labels: int, epochs: float = 3.0, learning_rate: float = 5e-5,
                     batch_size: int = 16, max_length: int = 64, seed: int = 0, precision: str = "fp32") -> Learner:
    """Fine-tunes model.name's encoder with a fresh classification head (transformers' Trainer) on each labelled
    set, from the pretrained weights every time, as a pipeline run would."""

    def learn(texts: list[str], y: np.ndarray) -> Callable[[list[str]], np.ndarray]:
        import datasets
        import torch
        from transformers import (
            AutoModelForSequenceClassification,
            DataCollatorWithPadding,
            PrinterCallback,
            Trainer,
            TrainingArguments,
        )

        from tunepipe.modeling import from_pretrained, load_tokenizer

        tok = load_tokenizer(model_name)
        torch.manual_seed(seed)
        model = from_pretrained(model_name, "model weights", lambda path: AutoModelForSequenceClassification
                                .from_pretrained(path, num_labels=n_labels, trust_remote_code=False))

        def encode(batch):
            return tok(batch["text"], truncation=True, max_length=max_length)

        train = datasets.Dataset.from_dict({"text": list(texts), "labels": [int(v) for v in y]}).map(
            encode, batched=True, remove_columns=["text"])
        args = TrainingArguments(output_dir="/tmp/tunepipe-active", per_device_train_batch_size=batch_size,
                                 per_device_eval_batch_size=64, num_train_epochs=epochs, learning_rate=learning_rate,
                                 seed=seed, report_to="none", disable_tqdm=True, save_strategy="no",
                                 logging_strategy="no", bf16=precision == "bf16", dataloader_pin_memory=False,
                                 use_cpu=not torch.cuda.is_available())  # bf16 on a CPU needs it
        trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok,
                          data_collator=DataCollatorWithPadding(tok))
        trainer.remove_callback(PrinterCallback)
        trainer.train()

        def predict(batch_texts: list[str]) -> np.ndarray:
            ds = datasets.Dataset.from_dict({"text": list(batch_texts)}).map(encode, batched=True,
                                                                             remove_columns=["text"])
            logits = np.asarray(trainer.predict(ds).predictions, dtype=np.float64)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        return predict

    return learn
