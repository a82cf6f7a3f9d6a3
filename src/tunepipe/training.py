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
import numpy as np
import torch
import transformers
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from tunepipe import distributed
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.modeling import build_model, load_tokenizer, pick_precision
from tunepipe.params import Params
from tunepipe.progress import Progress
from tunepipe.tasks import get_task


def training_arguments(p: Params, metric: str, output_dir: str, precision: str, save_checkpoints: bool = True,
                       **overrides) -> TrainingArguments:
    """save_checkpoints=False (sweep trials): no checkpoint writes; best_metric and early stopping still work.
    Under a distributed launch finetune.batch_size is the global batch, each process taking an equal share.
    overrides: other TrainingArguments (benchmarks/train_throughput.py tries e.g. torch_compile with them)."""
    ft = p.finetune
    return TrainingArguments(**{**dict(
        output_dir=output_dir,
        learning_rate=ft.learning_rate,
        per_device_train_batch_size=distributed.per_device_batch(ft.batch_size, distributed.world_size()),
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
        ddp_backend=distributed.ddp_backend(),
        # Every parameter that trains is used in each step (the task heads, LoRA's adapters): DDP need not search
        # the graph for unused ones every step (Trainer's default for a model does, and warns that it found none).
        ddp_find_unused_parameters=False,
    ), **overrides})


def class_weights(p: Params, train: datasets.Dataset, labels: list[str]) -> list[float] | None:
    """finetune.class_weights as one loss weight per label id (None: unweighted). `balanced` counts the targets
    the loss sees in `train` (texts, or labelled tokens for NER); a {label: weight} mapping leaves the labels it
    does not name at 1.0."""
    wanted = p.finetune.class_weights
    if wanted == "none":
        return None
    if isinstance(wanted, dict):
        unknown = sorted(set(wanted) - set(labels))
        if unknown:
            shown = ", ".join(labels[:30]) + (", ..." if len(labels) > 30 else "")
            raise UserError(f"finetune.class_weights: unknown label(s) {', '.join(map(repr, unknown))}; the labels of "
                            f"this data are: {shown} (see reports/data.json)")
        return [float(wanted.get(label, 1.0)) for label in labels]
    return balanced_weights(np.bincount(get_task(p.task).label_ids(train), minlength=len(labels)))


def balanced_weights(counts: np.ndarray) -> list[float]:
    """scikit-learn's `balanced` weights, n / (k * count), over the k classes that occur; a class that never
    occurs as a target (e.g. an I- tag only ever seen after truncation) gets 1.0, a weight the loss never uses."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.flatnonzero(counts)
    y = np.repeat(np.arange(len(counts)), counts)
    weights = np.ones(len(counts))
    weights[present] = compute_class_weight("balanced", classes=present, y=y)
    return [float(w) for w in weights]


def build_trainer(p: Params, dsd: datasets.DatasetDict, labels: list[str], output_dir: str,
                  callbacks: list[TrainerCallback] = (), save_checkpoints: bool = True,
                  precision: str | None = None, args_overrides: dict | None = None) -> Trainer:
    """The task (params' `task`) gives the head, the collator, the validation metrics and the loss with
    finetune.class_weights; the rest is shared. `precision`: as chosen already (by rank 0 of a distributed run,
    so that all processes agree), else picked here from finetune.precision. args_overrides: other
    TrainingArguments, for benchmarks."""
    task = get_task(p.task)
    weights = class_weights(p, dsd["train"], labels)
    transformers.set_seed(p.finetune.seed)  # the fresh head's init depends on it too
    tokenizer = load_tokenizer(p.model.name)
    model = build_model(p.model.name, labels, p.finetune, task, pad_token_id=tokenizer.pad_token_id)
    precision = precision or pick_precision(p.finetune.precision)
    trainer = _Trainer(
        model=model,
        args=training_arguments(p, task.headline_metric, output_dir, precision, save_checkpoints,
                                **(args_overrides or {})),
        train_dataset=dsd["train"],
        eval_dataset=dsd["validation"],
        processing_class=tokenizer,
        data_collator=task.collator(tokenizer),
        compute_metrics=task.validation_metrics(labels, dsd["validation"], p),
        compute_loss_func=task.loss(weights) if weights else None,  # None: the model's own (unweighted) loss
        callbacks=[EarlyStoppingCallback(early_stopping_patience=p.finetune.early_stopping_patience),
                   TrainerProgress(task.headline_metric), *callbacks],
        adversarial=EmbeddingAttack.from_params(p.finetune),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log as a Python dict
    return trainer


class EpochSeededSampler(LengthGroupedSampler):
    """Length-grouped batches whose order depends on (seed, epoch) alone. Trainer builds its length-grouped sampler
    without a generator, so each epoch's order comes from the global RNG at the epoch's start; a run resumed
    mid-epoch draws it from another RNG state and trains on other batches than the uninterrupted run did."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:  # called by Trainer (through accelerate) before each epoch
        self.generator.manual_seed(self.seed + epoch)


def perturbation_step(delta: torch.Tensor, grad: torch.Tensor | None, alpha: float, epsilon: float) -> torch.Tensor:
    """delta + alpha * grad / ||grad||, projected onto the L2 ball of radius epsilon (norms over the whole batch,
    as the FGM/PGD implementations take them over the embedding matrix). A gradient that is zero or not finite
    (an fp16 overflow step, which the grad scaler skips anyway) leaves delta where it is."""
    if grad is None:
        return delta.detach()
    norm = grad.float().norm()
    if not torch.isfinite(norm) or norm == 0:
        return delta.detach()
    moved = delta.detach().float() + alpha * grad.float() / norm
    size = moved.norm()
    if size > epsilon:
        moved = moved * (epsilon / size)
    return moved.to(delta.dtype)


class EmbeddingAttack:
    """FGM / PGD (finetune.adversarial) on the word embeddings, as a forward hook that adds a perturbation to the
    OUTPUT of the word-embedding module (model.get_input_embeddings()) rather than to its weight.

    Why the output: one code path with and without LoRA (whose frozen embedding weight gets no gradient); the
    weight is never modified, so nothing needs restoring and neither weight decay nor the optimizer can see a
    perturbed weight; and a PGD inner step takes the gradient w.r.t. the perturbation alone (autograd.grad), so the
    parameters' clean gradients need no backup either. It differs from perturbing the weight's rows only in that
    a token occurring twice in a batch gets a perturbation at each position. Padding positions get none: the loss
    does not depend on them, so their gradient is zero.
    """

    def __init__(self, method: str, epsilon: float, steps: int = 1, alpha: float | None = None):
        self.method, self.epsilon = method, epsilon
        self.steps = steps if method == "pgd" else 1
        self.alpha = alpha if method == "pgd" else epsilon  # FGM: one step of size epsilon
        self.delta: torch.Tensor | None = None  # the perturbation the hook adds; None: the hook makes a zero one

    @classmethod
    def from_params(cls, ft) -> EmbeddingAttack | None:
        if ft.adversarial == "none":
            return None
        return cls(ft.adversarial, ft.adversarial_epsilon, ft.adversarial_steps, ft.adversarial_alpha)

    def hook(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self.delta is None:  # the clean pass: a zero perturbation, whose .grad is d loss / d embeddings
            self.delta = torch.zeros_like(output, requires_grad=True)
        return output + self.delta


class _Trainer(Trainer):
    """Trainer with reproducible training batches (EpochSeededSampler), adversarial training (finetune.adversarial,
    in training_step) and, for a split of windows (a text_id column, tokenize.long_text: window), validation in
    split order: Trainer would group validation batches by length like training ones, and compute_metrics finds
    each window's text by its position."""

    def __init__(self, *args, adversarial: EmbeddingAttack | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adversarial = adversarial

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Adversarial: the clean pass (Trainer's own step, backward included) records the gradient w.r.t. the
        embeddings; PGD takes steps-1 inner steps on the perturbation alone; the last perturbed input's loss goes
        through Trainer's step too (same loss function, class weights, autocast, scaling and backward), its
        gradients adding to the clean ones. The clean loss is what is returned and logged."""
        attack = self.adversarial
        if attack is None:
            return super().training_step(model, inputs, num_items_in_batch)
        embeddings = self.accelerator.unwrap_model(model).get_input_embeddings()
        handle = embeddings.register_forward_hook(attack.hook)
        try:
            attack.delta = None
            loss = super().training_step(model, inputs, num_items_in_batch)
            delta, grad = attack.delta, attack.delta.grad
            for _ in range(attack.steps - 1):  # PGD's inner steps
                attack.delta = perturbation_step(delta, grad, attack.alpha, attack.epsilon).requires_grad_()
                delta = attack.delta
                grad = self._perturbation_grad(model, inputs, num_items_in_batch, delta)
            attack.delta = perturbation_step(delta, grad, attack.alpha, attack.epsilon)
            super().training_step(model, inputs, num_items_in_batch)
        finally:
            handle.remove()
            attack.delta = None
        return loss

    def _perturbation_grad(self, model, inputs, num_items_in_batch, delta: torch.Tensor) -> torch.Tensor:
        """d loss / d delta, leaving the parameters' gradients as they are."""
        inputs = self._prepare_inputs(inputs)
        # Past DDP's wrapper: a forward through it expects a backward (gradient sync), and this pass has none.
        model = self.accelerator.unwrap_model(model)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16: scaled as the backward is, against underflow
        (grad,) = torch.autograd.grad(loss.mean() * (scaler.get_scale() if scaler is not None else 1.0), delta)
        return grad

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        # The split as given (the argument has lost its unused columns, text_id among them).
        if "text_id" in getattr(self.eval_dataset, "column_names", ()):
            return torch.utils.data.SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)


def train_flops_per_token(model, lengths: list[int], lora: bool = False, passes: int = 1) -> float:
    """Training FLOPs per real (non-padding) token, the usual estimate (Kaplan et al. 2020, PaLM's MFU):

        (c x N + 12 x layers x hidden x (sum of len^2 / sum of len)) x passes

    N: the non-embedding parameters (model.num_parameters(exclude_embeddings=True); Trainer.floating_point_ops
    counts 6 x N per input token, padding included); c = 6 (forward 2, backward 4), or 4 with LoRA (the frozen
    weights get no gradients). The attention scores and their weighted sum cost 4 x hidden FLOPs per attended
    token per layer forward, x 3 with the backward; a token attends to its own text's `len` tokens, padding not
    counted. passes: forward-backward passes per step (adversarial training runs 2 or more)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    attended = float(np.sum(np.square(lengths, dtype=np.float64)) / max(np.sum(lengths), 1))
    attention = 12 * layers * hidden * attended if layers and hidden else 0.0
    return ((4 if lora else 6) * model.num_parameters(exclude_embeddings=True) + attention) * passes


def training_mfu(model, train: datasets.Dataset, p: Params, tokens_per_s: float | None, precision: str,
                 processes: int = 1) -> dict:
    """Model FLOPs utilisation of a finished training run: achieved FLOP/s (train_flops_per_token x real tokens/s)
    over the peak matmul rate of the precision trained in (modeling.matmul_rates, measured now, on this machine,
    x processes: each process of a distributed run has its own share of the cores or its own GPU)."""
    from tunepipe.modeling import matmul_rates

    ft = p.finetune
    lengths = train["length"] if "length" in train.column_names else [len(x) for x in train["input_ids"]]
    passes = {"none": 1, "fgm": 2, "pgd": 1 + ft.adversarial_steps}[ft.adversarial]
    per_token = train_flops_per_token(model, lengths, ft.method == "lora", passes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_rates((precision,), device)[precision] * processes
    # Significant figures, not decimals: a slow path's peak (bf16 on an AVX2-only CPU: ~1 GFLOP/s) would otherwise
    # lose the precision that mfu = achieved / peak is read back with.
    out = {"train_flops_per_token": round(per_token), "peak_matmul_gflops": float(f"{peak / 1e9:.4g}"),
           "achieved_gflops": None, "mfu": None}
    if tokens_per_s:
        achieved = per_token * tokens_per_s
        out.update(achieved_gflops=float(f"{achieved / 1e9:.4g}"), mfu=float(f"{achieved / peak:.3g}"))
    return out


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
        ckpts = [c for c in ckpts if _complete_checkpoint(c)]
        if state.get("fingerprint") == fp and state.get("status") == "running" and ckpts:
            return str(ckpts[-1]), state.get("run_id")
    return None, None


def _complete_checkpoint(ckpt: Path) -> bool:
    """Trainer writes trainer_state.json last, without a temp file: a kill can leave it missing or cut short."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


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
