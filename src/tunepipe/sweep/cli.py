"""The `tunepipe sweep` command: its arguments, the checks before a study is touched, and one worker's sweep."""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna

from tunepipe import distributed
from tunepipe.errors import UserError, masked
from tunepipe.files import read_json
from tunepipe.modeling import pick_precision
from tunepipe.params import Params, SweepParams, load_params
from tunepipe.paths import AUGMENTED, PARAMS_FILE, PREPARED_META, SWEEP_REPORTS
from tunepipe.sweep.apply import _apply
from tunepipe.sweep.report import _log_summary, write_reports
from tunepipe.sweep.runner import (
    Objective,
    TooManyFailures,
    _requeue_interrupted,
    _setup_tracking,
    close_dead_runs,
    follow_trials,
    run_trials,
)
from tunepipe.sweep.study import (
    OPTIONAL,
    check_search_space,
    default_storage,
    make_pruner,
    open_storage,
    open_study,
    search_space,
    trial_counts,
    trial_setup,
)

# ---- command ----

def check_divisible(sw: SweepParams, processes: int) -> None:
    """Each sweep.batch_size choice is a global batch, split evenly among the training processes."""
    odd = [b for b in sw.batch_size if b % processes]
    if odd:
        raise UserError(f"sweep.batch_size: {', '.join(map(str, odd))} does not divide among {processes} training "
                        f"processes (a trial's batch is the global batch, split evenly); make every choice a multiple "
                        f"of {processes}, or change the process count ({distributed.NPROC_ENV})")


def add_parser(sub) -> None:
    sp = sub.add_parser("sweep", help="tune learning rate, batch size, dropout (and adversarial training) with Optuna",
                        description="Run (or resume, or join) the Optuna study set in params.yaml's sweep "
                                    "section; `tunepipe sweep apply` writes the study's best values into "
                                    "params.yaml without running trials.")
    sp.add_argument("action", nargs="?", choices=["apply"], metavar="apply",
                    help="write the study's best values into params.yaml and stop (no trials)")
    sp.add_argument("--trials", type=int, help="finished trials the study should end with (default: sweep.trials)")
    sp.add_argument("--storage", help="Optuna storage URL (default: sweep.storage, else sqlite optuna.db here)")
    sp.add_argument("--study", help="study name (default: sweep.study)")
    sp.add_argument("--apply", action="store_true", help="after the sweep, write the best values into params.yaml")
    sp.add_argument("--no-repro", action="store_true", help="use data/augmented as it is (skip `dvc repro augment`)")
    sp.set_defaults(func=cmd_sweep)


def effective_sweep(p: Params, args: argparse.Namespace) -> tuple[SweepParams, str]:
    sw = p.sweep
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials: must be a positive number of trials, got {args.trials}")
    if args.study is not None and not args.study.strip():
        raise UserError("--study: give a non-empty study name")
    sw = sw.model_copy(update={k: v for k, v in (("trials", args.trials), ("study", args.study)) if v is not None})
    return sw, args.storage or sw.storage or default_storage()


def cmd_sweep(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = load_params(args.params)
    sw, url = effective_sweep(p, args)
    if args.action == "apply":
        storage = open_storage(url, sw.heartbeat_interval)
        try:
            study = optuna.load_study(storage=storage, study_name=sw.study)
        except KeyError:
            raise UserError(f"--study: no study '{sw.study}' in {masked(url)}; run `tunepipe sweep` first") from None
        _apply(study, args.params)
        return
    nproc = distributed.requested_processes()
    if nproc > 1 and not distributed.launched():  # TUNEPIPE_NPROC: every trial trains on nproc processes
        check_divisible(sw, nproc)
        if not args.no_repro:
            _repro()
        sys.exit(distributed.relaunch("tunepipe.cli", nproc, "sweep", [*sys.argv[1:], "--no-repro"]))
    if not args.no_repro:
        _repro()
    distributed.init()
    sweep(p, sw, url, args.params, apply=args.apply)
    distributed.finish()


def sweep(p: Params, sw: SweepParams, url: str, params_file: str | Path = PARAMS_FILE, apply: bool = False,
          out_dir: Path = SWEEP_REPORTS) -> dict:
    """Run this worker's share of the study and write the reports; returns the summary."""
    import datasets
    import mlflow
    import transformers

    from tunepipe import tracking
    from tunepipe.tasks import get_task

    # Everything the user can get wrong is checked before the study or MLflow is touched.
    if p.finetune.method == "setfit":  # trials train with HF Trainer (training.build_trainer)
        raise UserError("finetune.method: setfit cannot be swept (trials train with the Trainer loop); sweep with "
                        "method full or lora")
    if not (AUGMENTED / "dataset_dict.json").is_file() or not PREPARED_META.is_file():
        raise UserError(f"{AUGMENTED}: no prepared data; run `dvc repro augment` (or drop --no-repro)")
    dsd, meta = datasets.load_from_disk(str(AUGMENTED)), read_json(PREPARED_META)
    labels = meta["labels"]
    check_evaluated(p, sw, len(dsd["train"]))
    check_search_space(p, sw)
    metric = get_task(p.task).headline_metric
    # One precision for every trial and every process (`auto` measures a matmul, which could differ per process).
    precision = distributed.from_main(pick_precision(p.finetune.precision) if distributed.is_main() else None)
    if not distributed.is_main():  # a distributed sweep's other processes train rank 0's trials in step with it
        follow_trials(dsd, labels, metric, precision)
        return {}
    tracking.check_reachable(p.tracking)
    storage = open_storage(url, sw.heartbeat_interval)
    first_eval = min(len(dsd["train"]) * p.finetune.epochs, p.finetune.eval_steps * min(sw.batch_size))
    study, created, seed = open_study(storage, sw.study, sw, search_space(sw, metric),
                                      trial_setup(p, meta["data_hash"]), make_pruner(sw, int(first_eval)))
    # The EarlyStoppingCallback warns about load_best_model_at_end, which trials switch off on purpose.
    transformers.utils.logging.get_logger("transformers.trainer_callback").setLevel("ERROR")

    exp_id = _setup_tracking(p)
    client = mlflow.MlflowClient()
    before = trial_counts(study)
    parent = client.create_run(exp_id, tags={
        "mlflow.runName": f"sweep-{sw.study}-{time.strftime('%Y%m%d-%H%M%S')}", "tunepipe.sweep.study": sw.study,
        "tunepipe.sweep.worker": f"{socket.gethostname()}:{os.getpid()}",
        "tunepipe.git_commit": tracking.git_commit() or "unknown", "tunepipe.task": p.task,
        "tunepipe.processes": str(distributed.world_size())}).info.run_id
    client.log_batch(parent, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in {
        "study": sw.study, "storage": masked(url), "trials": sw.trials, "timeout": sw.timeout, "sampler": sw.sampler,
        "sampler_seed": seed, "pruner": sw.pruner, "learning_rate": list(sw.learning_rate),
        "batch_size": list(sw.batch_size), "dropout": list(sw.dropout), "metric": metric,
        **{k: list(getattr(sw, k)) for k in OPTIONAL if getattr(sw, k) is not None}}.items()])
    print(f"sweep: study '{sw.study}' {'created' if created else 'resumed'} in {masked(url)}: "
          f"{before['complete'] + before['pruned']}/{sw.trials} trials finished; sampler {sw.sampler} "
          f"(seed {seed}), pruner {sw.pruner}; MLflow run {parent}", flush=True)

    objective = Objective(p, sw, dsd, labels, sw.trials, exp_id, parent, precision)
    start, status, stopped = time.monotonic(), "FAILED", None
    try:
        close_dead_runs(study)
        try:
            run_trials(study, objective, sw.trials, sw.timeout, sw.heartbeat_interval)
        except TooManyFailures as exc:
            stopped = exc  # the reports still show what ran; then the sweep stops with the message
        distributed.from_main(None)  # no more trials: the other processes stop following
        close_dead_runs(study)
        summary = write_reports(study, {
            "study": sw.study, "storage": masked(url), "metric": metric, "target_trials": sw.trials,
            "sampler": sw.sampler, "pruner": sw.pruner, "sampler_seed": seed,
            "invocation": {"wall_time_s": round(time.monotonic() - start, 1), "trials_run": objective.ran,
                           "mlflow_run_id": parent}}, out_dir)
        _log_summary(client, parent, summary, out_dir)
        status = "FAILED" if stopped else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        _requeue_interrupted(study, objective.current)
        raise
    finally:
        client.set_terminated(parent, status)
    c, best = summary["trials"], summary["best"]
    print(f"sweep: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed "
          f"({objective.ran} run here in {summary['invocation']['wall_time_s']}s); "
          + (f"best validation {metric} {best['value']:.4f} (trial {best['trial']}: {best['params']}); "
             if best else "no complete trial yet; ") + f"reports in {out_dir}/", flush=True)
    if stopped:
        raise stopped
    if apply:
        _apply(study, params_file)
    return summary


def check_evaluated(p: Params, sw: SweepParams, n_train: int) -> None:
    """A trial that never reaches finetune.eval_steps would have nothing to report or return."""
    bs = max(sw.batch_size)
    steps = p.finetune.max_steps or math.ceil(p.finetune.epochs * math.ceil(n_train / bs))
    if steps < p.finetune.eval_steps:
        raise UserError(f"finetune.eval_steps: {p.finetune.eval_steps} is more than the {steps} steps a trial with "
                        f"batch_size {bs} trains on {n_train} examples, so it would never be evaluated; lower "
                        "finetune.eval_steps or the sweep.batch_size choices")


def _repro() -> None:
    print("sweep: dvc repro augment", flush=True)
    rc = subprocess.run([sys.executable, "-m", "dvc", "repro", "augment"], check=False).returncode
    if rc != 0:
        raise UserError(f"`dvc repro augment` failed (exit {rc}); see its output above, or pass --no-repro "
                        "to sweep on data/augmented as it is")
