"""Inference speed of the exported model, side by side in one run: PyTorch fp32 (the reference), PyTorch in the
training precision (bf16 autocast where `finetune.precision: auto` picks it), ONNX Runtime fp32 and int8.

Raw test texts in, labels out: each variant tokenizes (the same fast tokenizer) and runs the model, at batch 1
(one request at a time, in test-split order) and at batch 32 (length-sorted batches, as a batch job would).
Figures: texts/s, p50/p99 latency per call, label agreement with PyTorch fp32; ratios against PyTorch fp32.
Needs a finished `dvc repro` (models/model, models/onnx, data/prepared/test.parquet).

    python benchmarks/inference.py [--texts 1000] [--threads N] [--out benchmarks/inference.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tunepipe.exporting import FP32_FILE, INT8_FILE
from tunepipe.modeling import cpu_isa, cpu_model, load_trained, pick_precision
from tunepipe.paths import EXPORT, EXPORT_META, MODEL, TEST_SPLIT

REPO = Path(__file__).resolve().parents[1]
WARMUP_CALLS = 5


def torch_runner(model, tokenizer, max_length: int, bf16: bool):
    def run(texts: list[str]) -> np.ndarray:
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return model(**enc).logits.float().argmax(-1).numpy()
    return run


def onnx_runner(path: Path, tokenizer, max_length: int, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(texts: list[str]) -> np.ndarray:
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="np")
        return session.run(None, {k: enc[k].astype(np.int64) for k in names})[0].argmax(-1)
    return run


def measure(run, batches: list[list[str]]) -> tuple[dict, np.ndarray]:
    for b in batches[:WARMUP_CALLS]:
        run(b)
    latencies, preds = [], []
    start = time.perf_counter()
    for b in batches:
        t0 = time.perf_counter()
        preds.append(run(b))
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    n = sum(map(len, batches))
    ms = np.asarray(latencies) * 1000
    return {"texts_per_s": n / total, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "texts": n}, np.concatenate(preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=1000, help="test texts per figure (default 1000)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for PyTorch and ORT")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "inference.md")
    args = ap.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(args.threads)
    info, task, model, tokenizer = load_trained(MODEL)
    meta = json.loads((EXPORT / EXPORT_META).read_text())
    max_length = meta["max_length"]
    texts = pd.read_parquet(TEST_SPLIT)["text"].astype(str).tolist()[:args.texts]
    by_length = sorted(texts, key=lambda t: len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]))
    shapes = {"batch 1": [[t] for t in texts], "batch 32": [by_length[i:i + 32] for i in range(0, len(texts), 32)]}
    training = pick_precision("auto")
    variants = {"PyTorch fp32": torch_runner(model, tokenizer, max_length, bf16=False)}
    if training == "bf16":
        variants["PyTorch bf16 (autocast)"] = torch_runner(model, tokenizer, max_length, bf16=True)
    served = meta.get("served_file", FP32_FILE)  # the graph export chose to serve
    for name, file in (("ONNX Runtime fp32", FP32_FILE), ("ONNX Runtime int8", INT8_FILE)):
        label = f"{name} (served)" if file == served else name
        variants[label] = onnx_runner(EXPORT / file, tokenizer, max_length, args.threads)

    cpu = f"{cpu_model()} ({cpu_isa()}), {args.threads} threads; training precision (auto): {training}"
    print(f"inference benchmark: {len(texts)} test texts, task {info['task']}, max_length {max_length}; {cpu}")
    rows = []
    for shape, batches in shapes.items():
        ref_pred = None
        for name, run in variants.items():
            fig, pred = measure(run, batches)
            if ref_pred is None:
                ref_pred, ref_rate = pred, fig["texts_per_s"]
            fig.update(shape=shape, variant=name, speedup=fig["texts_per_s"] / ref_rate,
                       agreement=float((pred == ref_pred).mean()))
            rows.append(fig)
            print(f"  {shape:<8}  {name:<24} {fig['texts_per_s']:8.1f} texts/s  p50 {fig['p50_ms']:7.2f} ms  "
                  f"p99 {fig['p99_ms']:7.2f} ms  x{fig['speedup']:.2f} vs PyTorch fp32  "
                  f"agreement {fig['agreement']:.2%}", flush=True)
    table = ["| shape | variant | texts/s | p50 ms | p99 ms | vs PyTorch fp32 | label agreement |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['shape']} | {r['variant']} | {r['texts_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['agreement']:.2%} |" for r in rows]
    args.out.write_text(f"# Inference benchmark\n\n{len(texts)} test texts of the reference run (raw text in: "
                        f"tokenize + model), {cpu}; `python benchmarks/inference.py`.\n\n" + "\n".join(table) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
