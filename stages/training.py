"""The training loop shared by the finetune stage and sweeps: HF Trainer with early stopping on validation.

One function builds the Trainer from params, so a sweep trial trains exactly as `dvc repro` does.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
import transformers
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from stages.modeling import build_model, load_tokenizer, pick_precision
from stages.params import Params

# Columns the model does not take; kept in the datasets for reports and length grouping.
EXTRA_COLUMNS = ("length",)


def headline_metric(task: str) -> str:
    """Validation metric early stopping and model selection watch (entity-level F1 for NER)."""
    return "f1" if task == "ner" else "macro_f1"


def classification_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(-1)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro"))}


def training_arguments(p: Params, output_dir: str, precision: str, save_checkpoints: bool = True) -> TrainingArguments:
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
        metric_for_best_model=headline_metric(p.task),
        greater_is_better=True,
        logging_steps=max(1, ft.eval_steps // 4),
        logging_first_step=True,
        train_sampling_strategy="group_by_length",  # dynamic padding wastes little when lengths are alike
        length_column_name="length",
        include_num_input_tokens_seen="non_padding",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=ft.seed,
        data_seed=ft.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def build_trainer(p: Params, dsd: datasets.DatasetDict, labels: list[str], output_dir: str,
                  callbacks: list[TrainerCallback] = (), save_checkpoints: bool = True) -> Trainer:
    transformers.set_seed(p.finetune.seed)  # the fresh head's init depends on it too
    tokenizer = load_tokenizer(p.model.name)
    model = build_model(p.model.name, labels, p.finetune, task=p.task)
    precision = pick_precision(p.finetune.precision)
    if p.task == "ner":
        from transformers import DataCollatorForTokenClassification

        from stages.ner_metrics import ner_metrics

        collator = DataCollatorForTokenClassification(tokenizer)
        compute = ner_metrics(labels)
    else:
        collator = DataCollatorWithPadding(tokenizer)
        compute = classification_metrics
    return Trainer(
        model=model,
        args=training_arguments(p, output_dir, precision, save_checkpoints),
        train_dataset=dsd["train"],
        eval_dataset=dsd["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=p.finetune.early_stopping_patience),
                   *callbacks],
    )


def history_curves(log_history: list[dict], metric: str) -> tuple[list[dict], list[dict]]:
    """Trainer's log history -> (train loss by step, validation metric by step)."""
    loss = [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h]
    val = [{"step": h["step"], metric: h[f"eval_{metric}"]} for h in log_history if f"eval_{metric}" in h]
    return loss, val
