"""Is `tunepipe suggest` worth using? Replays labelling on the tweet corpus: start from --start random labels of
the prepared train split (the pool), then for --rounds rounds add --step texts picked by uncertainty (and, for
comparison, at random), retrain, and score macro-F1 on the prepared test split; several seeds. Prints macro-F1 per
round for each strategy (mean and spread over seeds), the CPU, the load and the time. Not part of CI.

    python benchmarks/active_learning.py                      # the issue's setting: 200 + 200 x 10, 3 seeds,
                                                              # fine-tuning MiniLM each round (hours on 2 CPU cores)
    python benchmarks/active_learning.py --learner embedding  # logistic regression on frozen MiniLM embeddings
    python benchmarks/active_learning.py --learner embedding --pool 3000 --test 1000 --rounds 4 --seeds 2  # small
    python benchmarks/active_learning.py --pool 5000 --test 1000 --seeds 2 --strategies margin,random \
        --precision bf16 --epochs 2            # fine-tuned, smaller pool: ~17 min per seed and strategy with AMX

--learner finetune trains the pipeline's model (model.name, fresh head, --epochs) from the pretrained weights each
round, as `dvc repro` would after labelling; --learner embedding keeps the encoder frozen (sentence embeddings,
computed once) and fits scikit-learn's logistic regression, a quick stand-in for the same loop.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from tunepipe.active import finetune_learner, simulate
from tunepipe.modeling import cpu_isa, cpu_model
from tunepipe.params import parse_params
from tunepipe.tasks import get_task


def embedding_learner(texts: list[str], emb: np.ndarray, n_labels: int, seed: int):
    """Logistic regression on fixed sentence embeddings (looked up by text)."""
    from sklearn.linear_model import LogisticRegression

    index = {t: i for i, t in enumerate(texts)}

    def learn(train_texts: list[str], y: np.ndarray):
        clf = LogisticRegression(max_iter=2000, random_state=seed).fit(emb[[index[t] for t in train_texts]], y)

        def predict(batch: list[str]) -> np.ndarray:
            probs = np.zeros((len(batch), n_labels))
            probs[:, clf.classes_] = clf.predict_proba(emb[[index[t] for t in batch]])
            return probs

        return predict

    return learn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learner", choices=["finetune", "embedding"], default="finetune")
    ap.add_argument("--model", default="builtin:minilm-l6")
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--step", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--strategies", default="entropy,random",
                    help="comma-separated: entropy, margin, random; +diversify (e.g. entropy+diversify) picks one "
                         "text per k-means cluster of the pool's sentence embeddings")
    ap.add_argument("--pool", type=int, default=None, help="subsample the train split to this many (default: all)")
    ap.add_argument("--test", type=int, default=None, help="subsample the test split to this many (default: all)")
    ap.add_argument("--epochs", type=float, default=3.0, help="finetune learner: epochs per round")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="finetune learner: bf16 autocast pays only where the CPU has fast bf16 (AMX, AVX-512 BF16)")
    ap.add_argument("--output", help="also write every row as JSON here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    p = parse_params({"model": {"name": args.model}})
    splits = get_task("classification").prepare(p).splits  # the pipeline's own split of builtin:tweets
    labels = sorted(splits["train"]["label"].unique())
    pool, test = splits["train"], splits["test"]
    if args.pool:
        pool = pool.sample(n=min(args.pool, len(pool)), random_state=0)
    if args.test:
        test = test.sample(n=min(args.test, len(test)), random_state=0)
    pool_texts, test_texts = pool["text"].tolist(), test["text"].tolist()
    pool_y = np.array([labels.index(x) for x in pool["label"]])
    test_y = np.array([labels.index(x) for x in test["label"]])

    emb = None
    strategies = args.strategies.split(",")
    if args.learner == "embedding" or any(s.endswith("+diversify") for s in strategies):
        from tunepipe.embeddings import SentenceEncoder

        enc = SentenceEncoder(args.model)
        all_texts = pool_texts + test_texts
        all_emb = enc.encode(all_texts)
        emb = all_emb[:len(pool_texts)]
        print(f"embedded {len(all_texts)} texts in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for seed in range(args.seeds):
        for name in strategies:
            strategy, diversify = name.removesuffix("+diversify"), name.endswith("+diversify")
            if args.learner == "embedding":
                learner = embedding_learner(pool_texts + test_texts, all_emb, len(labels), seed)
            else:
                learner = finetune_learner(args.model, len(labels), epochs=args.epochs, seed=seed,
                                           precision=args.precision)
            t1 = time.perf_counter()
            got = simulate(pool_texts, pool_y, test_texts, test_y, learner, args.start, args.step, args.rounds,
                           strategy, seed, embeddings=emb if diversify else None)
            for r in got:
                r.pop("picked", None)
                r["strategy"] = name
            rows += got
            print(f"seed {seed} {name}: " + " ".join(f"{r['macro_f1']:.3f}" for r in got)
                  + f"  ({time.perf_counter() - t1:.0f} s)", flush=True)

    print(f"\nmacro-F1 on {len(test_texts)} test texts, pool {len(pool_texts)}, learner {args.learner}, "
          f"{args.seeds} seed(s) (mean ± sd)")
    print("labelled | " + " | ".join(strategies))
    for r in range(args.rounds + 1):
        cells = []
        for s in strategies:
            vals = [x["macro_f1"] for x in rows if x["strategy"] == s and x["round"] == r]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}")
        print(f"{args.start + r * args.step:8d} | " + " | ".join(cells))
    precision = args.precision if args.learner == "finetune" else "fp32"
    print(f"\nCPU: {cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores, {precision}; load average "
          f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; total {time.perf_counter() - t0:.0f} s")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
