"""The training loop shared by the finetune stage and sweeps: HF Trainer with early stopping on validation, and
what makes an interrupted run resumable.

One function builds the Trainer from params, so a sweep trial trains exactly as `dvc repro` does.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import datasets
import torch
import transformers
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from tunepipe.files import read_json
from tunepipe.modeling import build_model, load_tokenizer, pick_precision
from tunepipe.params import Params
from tunepipe.progress import Progress
from tunepipe.tasks import get_task


def training_arguments(p: Params, metric: str, output_dir: str, precision: str, save_checkpoints: bool = True
                       ) -> TrainingArguments:
    """save_checkpoints=False (sweep trials): no checkpoint writes; best_metric and early stopping still work."""
    ft = p.finetune
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=ft.learning_rate,
        per_device_train_batch_size=ft.batch_size,
        per_device_eval_batch_size=max(ft.batch_size, 64),
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps or -1,
        weight_decay=ft.weight_decay,
        warmup_steps=ft.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        lr_scheduler_type="linear",
        max_grad_norm=ft.max_grad_norm,
        eval_strategy="steps",
        eval_steps=ft.eval_steps,
        save_strategy="steps" if save_checkpoints else "no",
        save_steps=ft.eval_steps,
        save_total_limit=2,  # the best checkpoint is always kept on top of these
        load_best_model_at_end=save_checkpoints,
        metric_for_best_model=metric,
        greater_is_better=True,
        logging_steps=max(1, ft.eval_steps // 4),
        logging_first_step=True,
        train_sampling_strategy="group_by_length",  # dynamic padding wastes little when lengths are alike
        length_column_name="length",
        include_num_input_tokens_seen="non_padding",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Without a GPU, Trainer refuses bf16 unless told the CPU is meant (bf16 autocast on CPU is supported).
        use_cpu=not torch.cuda.is_available(),
        seed=ft.seed,
        data_seed=ft.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def build_trainer(p: Params, dsd: datasets.DatasetDict, labels: list[str], output_dir: str,
                  callbacks: list[TrainerCallback] = (), save_checkpoints: bool = True) -> Trainer:
    """The task (params' `task`) gives the head, the collator and the validation metrics; the rest is shared."""
    task = get_task(p.task)
    transformers.set_seed(p.finetune.seed)  # the fresh head's init depends on it too
    tokenizer = load_tokenizer(p.model.name)
    model = build_model(p.model.name, labels, p.finetune, task, pad_token_id=tokenizer.pad_token_id)
    precision = pick_precision(p.finetune.precision)
    trainer = WindowedTrainer(
        model=model,
        args=training_arguments(p, task.headline_metric, output_dir, precision, save_checkpoints),
        train_dataset=dsd["train"],
        eval_dataset=dsd["validation"],
        processing_class=tokenizer,
        data_collator=task.collator(tokenizer),
        compute_metrics=task.validation_metrics(labels, dsd["validation"], p),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=p.finetune.early_stopping_patience),
                   TrainerProgress(task.headline_metric), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log as a Python dict
    return trainer


class WindowedTrainer(Trainer):
    """Trainer that validates a split of windows (a text_id column, tokenize.long_text: window) in split order:
    Trainer would group validation batches by length like training ones, and compute_metrics finds each window's
    text by its position."""

    def _get_eval_sampler(self, eval_dataset):
        if "text_id" in getattr(self.eval_dataset, "column_names", ()):
            return torch.utils.data.SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)


def history_curves(log_history: list[dict], metric: str) -> tuple[list[dict], list[dict]]:
    """Trainer's log history -> (train loss by step, validation metric by step)."""
    loss = [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h]
    val = [{"step": h["step"], metric: h[f"eval_{metric}"]} for h in log_history if f"eval_{metric}" in h]
    return loss, val


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


class TrainerProgress(TrainerCallback):
    """Training steps with rate, real tokens/s and ETA; one line per validation; no per-step dicts.

    Replaces Trainer's PrinterCallback (which prints every log as a Python dict when tqdm is off)."""

    def __init__(self, metric: str | None = None, label: str = "train"):
        self.metric, self.label = metric, label
        self.bar: Progress | None = None
        self.eval_bar: Progress | None = None
        self.loss: float | None = None
        self.best: float | None = None
        self.tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = Progress(self.label, state.max_steps, "steps", start=state.global_step)
            self.tokens0 = state.num_input_tokens_seen or 0
            self.best = state.best_metric  # restored from the checkpoint when resuming

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        elapsed = max(time.monotonic() - self.bar.t0, 1e-9)
        tokens = ((state.num_input_tokens_seen or 0) - self.tokens0) / elapsed
        extra = (f", {tokens:,.0f} tokens/s" if tokens else "") + (f", loss {self.loss:.4f}" if self.loss else "")
        self.bar.update(state.global_step - self.bar.n, extra=extra)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            total = len(eval_dataloader) if eval_dataloader is not None else 1
            self.eval_bar = Progress("  validation" if self.bar else "predict", total, "batches",
                                     log=self.bar is None)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.on_predict(args, state, control)
        if self.bar is None or not metrics or not state.is_world_process_zero:
            return
        key = f"eval_{self.metric}" if self.metric and f"eval_{self.metric}" in metrics else None
        value = f"{self.metric} {metrics[key]:.4f}" if key else ", ".join(
            f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        best = ""
        if key:  # Trainer updates state.best_metric only after this event
            self.best = metrics[key] if self.best is None else max(self.best, metrics[key])
            best = f" (best {self.best:.4f})"
        self.bar.message(f"  step {state.global_step}/{state.max_steps}: validation {value}{best}")

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        """The end of a prediction pass (and of each validation, through on_evaluate): clear its bar."""
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
