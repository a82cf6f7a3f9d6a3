"""finetune.method: setfit: few-shot training with the `setfit` library, for tasks with one label per text.

SetFit (Tunstall et al., 2022) fine-tunes a sentence-embedding body contrastively on pairs of train texts (same
label = similar, different labels = dissimilar), then trains a classification head on the tuned embeddings. Here
the head is setfit's differentiable SetFitHead (one linear layer), and the result is written as a
SentenceEmbeddingClassifier (serving/sentence_classifier.py: body + mean pooling + L2 normalisation + linear),
the model evaluate, export (ONNX, parity) and the registry then handle like any other.

The body is model.name loaded by sentence-transformers: a sentence-transformers model (modules.json, e.g. the
embedded all-MiniLM-L6-v2: Transformer, mean Pooling, Normalize) as it is; a plain transformers encoder gets mean
pooling (sentence-transformers' default), and the head always sees normalised embeddings, as the saved model
computes them. A body that pools any other way (CLS, max) is refused: the saved model could not reproduce it.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch

from tunepipe.errors import UserError
from tunepipe.modeling import ensure_pad_token, load_tokenizer, resolve_model
from tunepipe.params import Params
from tunepipe.serving.sentence_classifier import SentenceEmbeddingClassifier
from tunepipe.tasks import Task


def sentence_body(p: Params, device: str):
    """model.name as a sentence-transformers model; (body, whether it normalises its embeddings itself)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    path = resolve_model(p.model.name)
    try:
        body = SentenceTransformer(path, device=device, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name: could not load '{p.model.name}' as a sentence-embedding body for "
                        f"finetune.method: setfit: {str(exc).splitlines()[0]}") from None
    ensure_pad_token(body.tokenizer, p.model.name)  # GPT-2 style tokenizers: pad with end-of-sequence, as training
    modules = list(body)
    pooling = next((m for m in modules if isinstance(m, Pooling)), None)
    rest = [m for m in modules[1:] if m is not pooling and not isinstance(m, Normalize)]
    if (not isinstance(modules[0], Transformer) or pooling is None or pooling.pooling_mode != "mean"
            or not pooling.include_prompt or rest):
        kinds = ", ".join(type(m).__name__ + (f"({m.pooling_mode})" if m is pooling else "") for m in modules)
        raise UserError(f"model.name: '{p.model.name}' is a sentence-transformers model made of {kinds}; "
                        "finetune.method: setfit needs Transformer + mean Pooling (+ Normalize), the pipeline the "
                        "exported model reproduces")
    normalizes = any(isinstance(m, Normalize) for m in modules)
    body.max_seq_length = p.tokenize.max_length
    return body, normalizes


def train_texts(prepared: Path, labels: list[str]) -> tuple[list[str], list[int]]:
    df = pd.read_parquet(prepared / "train.parquet")
    ids = {label: i for i, label in enumerate(labels)}
    return df["text"].tolist(), [ids[label] for label in df["label"]]


@contextlib.contextmanager
def quiet_setfit():
    """setfit's own chatter (its "Running training" banner, the pair dataset's map bar, a pin_memory warning from
    its head's data loader on CPU) is nothing a person acts on; TUNEPIPE_DEBUG=1 keeps it."""
    if os.environ.get("TUNEPIPE_DEBUG"):
        yield
        return
    import setfit

    verbosity = setfit.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    setfit.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true")
            yield
    finally:
        setfit.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


class LossLog:
    """The body's contrastive loss per logged step (setfit passes transformers callbacks to its body trainer)."""

    def __init__(self):
        from transformers import TrainerCallback

        rows: list[dict] = []

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("embedding_loss", (logs or {}).get("loss"))
                if loss is not None:
                    rows.append({"step": state.global_step, "loss": float(loss)})

        self.rows, self.callback = rows, _Callback()


def train(p: Params, task: Task, prepared: Path, validation: datasets.Dataset, labels: list[str]) -> dict:
    """Contrastive body training then the head (setfit.Trainer); returns what finetune saves: the model (a
    SentenceEmbeddingClassifier), its tokenizer, the loss curve, validation metrics and a summary."""
    from setfit import SetFitModel, Trainer, TrainingArguments
    from setfit.modeling import SetFitHead
    from transformers import PrinterCallback

    ft = p.finetune
    device = "cuda" if torch.cuda.is_available() else "cpu"
    texts, label_ids = train_texts(prepared, labels)
    torch.manual_seed(ft.seed)  # the head's initial weights
    body, normalizes = sentence_body(p, device)
    dim = body.get_embedding_dimension()
    head = SetFitHead(in_features=dim, out_features=len(labels), device=device)
    # normalize_embeddings: the head trains on unit vectors even where the body has no Normalize module.
    model = SetFitModel(model_body=body, model_head=head, normalize_embeddings=not normalizes, labels=labels)
    args = TrainingArguments(
        output_dir=str(Path("models/checkpoints") / "setfit"),  # setfit's body trainer wants one; nothing is saved
        batch_size=(ft.batch_size, ft.batch_size),
        num_epochs=(max(1, round(ft.epochs)), ft.setfit_head_epochs),
        max_steps=ft.max_steps or -1,
        num_iterations=ft.setfit_iterations,
        body_learning_rate=(ft.learning_rate, ft.learning_rate),
        head_learning_rate=ft.setfit_head_learning_rate,
        l2_weight=ft.weight_decay,
        warmup_proportion=ft.warmup_ratio,
        end_to_end=False,  # the head trains on the frozen tuned body (SetFit's recipe)
        max_length=p.tokenize.max_length,
        use_amp=False,  # fp32: the few-shot runs are small, and the parity check compares fp32 logits
        seed=ft.seed,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, ft.eval_steps // 4),
        show_progress_bar=False,
    )
    log = LossLog()
    t0 = time.time()
    with quiet_setfit():
        trainer = Trainer(model=model, args=args, callbacks=[log.callback],
                          train_dataset=datasets.Dataset.from_dict({"text": texts, "label": label_ids}))
        trainer.remove_callback(PrinterCallback)  # it prints every log as a Python dict; the summary line says it
        trainer.train()
    runtime = time.time() - t0

    classifier = to_classifier(model, labels, normalizes)
    tokenizer = load_tokenizer(p.model.name)
    logits, gold = task.calibration_data(classifier, tokenizer, validation, {})
    val = task.compute_metrics(labels)((logits, gold))
    steps = log.rows[-1]["step"] if log.rows else 0
    summary = {"method": "setfit", "train_examples": len(texts), "setfit_iterations": ft.setfit_iterations,
               "body_steps": steps, "head_epochs": ft.setfit_head_epochs, "train_runtime_s": round(runtime, 1),
               "validation": {k: round(v, 6) for k, v in val.items()}}
    return {"model": classifier, "tokenizer": tokenizer, "loss": log.rows, "val": val, "summary": summary,
            "setfit": model}


def to_classifier(model, labels: list[str], normalizes: bool) -> SentenceEmbeddingClassifier:
    """setfit's model as one torch module: the tuned transformer weights, and the head's linear layer with its
    temperature folded in (SetFitHead divides the logits by temperature + eps)."""
    from sentence_transformers.sentence_transformer.modules import Transformer

    transformer = next(m for m in model.model_body if isinstance(m, Transformer))
    encoder = transformer.auto_model
    config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    out = SentenceEmbeddingClassifier(config)
    missing, unexpected = out.body.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:
        raise RuntimeError(f"setfit body weights do not fit the saved model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if missing:  # an encoder loaded without BERT's (unused) pooler: keep the keys, zeroed, so the file loads
        for k in missing:
            out.body.state_dict()[k].zero_()
    head = model.model_head
    scale = 1.0 / (head.temperature + head.eps)
    with torch.no_grad():
        out.classifier.weight.copy_(head.linear.weight.detach().cpu() * scale)
        out.classifier.bias.copy_(head.linear.bias.detach().cpu() * scale)
    return out.cpu().eval()


def check_head_matches(model, classifier: SentenceEmbeddingClassifier, tokenizer, texts: list[str]) -> float:
    """Max |probability| difference between setfit's own predict_proba and the saved model's softmax (tests)."""
    ref = model.predict_proba(texts, as_numpy=True)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=model.model_body.max_seq_length,
                    return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(classifier(**enc).logits, -1).numpy()
    return float(np.abs(np.asarray(ref) - probs).max())
