"""Stage finetune: train the task's head (and the encoder, or LoRA adapters) with HF Trainer, or a few-shot SetFit
model (finetune.method: setfit, tunepipe/fewshot.py); log to MLflow.

Checkpoints go to models/checkpoints (a persistent DVC out): a run killed mid-epoch resumes from its last
checkpoint on the next `dvc repro`, as long as params and data are unchanged (else it starts over). A finished run
deletes them and leaves only state.json, which DVC caches and pushes: a pulled clone finds finetune up to date.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import datasets
import mlflow

from tunepipe import distributed, fewshot, tracking
from tunepipe.errors import UserError, run_main
from tunepipe.files import atomic_dir, read_json, write_csv, write_json
from tunepipe.modeling import cpu_bf16_speedup, device_name, merge_for_export, pick_precision
from tunepipe.params import load_params
from tunepipe.paths import (
    AUGMENTED,
    CHECKPOINTS,
    MODEL,
    PLOTS,
    PREPARED,
    PREPARED_META,
    TRAIN_REPORT,
    TRAINING_INFO,
)
from tunepipe.plots import plot_curves
from tunepipe.progress import duration, say
from tunepipe.tasks import get_task
from tunepipe.training import (
    build_trainer,
    class_weights,
    fingerprint,
    history_curves,
    resumable_checkpoint,
    training_mfu,
)


def main() -> None:
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    if p.finetune.method == "setfit":  # setfit's own trainer, one process
        train_setfit(p)
        return
    nproc = distributed.requested_processes()
    if nproc > 1 and not distributed.launched():  # TUNEPIPE_NPROC: this stage again, as nproc processes
        distributed.per_device_batch(p.finetune.batch_size, nproc)  # its error once, from here
        sys.exit(distributed.relaunch("stages.finetune", nproc, "finetune"))
    distributed.init()
    train(p)
    distributed.finish()  # not on an error: the group may be gone, and the process exits anyway


def train(p) -> None:
    """Every process trains; rank 0 alone decides (resume, precision, MLflow run) and writes."""
    main_rank, processes = distributed.is_main(), distributed.world_size()
    per_device = distributed.per_device_batch(p.finetune.batch_size, processes)
    tracking.check_reachable(p.tracking)  # before training, not after it
    metric = get_task(p.task).headline_metric
    meta = read_json(PREPARED_META)
    labels = meta["labels"]
    dsd = datasets.load_from_disk(str(AUGMENTED))
    fp = fingerprint(p, meta["data_hash"])
    weights = class_weights(p, dsd["train"], labels)  # a label finetune.class_weights names wrongly stops here

    decided = None
    if main_rank:
        device, precision = device_name(), pick_precision(p.finetune.precision)
        resume_from, run_id = resumable_checkpoint(CHECKPOINTS, fp)
        if resume_from is None:
            shutil.rmtree(CHECKPOINTS, ignore_errors=True)
        CHECKPOINTS.mkdir(parents=True, exist_ok=True)
        run_id = tracking.start_training_run(p, run_id, meta, fp, device, precision)
        write_json(CHECKPOINTS / "state.json", {"fingerprint": fp, "run_id": run_id, "status": "running"})
        # Why `auto` chose: on a CPU with native bf16 instructions, a measured matmul decides (modeling.py).
        bf16_speedup = cpu_bf16_speedup() if p.finetune.precision == "auto" and device.startswith("cpu") else None
        decided = device, precision, resume_from, run_id, bf16_speedup
    # The other processes take rank 0's choices: `auto` precision measures a matmul, which could come out
    # differently in each process.
    device, precision, resume_from, run_id, bf16_speedup = distributed.from_main(decided)
    batch = (f", batch {p.finetune.batch_size} = {processes} processes x {per_device} per device"
             if processes > 1 else "")
    if main_rank:
        say(f"finetune: {device}, precision {precision} (finetune.precision: {p.finetune.precision})"
            + (f", bf16 matmul {bf16_speedup}x fp32 here" if bf16_speedup else "") + batch + f", MLflow run {run_id}"
            + (f", resuming from {resume_from}" if resume_from else ""))

    callbacks = [tracking.MlflowMetricsCallback(run_id)] if main_rank else []
    trainer = build_trainer(p, dsd, labels, str(CHECKPOINTS), callbacks, precision=precision)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as exc:
        if processes > 1 and distributed.lost_peer(exc):
            # The launcher names the process that died; this one's traceback would say nothing more.
            print(f"finetune: rank {distributed.rank()}: lost contact with the other training processes",
                  file=sys.stderr, flush=True)
            # Now: exit handlers would still be running when torchrun's SIGTERM comes, and print a traceback.
            os._exit(distributed.LOST_CONTACT)
        raise
    # Every process has loaded the best model from the checkpoints; rank 0 deletes them at the end.
    distributed.barrier()
    extra = get_task(p.task).trained_metadata(trainer, dsd, labels, p)  # e.g. thresholds tuned on validation
    if main_rank:
        save(p, trainer, result, meta, labels, fp, weights, metric, run_id, resume_from, device, precision,
             bf16_speedup, extra)


def save(p, trainer, result, meta: dict, labels: list[str], fp: str, weights: list[float] | None, metric: str,
         run_id: str, resume_from: str | None, device: str, precision: str, bf16_speedup: float | None,
         extra: dict) -> None:
    """Rank 0: the model, its metadata, the report and plots; the MLflow run's metrics and artifacts."""
    best = trainer.state.best_metric
    runtime = result.metrics["train_runtime"]
    summary = {
        f"best_val_{metric}": best,
        "best_step": int(trainer.state.best_global_step or trainer.state.global_step),
        "global_step": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_runtime_s": round(runtime, 1),
        "train_tokens_per_s": None if resume_from else round(trainer.state.num_input_tokens_seen / max(runtime, 1e-9),
                                                             1),
        "resumed_from": Path(resume_from).name if resume_from else None,
        "device": device,
        "precision": precision,
        "precision_requested": p.finetune.precision,
        # finetune.batch_size is the global batch: per device x processes x gradient accumulation
        "processes": trainer.args.world_size,
        "per_device_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "effective_batch_size": trainer.args.per_device_train_batch_size * trainer.args.world_size
        * trainer.args.gradient_accumulation_steps,
        "cpu_bf16_matmul_speedup": bf16_speedup,
        # Model FLOPs utilisation: FLOPs per real token x tokens/s over the peak matmul rate in this precision,
        # measured here and now (training.training_mfu); train_runtime includes validation and checkpoints.
        **training_mfu(trainer.model, trainer.train_dataset, p, None if resume_from else
                       trainer.state.num_input_tokens_seen / max(runtime, 1e-9), precision, trainer.args.world_size),
        # finetune.class_weights as applied: {label: loss weight}, None = unweighted
        "class_weights": dict(zip(labels, (round(w, 6) for w in weights), strict=True)) if weights else None,
        "adversarial": adversarial_info(p),
    }
    model = merge_for_export(trainer.model)
    with atomic_dir(MODEL) as tmp:
        model.save_pretrained(tmp)  # safetensors
        trainer.processing_class.save_pretrained(tmp)
        # The model's own metadata: everything downstream reads the task and labels from here, not from params.
        write_json(tmp / TRAINING_INFO, {"run_id": run_id, "task": p.task, "labels": labels, "fingerprint": fp,
                                         "data_hash": meta["data_hash"], "test_data_hash": meta["hashes"]["test"],
                                         "max_length": p.tokenize.max_length, **long_text_info(p), **summary,
                                         **extra})

    loss, val = history_curves(trainer.state.log_history, metric)
    write_reports(loss, val, metric, summary)

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    speed = {k: summary[k] for k in ("train_tokens_per_s", "achieved_gflops", "peak_matmul_gflops", "mfu")
             if summary[k] is not None}  # none of them for a resumed run's rate, which covers only its last part
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, trainer.state.global_step) for k, v in
                                      {f"best_val_{metric}": best or 0.0, **speed}.items()])
    client.log_artifact(run_id, str(PLOTS / "training_curves.png"), "plots")
    if weights:  # the param says `balanced`; the tag says what that came to on this data
        client.set_tag(run_id, "tunepipe.class_weights", json.dumps(summary["class_weights"]))
    client.set_tag(run_id, "tunepipe.processes", str(summary["processes"]))  # a tag: a resume may use another count
    # The run is done once training is; checkpoints are not needed any more (the best model is saved).
    for ckpt in CHECKPOINTS.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    write_json(CHECKPOINTS / "state.json", {"fingerprint": fp, "run_id": run_id, "status": "complete"})
    rate = (f", {summary['train_tokens_per_s']:,.0f} real tokens/s, MFU {summary['mfu']:.1%} of the "
            f"{summary['peak_matmul_gflops']:,.0f} GFLOP/s {precision} matmul peak" if summary["mfu"] else "")
    say(f"finetune: best validation {metric} {best:.4f} at step {summary['best_step']}/{summary['global_step']}, "
        f"trained in {duration(summary['train_runtime_s'])}{rate}")


def write_reports(loss: list[dict], val: list[dict], metric: str, summary: dict) -> None:
    """What both training paths leave for `dvc plots` and `dvc metrics`: the loss and validation curves (CSV and
    PNG) and reports/train.json."""
    write_csv(PLOTS / "train_loss.csv", loss, ["step", "loss"])
    write_csv(PLOTS / "validation.csv", val, ["step", metric])
    plot_curves(loss, val, metric, PLOTS / "training_curves.png")
    write_json(TRAIN_REPORT, summary)


def train_setfit(p) -> None:
    """finetune.method: setfit (tunepipe/fewshot.py): the same outputs as a Trainer run (models/model with its
    metadata, reports/train.json, the plots, the MLflow run), so evaluate, export and promote need nothing else."""
    if distributed.requested_processes() > 1:
        raise UserError("finetune.method: setfit trains in one process; unset TUNEPIPE_NPROC")
    tracking.check_reachable(p.tracking)
    task = get_task(p.task)
    metric = task.headline_metric
    meta = read_json(PREPARED_META)
    labels = meta["labels"]
    fp = fingerprint(p, meta["data_hash"])
    device, precision = device_name(), "fp32"
    shutil.rmtree(CHECKPOINTS, ignore_errors=True)  # nothing to resume: a few-shot run is short
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_training_run(p, None, meta, fp, device, precision)
    write_json(CHECKPOINTS / "state.json", {"fingerprint": fp, "run_id": run_id, "status": "running"})
    say(f"finetune: setfit on {device}, precision {precision}, MLflow run {run_id}")
    validation = datasets.load_from_disk(str(AUGMENTED))["validation"]
    out = fewshot.train(p, task, PREPARED, validation, labels)
    best = out["val"][metric]
    steps = out["summary"]["body_steps"]
    summary = {f"best_val_{metric}": best, "best_step": steps, "global_step": steps, "epochs": p.finetune.epochs,
               "device": device, "precision": precision, "precision_requested": p.finetune.precision,
               **out["summary"]}
    with atomic_dir(MODEL) as tmp:
        out["model"].save_pretrained(tmp)  # safetensors; serving/sentence_classifier.py loads it
        out["tokenizer"].save_pretrained(tmp)
        write_json(tmp / TRAINING_INFO, {"run_id": run_id, "task": p.task, "labels": labels, "fingerprint": fp,
                                         "data_hash": meta["data_hash"], "test_data_hash": meta["hashes"]["test"],
                                         "max_length": p.tokenize.max_length, **long_text_info(p), **summary})
    loss, val = out["loss"], [{"step": steps, metric: best}]
    write_reports(loss, val, metric, summary)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"best_val_{metric}", float(best), now, steps),
                                      *(mlflow.entities.Metric("train_loss", r["loss"], now, r["step"]) for r in loss)])
    client.log_artifact(run_id, str(PLOTS / "training_curves.png"), "plots")
    client.set_tag(run_id, "tunepipe.method", "setfit")
    write_json(CHECKPOINTS / "state.json", {"fingerprint": fp, "run_id": run_id, "status": "complete"})
    say(f"finetune: setfit on {summary['train_examples']} texts, validation {metric} {best:.4f}, trained in "
        f"{duration(summary['train_runtime_s'])}")


def adversarial_info(p) -> dict | None:
    """finetune.adversarial as trained: None, or the method with the settings it uses."""
    ft = p.finetune
    if ft.adversarial == "none":
        return None
    return {"method": ft.adversarial, "epsilon": ft.adversarial_epsilon,
            **({"steps": ft.adversarial_steps, "alpha": ft.adversarial_alpha} if ft.adversarial == "pgd" else {})}


def long_text_info(p) -> dict:
    """How this model reads a text longer than max_length; evaluate and the served model do the same."""
    t = p.tokenize
    return {"long_text": t.long_text, **({"stride": t.stride, "window_aggregation": t.window_aggregation}
                                         if t.long_text == "window" else {})}


if __name__ == "__main__":
    run_main(main)
