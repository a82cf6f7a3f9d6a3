"""What pruning saves: the same sweep (same data, space, seed and trial count) with pruner `none` and `median`.

Runs on tiny synthetic data with a tiny random BERT (the test fixtures), so it takes minutes on a CPU:

    python benchmarks/sweep_pruning.py [--trials 8] [--rows 150] [--epochs 4]

Reports total trial-epochs trained, wall time and the best validation macro_f1 of each, in
benchmarks/sweep_pruning.md (and .json). Both studies start from the same sampler seed; TPE then sees
pruned trials differently, so the later trials of the two sweeps are not identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide random BERT with the MiniLM tokenizer, as in tests/conftest.py."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tunepipe.modeling import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:minilm-l6"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--rows", type=int, default=150, help="synthetic labelled rows (80%% train)")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "sweep_pruning.md")
    args = ap.parse_args()

    import optuna
    import yaml

    from stages import augment, prepare
    from stages import tokenization as tokenize
    from tests.conftest import synthetic_rows, tiny_params, write_csv
    from tunepipe.modeling import device_name
    from tunepipe.params import load_params
    from tunepipe.sweep.cli import sweep
    from tunepipe.sweep.study import default_storage

    work = Path(tempfile.mkdtemp(prefix="tunepipe-bench-"))
    os.chdir(work)
    try:
        write_csv(work / "data/raw/train.csv", synthetic_rows(args.rows))
        params = tiny_params(tiny_model(work / "tiny-bert"), **{
            "finetune.epochs": args.epochs, "finetune.eval_steps": 2,
            "sweep.trials": args.trials, "sweep.seed": 0, "sweep.sampler": "tpe", "sweep.pruner_startup_trials": 2,
            "sweep.learning_rate": [1e-3, 5e-2], "sweep.batch_size": [16, 32], "sweep.dropout": [0.0, 0.3]})
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        prepare.main()
        tokenize.main()
        augment.main()

        p = load_params()
        results, trials = {}, {}
        for pruner in ("none", "median"):
            sw = p.sweep.model_copy(update={"pruner": pruner, "study": f"bench-{pruner}"})
            start = time.monotonic()
            summary = sweep(p, sw, default_storage(), out_dir=Path(f"reports/sweep-{pruner}"))
            best = summary["best"]
            results[pruner] = {"wall_s": round(time.monotonic() - start, 1), "trial_epochs": summary["trial_epochs"],
                               "complete": summary["trials"]["complete"], "pruned": summary["trials"]["pruned"],
                               "best_value": round(best["value"], 4), "best_params": best["params"]}
            trials[pruner] = optuna.load_study(study_name=sw.study, storage=default_storage()).trials
    finally:
        os.chdir(REPO)
        shutil.rmtree(work, ignore_errors=True)

    none, median = results["none"], results["median"]
    epochs_change = median["trial_epochs"] / none["trial_epochs"] - 1
    wall_change = median["wall_s"] / none["wall_s"] - 1
    setup = (f"{args.trials} trials, TPE seed 0, {args.rows} synthetic rows ({len(p.sweep.batch_size)} batch sizes), "
             f"{args.epochs:g} epochs max, evaluation every {p.finetune.eval_steps} steps, tiny random BERT "
             f"(2 layers, 32 wide); median pruner after {p.sweep.pruner_startup_trials} complete trials")
    # TPE's first 10 trials are random draws from the seed, so both sweeps try the same values there.
    per_trial = [
        f"| {a.number} | {a.params['learning_rate']:.2e} | {a.params['batch_size']} | {a.params['dropout']:.2f} | "
        f"{a.value:.3f} | {b.state.name.lower()} after {b.user_attrs.get('epochs_run', 0):g} epochs"
        + (f" ({b.value:.3f})" if b.value is not None else "") + " |"
        for a, b in zip(trials["none"], trials["median"], strict=True) if a.params == b.params]
    lines = [
        "# Sweep pruning benchmark", "",
        f"Generated by `python benchmarks/sweep_pruning.py` on {device_name()}.", "",
        f"Setup: {setup}.", "",
        "| pruner | complete | pruned | trial-epochs | wall time (s) | best val macro_f1 |",
        "|---|---|---|---|---|---|",
        *(f"| {k} | {r['complete']} | {r['pruned']} | {r['trial_epochs']} | {r['wall_s']} | {r['best_value']} |"
          for k, r in results.items()),
        "",
        f"With the median pruner: trial-epochs {epochs_change:+.0%}, wall time {wall_change:+.0%} (wall time also "
        "counts model loading, evaluations and reports per trial, and is noisy on a shared machine; trial-epochs "
        "are not).", "",
        "Trials with the same values in both sweeps (validation macro_f1; the median sweep's outcome):", "",
        "| trial | learning_rate | batch_size | dropout | no pruning | median pruner |", "|---|---|---|---|---|---|",
        *per_trial, "",
    ]
    # What pruning cost: trials it stopped that, trained to the end, beat the best the pruned sweep found.
    lost = [a.number for a, b in zip(trials["none"], trials["median"], strict=True)
            if a.params == b.params and b.state.name == "PRUNED" and a.value > median["best_value"]]
    lines += [f"Pruned trials that would have beaten the pruned sweep's best ({median['best_value']}): "
              f"{', '.join(map(str, lost)) if lost else 'none'}.", ""]
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "device": device_name(),
                                                         "results": results}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
