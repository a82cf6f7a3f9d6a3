"""Few-shot: SetFit vs full fine-tuning with the same k labelled texts per class (data.train_per_class), on the
embedded tweets and model; test macro-F1 and accuracy on the whole test split, and the training time.

Each k draws its train texts once (data.seed), and both methods train on exactly those. SetFit: the recipe's
settings (body learning rate 2e-5, batch 16, 1 epoch over setfit_iterations=20 pairs per text, head 25 epochs).
Full fine-tuning: the pipeline's Trainer loop (training.build_trainer) for `--full-epochs` epochs at batch 16,
no early stopping (a 24-text validation would be noise; the whole validation split is not few-shot).

    python benchmarks/fewshot.py [--k 8 16 64] [--methods setfit full] [--setfit-iterations 20] [--n-test N]
                                 [--out benchmarks/fewshot.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from tunepipe import fewshot
from tunepipe.modeling import cpu_isa, cpu_model
from tunepipe.params import parse_params
from tunepipe.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the DVC stages (`stages`) live beside the package, not in it


def params(k: int, method: str, full_epochs: float, iterations: int = 20):
    ft = ({"method": "setfit", "learning_rate": 2e-5, "batch_size": 16, "epochs": 1.0, "precision": "fp32",
           "setfit_iterations": iterations}
          if method == "setfit" else
          {"method": "full", "batch_size": 16, "epochs": full_epochs, "eval_steps": 10**6, "precision": "fp32"})
    return parse_params({"data": {"train_per_class": k}, "finetune": ft})


def test_scores(task, model, tokenizer, test) -> dict:
    logits, gold = task.calibration_data(model.eval(), tokenizer, test, {})
    pred = np.asarray(logits).argmax(-1)
    return {"test_macro_f1": round(float(f1_score(gold, pred, average="macro")), 4),
            "test_accuracy": round(float(accuracy_score(gold, pred)), 4)}


def run(k: int, methods: list[str], full_epochs: float, iterations: int, n_test: int | None, work: Path
        ) -> list[dict]:
    from stages import prepare
    from stages import tokenization as tokenize
    from tunepipe.training import build_trainer

    os.chdir(work)
    Path("params.yaml").write_text(json.dumps(params(k, "setfit", full_epochs).model_dump()))  # YAML reads JSON
    prepare.main()
    tokenize.main()
    task = get_task("classification")
    labels = json.loads(Path("data/prepared/meta.json").read_text())["labels"]
    dsd = datasets.load_from_disk("data/tokenized")
    test = dsd["test"] if not n_test else dsd["test"].shuffle(seed=0).select(range(n_test))  # the same texts for all
    rows = []
    for method in methods:
        p = params(k, method, full_epochs, iterations)
        t0 = time.time()
        if method == "setfit":
            out = fewshot.train(p, task, Path("data/prepared"), dsd["validation"].select(range(200)), labels)
            model, tokenizer = out["model"], out["tokenizer"]
        else:
            trainer = build_trainer(p, dsd, labels, str(work / "ckpt"), save_checkpoints=False, precision="fp32")
            trainer.train()
            model, tokenizer = trainer.model, trainer.processing_class
        seconds = time.time() - t0
        row = {"k": k, "method": method, "train_texts": len(dsd["train"]), "train_s": round(seconds, 1),
               **test_scores(task, model, tokenizer, test), "n_test": len(test)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--methods", nargs="+", default=["setfit", "full"], choices=["setfit", "full"])
    ap.add_argument("--full-epochs", type=float, default=10.0)
    ap.add_argument("--setfit-iterations", type=int, default=20, help="pairs per train text (the recipe: 20)")
    ap.add_argument("--n-test", type=int, default=None, help="a seeded sample of the test split (default: all)")
    ap.add_argument("--out", default="benchmarks/fewshot.json")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    load = os.getloadavg()[0]
    result = {"cpu": f"{cpu_model()} ({cpu_isa()}), {torch.get_num_threads()} threads", "precision": "fp32",
              "load_average_at_start": round(load, 2), "seed": 42, "setfit_iterations": args.setfit_iterations,
              "full_epochs": args.full_epochs, "rows": []}
    for k in args.k:
        with tempfile.TemporaryDirectory() as work:
            result["rows"] += run(k, args.methods, args.full_epochs, args.setfit_iterations, args.n_test, Path(work))
        result["load_average_at_end"] = round(os.getloadavg()[0], 2)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after each k: a cut-short run keeps what it measured
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
