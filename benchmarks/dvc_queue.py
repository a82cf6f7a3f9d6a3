"""What DVC's experiment queue costs and gains: the same small grid run as `dvc exp run` one after another in the
workspace, and queued (`dvc exp run --queue`) then `dvc queue start --jobs 1` and `--jobs 2`.

Tiny settings, as tests/test_queue.py: the tiny random BERT, 90 synthetic rows, 1 epoch, robustness and
explanations off. Each experiment re-runs finetune, evaluate and export (the data stages come from the committed
baseline), so the figures are mostly process start-up, DVC's own work and MLflow, not training.

    python benchmarks/dvc_queue.py [--experiments 4] [--jobs 1 2]

Writes benchmarks/dvc_queue.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=4)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    from tests.helpers import queue_project, run_queue, sh, tiny_model
    from tunepipe.modeling import cpu_isa, cpu_model

    results = {"cpu": f"{cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores",
               "load_average_at_start": os.getloadavg(), "experiments": args.experiments,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": []}
    with tempfile.TemporaryDirectory(prefix="tunepipe-queue-bench-") as tmp:
        base = Path(tmp)
        model_dir = tiny_model(base / "tiny-bert")
        # Learning rates unique across all configurations: no experiment repeats another's params.
        rates = iter(round(1e-3 * (i + 1), 6) for i in range(args.experiments * (len(args.jobs) + 1)))

        root = queue_project(base / "sequential", model_dir)
        load = os.getloadavg()[0]  # other work on the machine: the figures mean little unless it is near 0
        t0 = time.monotonic()
        for _ in range(args.experiments):
            sh(["dvc", "exp", "run", "-S", f"finetune.learning_rate={next(rates)}"], root)
        took = time.monotonic() - t0
        results["runs"].append({"how": "dvc exp run, one after another", "jobs": 1, "seconds": round(took, 1),
                                "load_average_before": round(load, 2)})
        print(f"sequential: {took:.0f}s", flush=True)

        for jobs in args.jobs:
            root = queue_project(base / f"jobs{jobs}", model_dir)
            for _ in range(args.experiments):
                sh(["dvc", "exp", "run", "--queue", "-S", f"finetune.learning_rate={next(rates)}"], root)
            load = os.getloadavg()[0]
            rows, took = run_queue(root, jobs, timeout=3600)
            failed = [r for r in rows if r[-1] != "Success"]
            assert not failed, failed
            results["runs"].append({"how": f"dvc queue start --jobs {jobs}", "jobs": jobs, "seconds": round(took, 1),
                                    "load_average_before": round(load, 2)})
            print(f"--jobs {jobs}: {took:.0f}s", flush=True)

    seq = results["runs"][0]["seconds"]
    lines = [f"{args.experiments} experiments (finetune, evaluate, export each), {results['cpu']}, load average "
             f"{results['load_average_at_start'][0]:.2f} at start", "",
             "| how | wall time | per experiment | vs one after another | load average before |",
             "| --- | --- | --- | --- | --- |"]
    for run in results["runs"]:
        lines.append(f"| `{run['how']}` | {run['seconds']:.0f} s | {run['seconds'] / args.experiments:.1f} s | "
                     f"{seq / run['seconds']:.2f}x | {run['load_average_before']:.2f} |")
    print("\n".join(lines))
    (REPO / "benchmarks/dvc_queue.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
