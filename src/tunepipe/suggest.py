"""`tunepipe suggest`: rank a file of unlabelled texts for labelling with the current model (models/onnx or a
registered version): the most uncertain first (entropy or margin of its served probabilities), optionally one per
k-means cluster of the texts' embeddings, without texts that are already labelled (the prepared train split:
equal after normalising case and whitespace, or with a sentence-embedding cosine >= suggest.near_duplicate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.paths import EXPORT, PREPARED

LABELLED = PREPARED / "train.parquet"
PREDICT_BATCH = 64
READERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def add_parser(sub) -> None:
    p = sub.add_parser("suggest", help="rank unlabelled texts for labelling by the current model's uncertainty")
    p.add_argument("--input", required=True, help="unlabelled texts: .csv, .tsv, .jsonl or .parquet")
    p.add_argument("--output", required=True, help="CSV to write: text, suggested_label, score (+ cluster)")
    p.add_argument("--model", default=str(EXPORT),
                   help="export directory, or an MLflow URI such as models:/NAME@champion (default: models/onnx)")
    p.add_argument("--n", type=int, help="texts to suggest (default: suggest.n)")
    p.add_argument("--strategy", choices=["entropy", "margin", "random"], help="default: suggest.strategy")
    p.add_argument("--diversify", action=argparse.BooleanOptionalAction,
                   help="one text per k-means cluster of the embeddings (default: suggest.diversify)")
    p.add_argument("--text-column", help="the input's column of texts (default: suggest.text_column)")
    p.add_argument("--labelled", help=f"already labelled texts to leave out (default: {LABELLED} where present)")
    p.set_defaults(func=cmd_suggest)


def read_texts(path: Path, column: str) -> list[str]:
    """The non-empty texts of `column` in a csv/tsv/jsonl/parquet file."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"--input: {path}: file not found")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"--input: {path}: unknown file type {path.suffix!r} (use .csv, .tsv, .jsonl or .parquet)")
    try:
        if kind == "csv":
            df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            df = pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise UserError(f"--input: {path}: could not read it as {kind}: {str(exc).splitlines()[0]}") from None
    if column not in df.columns:
        raise UserError(f"--input: {path} has no column {column!r} (columns: {', '.join(map(str, df.columns))}); "
                        "pass --text-column or set suggest.text_column")
    texts = [str(t).strip() for t in df[column] if t is not None and str(t).strip()]
    if not texts:
        raise UserError(f"--input: {path}: column {column!r} holds no texts")
    return texts


def cmd_suggest(args: argparse.Namespace) -> None:
    import time

    from tunepipe.active import exact_duplicates, near_duplicates, select
    from tunepipe.cli import load_predictor
    from tunepipe.files import write_csv
    from tunepipe.params import Params, load_params
    from tunepipe.progress import say
    from tunepipe.tasks import get_task

    p = load_params(args.params) if Path(args.params).is_file() else Params()
    s = p.suggest
    n = s.n if args.n is None else args.n
    if n < 1:
        raise UserError(f"--n: must be at least 1, got {n}")
    strategy, diversify = args.strategy or s.strategy, s.diversify if args.diversify is None else args.diversify
    t0 = time.perf_counter()
    texts = read_texts(Path(args.input), args.text_column or s.text_column)
    labelled_path = Path(args.labelled) if args.labelled else LABELLED
    if args.labelled and not labelled_path.is_file():
        raise UserError(f"--labelled: {labelled_path}: file not found")
    labelled = read_texts(labelled_path, "text") if labelled_path.is_file() else []
    if not labelled:
        say(f"suggest: no labelled texts to leave out ({LABELLED} not found; run `dvc repro prepare` or pass "
            "--labelled)")
    task, predict = load_predictor(args.model, args.params)
    get_task(task).served_probabilities([])  # a task without a label distribution per text stops here

    keep, repeats, known = exact_duplicates(texts, labelled)
    texts = [texts[i] for i in keep]
    emb, near = None, 0
    if diversify or (labelled and s.near_duplicate < 1.0):
        from tunepipe.embeddings import SentenceEncoder

        encoder = SentenceEncoder(p.model.name, batch_size=s.batch_size)
        emb = encoder.encode(texts)
        if labelled and s.near_duplicate < 1.0:
            close = near_duplicates(emb, encoder.encode(labelled), s.near_duplicate)
            near = int(close.sum())
            texts, emb = [t for t, c in zip(texts, close, strict=True) if not c], emb[~close]
    if not texts:
        raise UserError(f"suggest: every text in {args.input} is already labelled (or a near-duplicate of one)")
    # In parts: a candidate file is usually larger than the model's serve.max_texts_per_request, a per-request limit.
    step = min(PREDICT_BATCH, predict.max_texts or PREDICT_BATCH)
    results = [r for i in range(0, len(texts), step) for r in predict(texts[i:i + step])]
    labels, probs = get_task(task).served_probabilities(results)
    chosen, score, clusters = select(probs, n, strategy, s.seed, emb if diversify else None)
    rows = [{"text": texts[i], "suggested_label": labels[int(probs[i].argmax())], "score": f"{score[k]:.6f}",
             **({"cluster": int(clusters[k])} if clusters is not None else {})} for k, i in enumerate(chosen)]
    cols = ["text", "suggested_label", "score"] + (["cluster"] if clusters is not None else [])
    write_csv(args.output, rows, cols)
    what = {"entropy": "entropy (nats)", "margin": "1 - margin of the top two", "random": "entropy (nats)"}[strategy]
    say(f"suggest: {len(rows)} of {len(texts)} candidate texts -> {args.output} (strategy {strategy}"
        f"{', one per k-means cluster' if diversify else ''}; score = {what}); left out "
        + json.dumps({"repeated": repeats, "already_labelled": known, "near_duplicate": near})
        + f" ({time.perf_counter() - t0:.1f} s)")
