"""tokenize, augment, finetune (with resume), evaluate and export, in-process on tiny data and a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import mlflow
import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from stages import augment, evaluate, export, finetune, prepare
from stages import tokenization as tokenize
from tunepipe import modeling, progress
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import load_params
from tunepipe.tasks.classification.augment import augment_ids


def run_front(root: Path) -> datasets.DatasetDict:
    prepare.main()
    tokenize.main()
    augment.main()
    return datasets.load_from_disk(str(root / "data/augmented"))


def test_tokenize_truncates_without_padding(project):
    root = project(**{"tokenize.max_length": 12})
    prepare.main()
    tokenize.main()
    dsd = datasets.load_from_disk(str(root / "data/tokenized"))
    lengths = [len(x) for x in dsd["train"]["input_ids"]]
    assert max(lengths) <= 12 and len(set(lengths)) > 1  # truncated, and no padding to a common length
    assert dsd["train"]["length"] == lengths
    report = read_json(root / "reports/tokenize.json")
    assert 0 < report["splits"]["train"]["truncation_rate"] <= 1


@pytest.mark.parametrize("method", ["token_mask", "random_deletion", "span_cutoff"])
def test_augment_methods_preserve_labels_and_specials(method):
    rng = np.random.default_rng(0)
    ids = [101] + list(range(1000, 1020)) + [102]
    out = augment_ids(ids, method, 0.3, rng, special={101, 102}, mask_id=103)
    assert out[0] == 101 and out[-1] == 102
    assert out != ids
    if method == "token_mask":
        assert len(out) == len(ids) and 103 in out
    else:
        assert len(out) < len(ids) and all(t in ids for t in out)


def test_augment_stage_touches_train_only_and_is_reproducible(project):
    root = project(**{"augment.method": "random_deletion", "augment.ratio": 0.5})
    dsd = run_front(root)
    tok = datasets.load_from_disk(str(root / "data/tokenized"))
    n = len(tok["train"])
    assert len(dsd["train"]) == n + round(0.5 * n)
    for split in ("validation", "test"):
        assert dsd[split]["input_ids"] == tok[split]["input_ids"]
    added = dsd["train"].select(range(n, len(dsd["train"])))
    assert all(len(i) == len(m) == length for i, m, length in zip(added["input_ids"], added["attention_mask"],
                                                                   added["length"], strict=True))
    assert read_json(root / "reports/augment.json")["added"] == round(0.5 * n)
    first = dsd["train"]["input_ids"]
    augment.main()
    assert datasets.load_from_disk(str(root / "data/augmented"))["train"]["input_ids"] == first


def test_token_mask_needs_a_mask_token(project, tiny_model_dir, tmp_path):
    root = project(**{"augment.method": "token_mask", "augment.ratio": 1.0})
    prepare.main()
    tokenize.main()
    augment.main()
    assert read_json(root / "reports/augment.json")["added"] > 0


class StopAfter(TrainerCallback):
    """Simulates a kill right after a checkpoint was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt("simulated kill")


def test_finetune_resumes_after_interruption(project, monkeypatch):
    root = project(**{"finetune.epochs": 3.0})
    run_front(root)
    real_build = finetune.build_trainer

    def interrupted(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        trainer.add_callback(StopAfter(10))
        return trainer

    monkeypatch.setattr(finetune, "build_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.main()
    state = read_json(root / "models/checkpoints/state.json")
    assert state["status"] == "running"
    assert (root / "models/checkpoints/checkpoint-10").is_dir()
    assert not (root / "models/model").exists()

    monkeypatch.setattr(finetune, "build_trainer", real_build)
    finetune.main()
    summary = read_json(root / "reports/train.json")
    assert summary["resumed_from"] == "checkpoint-10"
    info = read_json(root / "models/model/training_info.json")
    assert info["run_id"] == state["run_id"]  # the same MLflow run carries on
    total = summary["global_step"]
    assert total == 3 * -(-len(datasets.load_from_disk("data/augmented")["train"]) // 16)
    steps = [r.split(",")[0] for r in (root / "reports/plots/train_loss.csv").read_text().splitlines()[1:]]
    assert steps[0] == "1" and int(steps[-1]) >= 10  # the curve spans both sessions
    assert read_json(root / "models/checkpoints/state.json")["status"] == "complete"
    assert not list((root / "models/checkpoints").glob("checkpoint-*"))


def test_finetune_evaluate_export_register(project):
    root = project(n_rows=240, **{"finetune.epochs": 5.0})
    run_front(root)
    finetune.main()
    assert (root / "models/model/model.safetensors").is_file()
    assert not list((root / "models/model").glob("*.bin"))
    summary = read_json(root / "reports/train.json")
    assert summary["best_val_macro_f1"] > 0.6  # keywords carry the label: even a tiny model learns them
    val = (root / "reports/plots/validation.csv").read_text().splitlines()
    assert val[0] == "step,macro_f1" and len(val) > 2

    evaluate.main()
    metrics = read_json(root / "reports/metrics.json")
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert metrics["n_test"] == 24 and sum(c["support"] for c in metrics["per_class"].values()) == 24
    assert set(metrics["per_class"]) == {"negative", "neutral", "positive"}
    assert (root / "reports/plots/confusion_matrix.png").stat().st_size > 1000
    assert len((root / "reports/plots/confusion.csv").read_text().splitlines()) == 25
    assert "macro avg" in (root / "reports/classification_report.txt").read_text()

    export.main()
    report = read_json(root / "reports/export.json")
    assert report["fp32_max_abs_logit_diff"] <= 1e-3
    assert report["fp32_label_agreement"] == 1.0
    assert 0.5 <= report["int8_label_agreement"] <= 1.0
    assert (root / "models/onnx/model.onnx").is_file() and (root / "models/onnx/model.int8.onnx").is_file()
    meta = read_json(root / "models/onnx/tunepipe.json")
    chosen = "model.int8.onnx" if max(report["validation_int8_label_agreement"].values()) >= 0.99 else "model.onnx"
    assert report["served"] == meta["served_file"] == chosen and report["served_because"]

    p = load_params()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    version = client.get_model_version(p.tracking.model_name, str(report["registered"]["version"]))
    assert version.tags["test_data_hash"] == read_json(root / "data/prepared/meta.json")["hashes"]["test"]
    assert float(version.tags["metric.macro_f1"]) == pytest.approx(metrics["macro_f1"])
    assert json.loads(version.tags["params"])["finetune"]["batch_size"] == 16
    run = client.get_run(version.run_id)
    assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert "val_macro_f1" in run.data.metrics and "train_loss" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "test_macro_f1")) == 1  # no metric logged twice

    # The registered pyfunc takes raw text and agrees with the local export.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{p.tracking.model_name}/{version.version}")
    out = pyfunc.predict(["great love the flight", "awful hate it"])
    from tunepipe.serving.pyfunc_model import TextPredictor

    local = TextPredictor(root / "models/onnx").predict(["great love the flight", "awful hate it"])
    assert list(out["label"]) == [r["label"] for r in local]
    assert all(abs(sum(r.values()) - 1) < 1e-5 for r in out["probabilities"])


def test_export_refuses_parity_beyond_tolerance(project):
    root = project(**{"export.parity_tolerance": 1e-12})
    run_front(root)
    finetune.main()
    evaluate.main()
    with pytest.raises(UserError, match="export.parity_tolerance"):
        export.main()
    assert not (root / "models/onnx").exists()


def test_lora_finetune_exports_a_plain_model(project):
    root = project(**{"finetune.method": "lora", "finetune.epochs": 1.0})
    run_front(root)
    finetune.main()
    saved = json.loads((root / "models/model/config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]  # adapters merged, no peft needed later
    assert not (root / "models/model/adapter_config.json").exists()
    evaluate.main()
    assert 0 <= read_json(root / "reports/metrics.json")["macro_f1"] <= 1


def test_same_params_and_seed_give_the_same_metrics(project):
    root = project(**{"finetune.epochs": 1.0})
    run_front(root)
    finetune.main()
    first = (root / "reports/plots/train_loss.csv").read_text(), read_json(root / "reports/train.json")
    import shutil

    shutil.rmtree(root / "models")
    finetune.main()
    second = (root / "reports/plots/train_loss.csv").read_text(), read_json(root / "reports/train.json")
    assert first[0] == second[0]
    assert first[1]["best_val_macro_f1"] == second[1]["best_val_macro_f1"]


def test_hf_source_path_loads_a_local_dataset_folder(project):
    """hf:NAME goes through datasets.load_dataset; a local folder exercises the same call offline."""
    from tests.helpers import synthetic_rows, write_csv
    from tunepipe.params import parse_params
    from tunepipe.tasks import get_task

    root = project()
    rows = synthetic_rows(200)
    write_csv(root / "hub/train.csv", rows[:150])
    write_csv(root / "hub/test.csv", rows[150:])
    splits = get_task("classification").prepare(parse_params({"data": {"source": f"hf:{root / 'hub'}"}})).splits
    assert len(splits["test"]) == 50  # the source's own test split is kept
    assert len(splits["train"]) + len(splits["validation"]) == 150


@pytest.mark.parametrize("bar", [0.0, 1.0])
def test_export_serves_int8_only_at_the_agreement_bar(project, capsys, bar):
    """export.int8_min_agreement decides the served graph: 0 serves int8; 1 serves it only where every validation
    label agrees (else fp32). The served model, `tunepipe predict` and the report all name the same file."""
    from tunepipe.cli import main
    from tunepipe.serving.pyfunc_model import TextPredictor

    root = project(**{"export.int8_min_agreement": bar, "finetune.epochs": 1.0})
    run_front(root)
    finetune.main()
    evaluate.main()
    export.main()
    report = read_json(root / "reports/export.json")
    agreement = report["validation_int8_label_agreement"]
    expected = "model.int8.onnx" if max(agreement.values()) >= bar else "model.onnx"
    assert report["served"] == expected
    variant = report["served_variant"]
    assert variant == "fp32" if expected == "model.onnx" else variant.startswith("int8")
    if bar == 0.0:
        assert expected == "model.int8.onnx" and report["served_variant"] == report["int8_variant"] == "int8"
    assert sorted(f.name for f in (root / "models/onnx").glob("*.onnx")) == ["model.int8.onnx", "model.onnx"]
    predictor = TextPredictor(root / "models/onnx")
    assert predictor.served_file == expected
    capsys.readouterr()
    main(["predict", "--model", "models/onnx", "--json", "great love the flight"])
    captured = capsys.readouterr()
    assert f"serves {expected}" in captured.err
    assert json.loads(captured.out)["label"] == predictor.predict(["great love the flight"])[0]["label"]


def test_real_embedded_model_trains_and_exports_with_parity(project):
    """The shipped all-MiniLM-L6-v2 (not the tiny stand-in): a few steps, then ONNX parity on the test split."""
    root = project(n_rows=90, **{"model.name": "builtin:minilm-l6", "finetune.max_steps": 4,
                                 "finetune.eval_steps": 4, "finetune.learning_rate": 5e-5, "finetune.batch_size": 8})
    run_front(root)
    finetune.main()
    config = json.loads((root / "models/model/config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert read_json(root / "reports/train.json")["global_step"] == 4
    evaluate.main()
    export.main()
    report = read_json(root / "reports/export.json")
    assert report["fp32_max_abs_logit_diff"] <= 1e-3 and report["fp32_label_agreement"] == 1.0


PRECISION_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@pytest.mark.parametrize(("requested", "fast_bf16", "expected"), [
    ("fp32", True, torch.float32),
    ("bf16", False, torch.bfloat16),  # a CPU without native bf16: slow, never broken
    ("auto", True, torch.bfloat16),   # AMX / AVX-512 BF16
    ("auto", False, torch.float32),   # AVX2 only
])
def test_every_precision_trains_on_cpu(project, monkeypatch, capsys, requested, fast_bf16, expected):
    """Each precision path is forced, whatever CPU runs the suite: `auto` must not decide which one is tested."""
    monkeypatch.setattr(modeling, "cpu_has_fast_bf16", lambda: fast_bf16)
    root = project(**{"finetune.precision": requested, "finetune.epochs": 1.0, "finetune.eval_steps": 4})
    run_front(root)
    seen: set[torch.dtype] = set()
    real_build = finetune.build_trainer

    def build(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        trainer.model.classifier.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        return trainer

    monkeypatch.setattr(finetune, "build_trainer", build)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    capsys.readouterr()
    finetune.main()
    assert seen == {expected}  # the classifier really ran in that precision, in training and validation
    out = capsys.readouterr().out
    assert f"precision {PRECISION_NAME[expected]} (finetune.precision: {requested})" in out
    assert "train: " in out and "steps/s" in out and ": validation macro_f1 " in out
    assert "{'loss'" not in out and "{'eval_" not in out  # Trainer's per-step dicts stay out of the terminal
    summary = read_json(root / "reports/train.json")
    assert summary["precision"] == PRECISION_NAME[expected] and summary["precision_requested"] == requested
    assert summary["device"].startswith("cpu (") and 0 <= summary["best_val_macro_f1"] <= 1
    # MFU: achieved FLOP/s over the matmul peak of the precision trained in, measured in the same run.
    assert 0 < summary["mfu"] <= 1 and summary["peak_matmul_gflops"] > 0 and summary["train_flops_per_token"] > 0
    assert summary["achieved_gflops"] == pytest.approx(
        summary["train_flops_per_token"] * summary["train_tokens_per_s"] / 1e9, rel=1e-3)
    assert summary["mfu"] == pytest.approx(summary["achieved_gflops"] / summary["peak_matmul_gflops"], rel=0.02)
    logged = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(
        read_json(root / "models/model/training_info.json")["run_id"]).data.metrics
    assert logged["mfu"] == summary["mfu"] and logged["train_tokens_per_s"] == summary["train_tokens_per_s"]
    saved = json.loads((root / "models/model/config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype", "float32")) == "float32"  # autocast: weights stay fp32
    evaluate.main()
    assert 0 <= read_json(root / "reports/metrics.json")["macro_f1"] <= 1


@pytest.fixture
def fresh_bf16_measure():
    """cpu_bf16_speedup is measured once per process: each test sees its own flags and measurement."""
    modeling.cpu_bf16_speedup.cache_clear()
    yield
    modeling.cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize(("flags", "measured", "fast"), [
    ({"avx2", "fma"}, None, False),                    # AMD EPYC (Zen 2/3): bf16 matmul 60x slower, never measured
    ({"avx2", "avx512f", "avx512bw"}, None, False),    # Skylake AVX-512: oneDNN emulates bf16, no gain
    ({"avx2", "avx512f", "avx512_bf16"}, 3.7, True),   # AMD EPYC Zen 4
    ({"avx2", "avx512f", "avx512_bf16"}, 0.57, False),  # Intel Xeon with AVX-512 BF16 but no AMX
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, 6.0, True),  # Intel Xeon with AMX
])
def test_auto_precision_follows_the_cpu(monkeypatch, fresh_bf16_measure, flags, measured, fast):
    """The flags say whether bf16 is native; a measured matmul says whether it is faster than fp32 here."""
    monkeypatch.setattr(modeling, "cpu_flags", lambda: flags)
    calls = []
    monkeypatch.setattr(modeling, "matmul_speedup", lambda: calls.append(1) or measured)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.cpu_has_fast_bf16() is fast
    assert modeling.pick_precision("auto") == ("bf16" if fast else "fp32")
    assert len(calls) == (0 if measured is None else 1)  # measured once per process, only where bf16 is native
    assert modeling.pick_precision("bf16") == "bf16" and modeling.pick_precision("fp32") == "fp32"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        modeling.pick_precision("fp16")


def test_matmul_speedup_runs_both_precisions_on_this_cpu():
    """The real measurement, whatever this CPU is: both precisions run and give a ratio."""
    assert 0 < modeling.matmul_speedup() < 100


def test_training_flops_per_token_formula(tiny_model_dir):
    """6 x non-embedding parameters (transformers' own count) + 12 x layers x hidden x attended length per real
    token; 4 x with LoRA's frozen weights; x passes for adversarial training."""
    from transformers import BertForSequenceClassification

    from tunepipe.training import train_flops_per_token

    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    n = model.num_parameters(exclude_embeddings=True)
    assert 0 < n < model.num_parameters()  # the embeddings are left out
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * (2**2 + 4**2) / (2 + 4)  # texts of 2 and 4 tokens
    assert train_flops_per_token(model, [2, 4]) == pytest.approx(6 * n + attention)
    assert train_flops_per_token(model, [2, 4], lora=True, passes=2) == pytest.approx(2 * (4 * n + attention))


def test_int8_recipe_agrees_with_pytorch_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The export's graphs: the fp32 one fused for ONNX Runtime (one Attention node per layer) stays at PyTorch's
    logits, the int8 one (per-channel weights) keeps the labels at the default agreement bar, and the parity check
    scores what the task says (one label per text for classification)."""
    import datasets
    import onnxruntime as ort
    from transformers import AutoTokenizer, BertForSequenceClassification

    from tests.helpers import synthetic_rows
    from tunepipe.exporting import choose_served, export_onnx, fuse_for_ort, input_names, int8_candidates, parity
    from tunepipe.params import ExportParams
    from tunepipe.tasks import get_task

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    names = input_names(tok)
    export_onnx(model, names, tmp_path / "model.onnx", 17)
    fusions = fuse_for_ort(tmp_path / "model.onnx")
    assert fusions["attention"] == model.config.num_hidden_layers and fusions["skip_layer_normalization"] >= 2
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.onnx"]  # weights inline, no stale .data file
    candidates = int8_candidates(tmp_path / "model.onnx", tmp_path)
    ffn_out = model.config.num_hidden_layers  # 2: all int8, first layer's FFN output fp32, both fp32
    assert list(candidates) == ["int8", f"int8, fp32 feed-forward output in 1 of {ffn_out} layers",
                                f"int8, fp32 feed-forward output in 2 of {ffn_out} layers"]
    rows = synthetic_rows(200)
    enc = tok([t for t, _ in rows], truncation=True, max_length=32)
    ds = datasets.Dataset.from_dict({**enc, "labels": [i % 3 for i in range(len(rows))]})
    sessions = {k: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
                for k, f in (("fp32", tmp_path / "model.onnx"), *candidates.items())}
    report = parity(get_task("classification"), model, sessions, ds, names, tok.pad_token_id)
    assert report["n_compared"] == len(rows) and report["fp32_label_agreement"] == 1.0
    assert report["fp32_max_abs_logit_diff"] < 1e-4
    bar = ExportParams().int8_min_agreement
    assert report["int8_label_agreement"] >= bar
    assert set(report) >= {"torch_accuracy", "fp32_accuracy", "int8_accuracy"}
    agreement = {k: report[f"{k}_label_agreement"] for k in candidates}
    assert choose_served(agreement, bar)[0] == "int8"
    # The fastest candidate at the bar is served; none at the bar: fp32, naming the best int8 candidate.
    assert choose_served({"int8": 0.985, "keep 1": 0.992, "keep 2": 0.995}, bar) == (
        "keep 1", "keep 1 agrees with PyTorch on 99.20% of validation labels >= export.int8_min_agreement 99.00%: "
                  "served, the fastest variant that does")
    assert choose_served({"int8": 1.0}, None) == ("fp32", "export.int8_min_agreement is null: the fp32 graph is "
                                                          "served")
    assert choose_served({"int8": 0.985, "keep 1": 0.981}, bar) == (
        "fp32", "no int8 variant reaches export.int8_min_agreement 99.00% of validation labels (best: int8, "
                "98.50%): the fp32 graph is served")
