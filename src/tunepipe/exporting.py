"""ONNX export (torch.onnx, dynamic batch and sequence axes), int8 quantisation (onnxruntime's transformer
optimiser, then its dynamic quantiser with per-channel weights), and parity of both against PyTorch on a tokenized
split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch

from tunepipe.modeling import MODEL_INPUTS
from tunepipe.progress import Progress
from tunepipe.tasks import Task


class _LogitsOnly(torch.nn.Module):
    """ONNX wants tensors out, not a ModelOutput."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def input_names(tokenizer) -> list[str]:
    return [k for k in tokenizer.model_input_names if k in MODEL_INPUTS]


def export_onnx(model, input_names: list[str], path: Path, opset: int) -> None:
    example = {k: torch.ones((2, 8), dtype=torch.long) for k in input_names}
    if "token_type_ids" in example:
        example["token_type_ids"] = torch.zeros((2, 8), dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(_LogitsOnly(model).eval(), (), str(path), kwargs=example, input_names=input_names,
                      output_names=["logits"], dynamic_shapes={k: {0: batch, 1: seq} for k in input_names},
                      opset_version=max(opset, 18), dynamo=True, verbose=False)


# What export writes into its report: how the int8 model was made.
INT8_RECIPE = "onnxruntime transformer optimiser (LayerNorm/GELU fusion), then dynamic int8, per-channel weights"
INT8_AGREEMENT_BAR = 0.99  # label agreement with PyTorch an int8 model needs before it would be served


def quantize_int8(src: Path, dst: Path, config) -> None:
    """Per-channel weight scales (one per output column, not one per matrix) keep the small-magnitude columns of
    each weight apart from the large ones; fusing LayerNorm and GELU first keeps them in fp32 and speeds the
    graph. On the reference model (MiniLM-L6, sentiment) label agreement with PyTorch went from 96.1% (plain
    dynamic int8) to 98.6%, accuracy 0.793 vs 0.794 fp32, at slightly higher speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = dst.with_name(f".{dst.stem}.fused.onnx")
    try:
        optimized = optimize_model(str(src), model_type="bert", num_heads=getattr(config, "num_attention_heads", 0),
                                   hidden_size=getattr(config, "hidden_size", 0))
        optimized.save_model_to_file(str(fused))
        quantize_dynamic(str(fused), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        fused.unlink(missing_ok=True)


def batches(ds: datasets.Dataset, input_names: list[str], pad_id: int, size: int = 64):
    """Padded numpy batches from a tokenized split (same padding the served model sees)."""
    for i in range(0, len(ds), size):
        rows = ds[i:i + size]
        width = max(len(x) for x in rows["input_ids"])
        out = {}
        for k in input_names:
            pad = pad_id if k == "input_ids" else 0
            out[k] = np.array([x + [pad] * (width - len(x)) for x in rows[k]], dtype=np.int64)
        yield out


def parity(task: Task, model, sessions: dict, ds: datasets.Dataset, input_names: list[str], pad_id: int,
           calibrated: tuple[Callable, Callable] | None = None) -> dict:
    """Max |logit difference| fp32 ONNX vs PyTorch, label agreement of each ONNX model with PyTorch at the
    positions the task scores, and each model's accuracy where the task has one gold label per example.

    calibrated = (probabilities of PyTorch logits, probabilities of ONNX logits), i.e. what evaluate scored and
    what the served model returns: adds their max |difference| (fp32_max_abs_prob_diff)."""
    if "length" in ds.column_names:
        ds = ds.sort("length")  # batches of alike lengths: little padding, same results
    gold = task.gold_labels(ds)
    max_diff, max_prob_diff, n_scored, n_rows = 0.0, 0.0, 0, 0
    agree = dict.fromkeys(sessions, 0)
    correct = dict.fromkeys(["torch", *sessions], 0)
    with torch.no_grad(), Progress("parity", len(ds), "texts") as bar:
        for b in batches(ds, input_names, pad_id):
            ref = model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits.numpy()
            at = task.scored_positions(b)
            ref_lab = ref.argmax(-1)
            outs = {name: sess.run(None, b)[0] for name, sess in sessions.items()}
            if "fp32" in outs:
                max_diff = max(max_diff, float(np.abs(outs["fp32"] - ref)[at].max()))
                if calibrated is not None:
                    ref_p, served_p = calibrated[0](ref), calibrated[1](outs["fp32"])
                    max_prob_diff = max(max_prob_diff, float(np.abs(served_p - ref_p)[at].max()))
            for name, out in outs.items():
                agree[name] += int((out.argmax(-1)[at] == ref_lab[at]).sum())
            if gold is not None:
                rows = gold[n_rows:n_rows + len(ref)]
                for name, out in (("torch", ref), *outs.items()):
                    correct[name] += int((out.argmax(-1) == rows).sum())
            n_scored += int(np.size(ref_lab[at]))
            n_rows += len(ref)
            bar.update(len(ref))
    total = max(n_scored, 1)
    report = {"fp32_max_abs_logit_diff": max_diff, **{f"{k}_label_agreement": v / total for k, v in agree.items()},
              "n_compared": total}
    if calibrated is not None:
        report["fp32_max_abs_prob_diff"] = max_prob_diff
    if gold is not None and n_rows:
        report.update({f"{k}_accuracy": v / n_rows for k, v in correct.items()})
    return report
