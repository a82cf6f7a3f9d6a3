"""The params schema: every key in params.yaml, its type and range, in one place.

Unknown keys, wrong types and out-of-range values stop with a message naming the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunepipe.errors import UserError
from tunepipe.paths import PARAMS_FILE
from tunepipe.tasks import available


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: str = "builtin:tweets"
    text_column: str = "text"
    label_column: str = "sentiment"
    encoding: str | None = None
    max_train_samples: int | None = Field(default=None, gt=0)
    validation_size: float = Field(default=0.1, gt=0, lt=0.5)
    test_size: float = Field(default=0.1, gt=0, lt=0.5)
    seed: int = 42
    # NER only: tag scheme of the CoNLL tags (auto = detect).
    tag_scheme: Literal["auto", "IOB1", "IOB2", "BIO", "BIOES"] = "auto"
    # csv/tsv: True = the first row names the columns; False = no header (columns are named 0, 1, 2, ...);
    # a list = the column names of a header-less file.
    header: bool | list[str] = True
    # multilabel only: what separates the labels in one label cell ("a|b"); lists in JSONL/parquet need none.
    label_delimiter: str = Field(default="|", min_length=1)
    # multilabel only: one 0/1 column per label, instead of data.label_column.
    label_columns: list[str] | None = None
    # multilabel only: a file with one label name per line; the data's labels are 0-based ids into it.
    label_names: str | None = None
    # evaluate's zero-shot baseline: a sentence per label to embed instead of its name ({label: sentence}).
    label_descriptions: dict[str, str] | None = None

    @field_validator("label_descriptions", mode="before")
    @classmethod
    def _descriptions(cls, v: object) -> object:
        if v is None:
            return v
        if not isinstance(v, dict) or not v:
            raise ValueError(f"expected null or a mapping {{label: \"a sentence\"}}, got {v!r}")
        for label, text in v.items():
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"the description of label {label!r} must be a non-empty sentence, got {text!r}")
        return {str(label): text.strip() for label, text in v.items()}  # YAML reads a label 1 as a number

    # Few-shot: k train examples per class, a seeded stratified sample (data.seed) of the train split; null = all.
    train_per_class: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_train_cap(self) -> DataParams:
        if self.train_per_class is not None and self.max_train_samples is not None:
            raise ValueError("set data.train_per_class or data.max_train_samples, not both (one of them null)")
        return self


class ModelParams(_Section):
    name: str = "builtin:minilm-l6"


class TokenizeParams(_Section):
    max_length: int = Field(default=64, ge=8, le=4096)
    # NER only: give every sub-token its word's tag instead of -100 after the first.
    label_all_subtokens: bool = False
    # Texts longer than max_length: truncate (keep the start) or window (overlapping windows, each carrying the
    # text's label in training; their logits aggregated back to one prediction per text). Classification only.
    long_text: Literal["truncate", "window"] = "truncate"
    stride: int = Field(default=16, ge=0)  # window: tokens shared by consecutive windows
    window_aggregation: Literal["mean", "max"] = "mean"  # window: how a text's window logits become one


class AugmentParams(_Section):
    method: Literal["none", "token_mask", "random_deletion", "span_cutoff", "entity_swap"] = "none"
    ratio: float = Field(default=0.0, ge=0, le=10)
    probability: float = Field(default=0.15, gt=0, lt=1)
    seed: int = 7


class FinetuneParams(_Section):
    learning_rate: float = Field(default=8e-5, gt=0, lt=1)
    batch_size: int = Field(default=32, ge=1, le=4096)
    epochs: float = Field(default=1.0, gt=0, le=100)
    max_steps: int | None = Field(default=None, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0, lt=1)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    eval_steps: int = Field(default=200, ge=1)
    early_stopping_patience: int = Field(default=3, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # full: every weight trains (HF Trainer); lora: LoRA adapters (peft), merged at the end; setfit: few-shot
    # SetFit (contrastive pairs tune the sentence-embedding body, then a linear head on its normalized mean-pooled
    # embedding), classification only.
    method: Literal["full", "lora", "setfit"] = "full"
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 42
    # Loss weight per class: none, balanced (n / (k * count), from the train split) or {label: weight}.
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    # Adversarial training on the word embeddings: fgm (one step of size epsilon) | pgd (steps of size alpha,
    # projected onto the epsilon ball); the loss of the perturbed input is added to the clean one.
    adversarial: Literal["none", "fgm", "pgd"] = "none"
    adversarial_epsilon: float = Field(default=1.0, gt=0, lt=math.inf)
    adversarial_steps: int = Field(default=3, ge=1, le=100)  # pgd: forward-backward passes on top of the clean one
    adversarial_alpha: float = Field(default=0.3, gt=0, lt=math.inf)  # pgd: step size (<= adversarial_epsilon)
    # setfit: contrastive pairs generated per train example (setfit's num_iterations); the body trains `epochs`
    # over them at `learning_rate` with `batch_size`.
    setfit_iterations: int = Field(default=20, ge=1, le=1000)
    setfit_head_epochs: int = Field(default=25, ge=1, le=1000)  # setfit: epochs of the head on frozen embeddings
    setfit_head_learning_rate: float = Field(default=1e-2, gt=0, lt=10)  # setfit: the head's learning rate

    @model_validator(mode="before")
    @classmethod
    def _peft_renamed(cls, v: object) -> object:
        """finetune.peft (none | lora) became finetune.method (full | lora | setfit): a params file that still has it
        stops with the new spelling rather than "unknown key" (an alias would let both keys disagree)."""
        if isinstance(v, dict) and "peft" in v:
            new = {"none": "full", "lora": "lora"}.get(v["peft"], "full | lora | setfit")
            raise ValueError(f"finetune.peft was renamed: replace `peft: {v['peft']}` with `method: {new}` "
                             "(finetune.method: full | lora | setfit)")
        return v

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, v: object) -> object:
        """One message for each mistake (pydantic's own would list every member of the union)."""
        if isinstance(v, dict):
            for label, w in v.items():
                if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < math.inf:
                    raise ValueError(f"the weight of label {label!r} must be a number > 0, got {w!r}")
            # YAML reads a label such as 1 or 0 as a number; labels are text everywhere else.
            return {str(label): float(w) for label, w in v.items()}
        if v not in ("none", "balanced"):
            raise ValueError(f"expected none, balanced or a mapping {{label: weight}}, got {v!r}")
        return v

    @field_validator("adversarial_alpha")
    @classmethod
    def _pgd_step_within_ball(cls, v: float, info: ValidationInfo) -> float:
        eps = info.data.get("adversarial_epsilon")  # absent when itself invalid (that error is reported)
        if info.data.get("adversarial") == "pgd" and eps is not None and v > eps:
            raise ValueError(f"{v:g} is larger than finetune.adversarial_epsilon {eps:g}: a pgd step must fit in "
                             "the epsilon ball; lower it")
        return v


class MultilabelParams(_Section):
    # Decision threshold per label: "tune" = each label's own, maximising its validation F1; a number = one for all.
    threshold: Literal["tune"] | float = "tune"

    @field_validator("threshold")
    @classmethod
    def _in_unit_interval(cls, v: str | float) -> str | float:
        if not isinstance(v, str) and not 0 < v < 1:
            raise ValueError(f"must be tune or a number between 0 and 1, got {v!r}")
        return v


class CalibrationParams(_Section):
    # temperature: evaluate fits a temperature on the validation split; served probabilities use it.
    method: Literal["temperature", "none"] = "temperature"


# tunepipe/robustness.py implements these (context_noise: tasks with a label per word, NER, which adds it itself).
PERTURBATIONS = ("char_noise", "word_dropout", "lower", "upper", "context_noise")


class RobustnessParams(_Section):
    # evaluate scores the model on a perturbed copy of the test split per entry; [] = no robustness report.
    perturbations: list[str] = ["char_noise", "word_dropout", "lower", "upper"]
    char_rate: float = Field(default=0.1, ge=0, le=1)  # char_noise: share of words given one typo
    word_rate: float = Field(default=0.1, ge=0, lt=1)  # word_dropout: share of words dropped
    seed: int = 0

    @field_validator("perturbations")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in PERTURBATIONS:
                raise ValueError(f"unknown perturbation {name!r} (valid: {', '.join(PERTURBATIONS)})")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a perturbation twice: {v}")
        return v


class ExplainParams(_Section):
    # evaluate's reports/explanations.html: per label, this many most confident right and wrong test predictions
    # (0 = none; the page then says so). Each costs one integrated-gradients pass (n_steps forward/backward).
    examples_per_class: int = Field(default=2, ge=0, le=50)
    # Integrated-gradients steps from the baseline to the text (more = smaller convergence delta, slower); also
    # what export records for `tunepipe predict --explain` and the served {"explain": true}.
    n_steps: int = Field(default=32, ge=2, le=1000)


class ZeroShotParams(_Section):
    # embedding: cosine between each text's and each label's sentence embedding (offline); nli: transformers'
    # zero-shot-classification pipeline with an NLI model from the hub (`model`); none: no baseline.
    method: Literal["embedding", "nli", "none"] = "embedding"
    model: str | None = None  # None = model.name's pretrained encoder (embedding); nli needs a hub NLI model
    hypothesis_template: str = "This example is {}."  # nli only: each label's description goes into the {}
    batch_size: int = Field(default=64, ge=1, le=4096)

    @field_validator("hypothesis_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{}" not in v:
            raise ValueError(f"must contain {{}} where the label goes, got {v!r}")
        return v

    @model_validator(mode="after")
    def _nli_names_a_model(self) -> ZeroShotParams:
        if self.method == "nli" and not self.model:
            raise ValueError("method nli needs evaluate.zero_shot.model: a hub NLI model, e.g. "
                             "facebook/bart-large-mnli (or use method: embedding offline)")
        return self


class EvaluateParams(_Section):
    zero_shot: ZeroShotParams = ZeroShotParams()


class SuggestParams(_Section):
    n: int = Field(default=100, ge=1)  # texts to suggest
    strategy: Literal["entropy", "margin", "random"] = "margin"  # margin: measured best (benchmarks/active_learning.py)
    diversify: bool = False  # k-means (k = n) on the texts' embeddings, the most uncertain text per cluster
    # A text whose embedding has at least this cosine with an already labelled one (the prepared train split) is a
    # near-duplicate and dropped; texts equal after normalising case and whitespace always are. 1.0 = only those.
    near_duplicate: float = Field(default=0.95, gt=0, le=1)
    text_column: str = Field(default="text", min_length=1)  # the input file's column of texts
    seed: int = 0  # random strategy, k-means
    batch_size: int = Field(default=64, ge=1, le=4096)  # embedding batch size


class ExportParams(_Section):
    opset: int = Field(default=17, ge=11, le=23)
    parity_tolerance: float = Field(default=1e-3, gt=0)
    # int8 is served only where its labels agree with PyTorch's on this share of the validation split; None: never.
    int8_min_agreement: float | None = Field(default=0.99, ge=0, le=1)


class ServeParams(_Section):
    """Request-size limits of the served model (`mlflow models serve`, `tunepipe predict`), stored with it at
    export: a request over them is refused with a clear error (HTTP 400) instead of running out of memory."""
    max_texts_per_request: int = Field(default=1000, ge=1)
    max_text_chars: int = Field(default=10_000, ge=1)


class TrackingParams(_Section):
    uri: str | None = None
    experiment: str = Field(default="tunepipe", min_length=1)
    model_name: str = Field(default="tunepipe-classifier", min_length=1)


class SweepParams(_Section):
    study: str = Field(default="tunepipe-sweep", min_length=1)
    storage: str | None = None  # None = sqlite file in the project
    trials: int = Field(default=20, gt=0)  # finished (complete + pruned) trials the study ends with
    timeout: float | None = Field(default=None, gt=0)  # seconds per invocation
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(default=5, ge=0)  # median: complete trials before any pruning
    heartbeat_interval: int = Field(default=30, ge=1)  # a trial silent for 2x this is failed and retried
    seed: int = 0
    learning_rate: tuple[float, float] = (1e-5, 1e-4)
    batch_size: tuple[int, ...] = (16, 32)
    dropout: tuple[float, float] = (0.0, 0.3)
    # Optional dimensions: None = not searched (trials use finetune's value).
    adversarial: tuple[Literal["none", "fgm", "pgd"], ...] | None = None  # choices, e.g. (none, fgm)
    adversarial_epsilon: tuple[float, float] | None = None  # log-uniform [low, high]

    @field_validator("adversarial")
    @classmethod
    def _adversarial_choices(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"choices must be null or a non-empty list of distinct methods (none, fgm, pgd), "
                             f"got {list(v)}")
        return v

    @field_validator("adversarial_epsilon")
    @classmethod
    def _epsilon_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] < v[1] < math.inf:
            raise ValueError(f"range must be null or [low, high] with 0 < low < high, got {list(v)}")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1] < 1:
            raise ValueError(f"range must be [low, high] with 0 < low < high < 1, got {list(v)}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] < 1:
            raise ValueError(f"range must be [low, high] with 0 <= low < high < 1, got {list(v)}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_choices(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(not 1 <= b <= 4096 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"choices must be a non-empty list of distinct integers in [1, 4096], got {list(v)}")
        return v


class LearningCurveParams(_Section):
    """`tunepipe learning-curve`: the metric on nested, stratified fractions of the train split."""

    fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
    seeds: int = Field(default=3, ge=1)  # repeats (subset draw and training seed) of each fraction below few_below
    few_below: float = Field(default=0.1, gt=0, le=1)  # fractions below this get `seeds` repeats, the others one
    plateau_share: float = Field(default=0.95, gt=0, lt=1)  # report the labels at which the fit reaches this share
    bootstrap: int = Field(default=200, ge=20)  # resamples of the points for the uncertainty band
    max_train: int | None = Field(default=None, gt=0)  # cap the train split first (quick curves); None = all of it
    seed: int = 0  # subset draws: seed + repeat index
    study: str = Field(default="learning-curve", min_length=1)  # Optuna study name prefix (points are its trials)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("give at least one fraction, e.g. [0.1, 0.5, 1.0]")
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"each fraction must be in (0, 1], got {bad[0]!r}")
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"fractions must be increasing without duplicates, got {list(v)}")
        return v


# metrics.json keys where lower is better (promote.metric refuses them)
LOWER_IS_BETTER = ("hamming_loss", "ece", "brier", "nll")


class PromoteParams(_Section):
    # A test metric tagged on registered versions (metric.<name>); higher is better. None = the task's headline
    # metric (classification macro_f1, ner f1, multilabel micro_f1), filled in by Params.
    metric: str | None = None
    min_delta: float = Field(default=0.005, ge=0)
    min_metric: float = Field(default=0.0, ge=0)
    significance: float | None = Field(default=None, gt=0, lt=1)
    test: Literal["bootstrap", "mcnemar"] = "bootstrap"
    bootstrap_samples: int = Field(default=1000, ge=100)
    # Refuse a candidate whose recorded robust_drop (clean headline - mean over robustness perturbations) exceeds
    # this; None = no guard.
    max_robust_drop: float | None = Field(default=None, ge=0)

    @field_validator("metric")
    @classmethod
    def _metric_is_a_score(cls, v: str | None) -> str | None:
        if v in ("n_test", "test_data_hash"):
            raise ValueError(f"{v!r} is not a score; use e.g. macro_f1, accuracy, weighted_f1 (ner: f1)")
        # Promotion needs higher = better; these are errors and losses, where a rise is a regression.
        if v is not None and (v in LOWER_IS_BETTER or v.endswith(("_uncalibrated", "_drop"))):
            raise ValueError(f"{v!r} is lower-is-better, and promotion moves the champion for a higher value; use a "
                             "score such as macro_f1, accuracy, micro_f1 (multilabel) or f1 (ner)")
        return v

    @model_validator(mode="after")
    def _significance_reachable(self) -> PromoteParams:
        # The bootstrap p-value is at least 1/(samples+1): a stricter level could never pass.
        if self.significance and self.test == "bootstrap" and self.significance * (self.bootstrap_samples + 1) <= 1:
            raise ValueError(f"significance {self.significance:g} is below the smallest bootstrap p-value "
                             f"1/({self.bootstrap_samples}+1); raise promote.bootstrap_samples")
        return self


class Params(_Section):
    task: str = "classification"  # a folder of tunepipe/tasks
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    tokenize: TokenizeParams = TokenizeParams()
    augment: AugmentParams = AugmentParams()
    finetune: FinetuneParams = FinetuneParams()
    multilabel: MultilabelParams = MultilabelParams()
    calibration: CalibrationParams = CalibrationParams()
    evaluate: EvaluateParams = EvaluateParams()
    robustness: RobustnessParams = RobustnessParams()
    explain: ExplainParams = ExplainParams()
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()
    tracking: TrackingParams = TrackingParams()
    sweep: SweepParams = SweepParams()
    promote: PromoteParams = PromoteParams()
    suggest: SuggestParams = SuggestParams()
    learning_curve: LearningCurveParams = LearningCurveParams()

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in available():
            raise ValueError(f"Input should be one of {', '.join(map(repr, available()))}, the task families in "
                             f"tunepipe/tasks (got {v!r})")
        return v

    @model_validator(mode="after")
    def _few_shot_task(self) -> Params:
        """finetune.method: setfit and data.train_per_class need one label per text (the task says so)."""
        from tunepipe.tasks import get_task

        task = get_task(self.task)
        if self.finetune.method == "setfit" and not task.setfit:
            raise ValueError(f"finetune.method: setfit supports task: classification (this is task: {self.task}); "
                             "use full or lora")
        if self.finetune.method == "setfit":
            # What a Trainer run applies and setfit's trainer has no place for: refused, not silently ignored.
            unused = {"tokenize.long_text": (self.tokenize.long_text, "truncate"),
                      "augment.method": (self.augment.method, "none"),
                      "finetune.adversarial": (self.finetune.adversarial, "none"),
                      "finetune.class_weights": (self.finetune.class_weights, "none")}
            for key, (value, default) in unused.items():
                if value != default:
                    raise ValueError(f"{key}: {value} does not apply to finetune.method: setfit; set it to {default}")
        if self.data.train_per_class is not None and not task.setfit:
            raise ValueError(f"data.train_per_class: samples k texts per class, for task: classification (this is "
                             f"task: {self.task}); use data.max_train_samples")
        return self

    @model_validator(mode="after")
    def _promote_metric_of_the_task(self) -> Params:
        """promote.metric: null means the task's headline metric; everything downstream sees a name."""
        if self.promote.metric is not None:
            return self
        from tunepipe.tasks import get_task

        promote = self.promote.model_copy(update={"metric": get_task(self.task).headline_metric})
        object.__setattr__(self, "promote", promote)  # frozen model; this validator is its constructor's last step
        return self


def check_label_descriptions(descriptions: dict[str, str] | None, labels: list[str]) -> None:
    """data.label_descriptions may only name labels the data has (a typo would silently fall back to the name)."""
    for label in descriptions or {}:
        if label not in labels:
            raise UserError(f"data.label_descriptions: unknown label {label!r} (the data's labels: "
                            f"{', '.join(labels)}); fix or remove that key in params.yaml")


def parse_params(raw: object, source: str = str(PARAMS_FILE)) -> Params:
    """Validate a plain dict; errors name the dotted key and what is wrong with it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's documented keys)"
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            msg = f"{msg} (got {err['input']!r})"
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise UserError(f"{source}: {key}: {msg}{more}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found; run from the project root or pass its path")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_params(raw, str(path))
