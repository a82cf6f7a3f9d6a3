"""Stage finetune: train the task head (and encoder, or LoRA adapters) with HF Trainer; log to MLflow.

Checkpoints go to models/checkpoints (a persistent DVC out): a run killed mid-epoch resumes from its last
checkpoint on the next `dvc repro`, as long as params and data are unchanged (else it starts over).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import datasets
import mlflow

from tunepipe import tracking
from tunepipe.errors import run_main
from tunepipe.files import atomic_dir, read_json, write_json
from tunepipe.modeling import device_name, merge_for_export, pick_precision
from tunepipe.params import Params, load_params
from tunepipe.paths import AUGMENTED, CHECKPOINTS, MODEL, PLOTS, PREPARED_META, TRAIN_REPORT, TRAINING_INFO
from tunepipe.plots import plot_curves
from tunepipe.progress import duration, say
from tunepipe.training import build_trainer, headline_metric, history_curves


def fingerprint(p: Params, data_hash: str) -> str:
    """What makes checkpoints reusable: the same data and every param that shapes training."""
    keys = {k: v for k, v in p.model_dump().items() if k in ("task", "model", "tokenize", "augment", "finetune")}
    return hashlib.sha256(json.dumps([keys, data_hash], sort_keys=True).encode()).hexdigest()[:16]


def resumable_checkpoint(ckpt_dir: Path, fp: str) -> tuple[str | None, str | None]:
    """(latest checkpoint, its MLflow run id) if an interrupted run with this fingerprint left one."""
    state_file = ckpt_dir / "state.json"
    if state_file.is_file():
        state = read_json(state_file)
        ckpts = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
        ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]  # skip half-written ones
        if state.get("fingerprint") == fp and state.get("status") == "running" and ckpts:
            return str(ckpts[-1]), state.get("run_id")
    return None, None


def start_run(p: Params, run_id: str | None, meta: dict, fp: str) -> str:
    exp_id = tracking.setup(p.tracking)
    client = mlflow.MlflowClient()
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was reset meanwhile: start a new run
    run = client.create_run(exp_id, tags={
        "tunepipe.git_commit": tracking.git_commit() or "unknown",
        "tunepipe.data_hash": meta["data_hash"],
        "tunepipe.test_data_hash": meta["hashes"]["test"],
        "tunepipe.fingerprint": fp,
        "tunepipe.task": p.task,
        "tunepipe.device": device_name(),
        "tunepipe.precision": pick_precision(p.finetune.precision),
        "mlflow.runName": f"repro-{time.strftime('%Y%m%d-%H%M%S')}",
    })
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000])
                                              for k, v in tracking.flat_params(p).items()])
    return run.info.run_id


def main() -> None:
    datasets.disable_caching()  # cache files would land inside upstream outputs and dirty them for DVC
    p = load_params()
    meta = read_json(PREPARED_META)
    labels = meta["labels"]
    dsd = datasets.load_from_disk(str(AUGMENTED))
    fp = fingerprint(p, meta["data_hash"])

    resume_from, run_id = resumable_checkpoint(CHECKPOINTS, fp)
    if resume_from is None:
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    run_id = start_run(p, run_id, meta, fp)
    write_json(CHECKPOINTS / "state.json", {"fingerprint": fp, "run_id": run_id, "status": "running"})
    say(f"finetune: {device_name()}, precision {pick_precision(p.finetune.precision)} "
        f"(finetune.precision: {p.finetune.precision}), MLflow run {run_id}"
        + (f", resuming from {resume_from}" if resume_from else ""))

    trainer = build_trainer(p, dsd, labels, str(CHECKPOINTS), [tracking.MlflowMetricsCallback(run_id)])
    result = trainer.train(resume_from_checkpoint=resume_from)

    metric = headline_metric(p.task)
    best = trainer.state.best_metric
    summary = {
        f"best_val_{metric}": best,
        "best_step": int(trainer.state.best_global_step or trainer.state.global_step),
        "global_step": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_runtime_s": round(result.metrics["train_runtime"], 1),
        "train_tokens_per_s": round(trainer.state.num_input_tokens_seen / max(result.metrics["train_runtime"], 1e-9)
                                    , 1) if not resume_from else None,
        "resumed_from": Path(resume_from).name if resume_from else None,
        "device": device_name(),
        "precision": pick_precision(p.finetune.precision),
        "precision_requested": p.finetune.precision,
    }
    model = merge_for_export(trainer.model)
    with atomic_dir(MODEL) as tmp:
        model.save_pretrained(tmp)  # safetensors
        trainer.processing_class.save_pretrained(tmp)
        write_json(tmp / TRAINING_INFO, {"run_id": run_id, "task": p.task, "labels": labels, "fingerprint": fp,
                                "data_hash": meta["data_hash"], "test_data_hash": meta["hashes"]["test"],
                                "max_length": p.tokenize.max_length, **summary})

    loss, val = history_curves(trainer.state.log_history, metric)
    PLOTS.mkdir(parents=True, exist_ok=True)
    _write_csv(PLOTS / "train_loss.csv", loss, ["step", "loss"])
    _write_csv(PLOTS / "validation.csv", val, ["step", metric])
    plot_curves(loss, val, metric, PLOTS / "training_curves.png")
    write_json(TRAIN_REPORT, summary)

    client = mlflow.MlflowClient()
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"best_val_{metric}", float(best or 0.0),
                                                             int(time.time() * 1000), trainer.state.global_step)])
    client.log_artifact(run_id, str(PLOTS / "training_curves.png"), "plots")
    # The run is done once training is; checkpoints are not needed any more (the best model is saved).
    for ckpt in CHECKPOINTS.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    write_json(CHECKPOINTS / "state.json", {"fingerprint": fp, "run_id": run_id, "status": "complete"})
    rate = f", {summary['train_tokens_per_s']:,.0f} real tokens/s" if summary["train_tokens_per_s"] else ""
    say(f"finetune: best validation {metric} {best:.4f} at step {summary['best_step']}/{summary['global_step']}, "
        f"trained in {duration(summary['train_runtime_s'])}{rate}")


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    from tunepipe.files import write_text

    write_text(path, ",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))


if __name__ == "__main__":
    run_main(main)
