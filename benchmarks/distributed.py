"""What DDP costs on CPU cores: seconds per optimizer step of the finetune Trainer at the same global batch,
1 process with N threads vs N processes (torchrun, gloo) with 1 thread each, side by side in one run.

The embedded model on the default tweets; each configuration trains the same steps from the same seed, warm-up steps
excluded, no evaluation or checkpoints in the timed part.

    python benchmarks/distributed.py [--steps 30] [--processes 2] [--batch-size 32] [--max-length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from tunepipe.modeling import cpu_isa, cpu_model, pick_precision
from tunepipe.params import parse_params

WARMUP = 5
LABELS = ["negative", "neutral", "positive"]


class StepTimer(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP:
            self.t0 = time.perf_counter()
        self.t1, self.steps = time.perf_counter(), state.global_step - WARMUP


def params(args: argparse.Namespace, precision: str):
    return parse_params({"model": {"name": args.model}, "tokenize": {"max_length": args.max_length},
                         "finetune": {"batch_size": args.batch_size, "max_steps": args.steps + WARMUP,
                                      "eval_steps": 10**6, "precision": precision}})


def prepare(args: argparse.Namespace, out: Path) -> None:
    import datasets

    from tunepipe.modeling import load_tokenizer
    from tunepipe.tasks.classification.data import load_source, select_columns

    df = select_columns(load_source("builtin:tweets")["all"], "text", "sentiment", "builtin:tweets")
    df = df.sample(n=(args.steps + WARMUP) * args.batch_size, random_state=0)
    texts, labels = df["text"].tolist(), [LABELS.index(x) for x in df["label"]]
    enc = load_tokenizer(args.model)(texts, truncation=True, max_length=args.max_length)
    ds = datasets.Dataset.from_dict({**enc, "labels": labels, "length": [len(x) for x in enc["input_ids"]]})
    datasets.DatasetDict(train=ds, validation=ds.select(range(min(64, len(ds))))).save_to_disk(str(out))


def worker(args: argparse.Namespace) -> None:
    """One configuration (run as is, or as each process under torchrun): rank 0 writes the timing."""
    import datasets
    import torch

    from tunepipe import distributed
    from tunepipe.progress import quiet_libraries
    from tunepipe.training import build_trainer

    quiet_libraries()
    distributed.init()
    dsd = datasets.load_from_disk(args.data)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(params(args, args.precision), dsd, LABELS, out, [timer], save_checkpoints=False,
                                precision=args.precision)
        trainer.train()
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({"s_per_step": (timer.t1 - timer.t0) / timer.steps,
                                                 "threads": torch.get_num_threads(),
                                                 "processes": distributed.world_size()}))
    distributed.finish()


def measure(args: argparse.Namespace, data: Path, processes: int, threads: int, precision: str) -> dict:
    result = data.parent / f"result-{processes}.json"
    script = [str(Path(__file__).resolve()), "--worker", "--data", str(data), "--result", str(result),
              "--precision", precision, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--model", args.model]
    cmd = [sys.executable, *script] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *script]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps (after 5 warm-up steps)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="the global batch, in both configurations")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--model", default="builtin:minilm-l6")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    precision = pick_precision("auto")
    n = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(args, data)
        one = measure(args, data, 1, n, precision)
        many = measure(args, data, n, 1, precision)
    result = {"cpu": f"{cpu_model()} ({cpu_isa()})", "precision": precision, "model": args.model,
              "global_batch": args.batch_size, "steps_timed": args.steps,
              "one_process": {"threads": one["threads"], "s_per_step": round(one["s_per_step"], 3)},
              f"{n}_processes": {"threads_each": many["threads"], "backend": "gloo",
                                 "s_per_step": round(many["s_per_step"], 3)},
              "ratio": round(many["s_per_step"] / one["s_per_step"], 2)}
    print(f"{result['cpu']}, {precision}, global batch {args.batch_size}, {args.steps} timed steps")
    print(f"  1 process x {one['threads']} threads:        {one['s_per_step']:.3f} s/step")
    print(f"  {n} processes x {many['threads']} thread (gloo): {many['s_per_step']:.3f} s/step "
          f"({result['ratio']}x the 1-process time)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
