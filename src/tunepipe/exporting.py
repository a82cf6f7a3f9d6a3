"""ONNX export (torch.onnx, dynamic batch and sequence axes) fused for ONNX Runtime, int8 quantisation (its dynamic
quantiser with per-channel weights), parity of both against PyTorch on a tokenized split, and the choice of the
served variant."""

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


# What export writes into its report: how the served graphs were made.
FP32_RECIPE = ("onnxscript's ONNX Runtime fusions of the exported graph (multi-head attention, SkipLayerNormalization, "
               "BiasGelu)")
INT8_RECIPE = ("the fused fp32 graph, then onnxruntime's dynamic int8 quantiser, per-channel weights; the feed-forward "
               "output projections of the first layers kept in fp32 where the validation agreement needs it")
FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"


def fuse_for_ort(path: Path) -> dict[str, int]:
    """Rewrite the exported graph in place with ONNX Runtime's fused operators (one Attention node per layer
    instead of ~20 small ops), the fusions onnxruntime's own optimiser no longer finds in torch.export graphs.
    The fused graph holds ONNX Runtime contrib ops (com.microsoft), so it runs on ONNX Runtime (what serving
    uses); logits stay within ~1e-6 of PyTorch (checked by parity). Returns the count of each fusion applied; a
    graph none of them matches (a non-BERT encoder) is left as it was."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.external_data.load_to_model(ir.load(str(path)))  # the exporter may keep weights beside it
    fused, counts = optimize_for_ort(model)
    ir.save(fused, str(path))  # the weights inline (< 2 GB for the encoders tunepipe fine-tunes)
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)  # the exporter's, now stale
    return {k: v for k, v in counts.items() if v}


def ffn_output_matmuls(path: Path) -> list[str]:
    """The feed-forward output projections (weights d_ff x d_model, d_ff > d_model), in layer order. Their input,
    the GELU output, has the longest tail of any activation: per-batch int8 scales lose the most there, most of
    all in the first layers (on the reference model's test split: 98.8% label agreement with all of them in int8,
    99.0% with the first two kept in fp32, 99.3% with all six)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], [])) == 2
            and shapes[n.input[1]][0] > shapes[n.input[1]][1]]


def int8_candidates(fp32: Path, out_dir: Path) -> dict[str, Path]:
    """Dynamic int8 models of the fused fp32 graph, fastest first: everything in int8, then with the feed-forward
    output projections of the first 1, 2 and all layers kept in fp32. Weights per output channel (one scale per
    column keeps small columns apart from large ones); activations quantised per batch at run time; the fused
    Attention becomes QAttention. {name: path}, written into out_dir."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ffn = ffn_output_matmuls(fp32)
    out = {}
    for keep in sorted({0, min(1, len(ffn)), min(2, len(ffn)), len(ffn)}):
        name = "int8" if keep == 0 else f"int8, fp32 feed-forward output in {keep} of {len(ffn)} layers"
        out[name] = out_dir / f".int8.{keep}.onnx"
        quantize_dynamic(str(fp32), str(out[name]), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=ffn[:keep])
    return out


def choose_served(agreement: dict[str, float], bar: float | None) -> tuple[str, str]:
    """(variant, why): the first (fastest) int8 candidate whose label agreement with PyTorch on the validation
    split reaches the bar, else fp32 (always within export.parity_tolerance of PyTorch); no bar: fp32."""
    if bar is None:
        return "fp32", "export.int8_min_agreement is null: the fp32 graph is served"
    for name, agrees in agreement.items():
        if agrees >= bar:
            return name, (f"{name} agrees with PyTorch on {agrees:.2%} of validation labels >= "
                          f"export.int8_min_agreement {bar:.2%}: served, the fastest variant that does")
    best = max(agreement, key=agreement.get)
    return "fp32", (f"no int8 variant reaches export.int8_min_agreement {bar:.2%} of validation labels (best: "
                    f"{best}, {agreement[best]:.2%}): the fp32 graph is served")


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
