"""Training throughput and MFU of the finetune stage vs. the common tutorial loop, on the same model, data and steps,
all variants side by side in one run.

Reference ("tutorial"): every example padded to a fixed length, random batches, a plain PyTorch loop with AdamW
and a linear schedule; run twice: at the seeds' settings (pad to 128, fp32) and at ours (pad to
tokenize.max_length, the precision `auto` picks, bf16 autocast where the CPU runs it fast).
Ours: tunepipe.training.build_trainer, exactly what `dvc repro` runs (dynamic padding, length-grouped batches,
`auto` precision); and the same with fused AdamW (TrainingArguments optim=adamw_torch_fused) and, with --compile,
torch.compile of the model (TrainingArguments torch_compile), the options tried for the product.
Figures: real (non-padding) tokens per second of training steps, warm-up steps excluded; MFU = FLOPs per real token
(tunepipe.training.train_flops_per_token) x tokens/s over the peak matmul rate of the variant's precision
(tunepipe.modeling.matmul_rates), measured before and after the runs (the better of the two).

    python benchmarks/train_throughput.py [--steps 60] [--batch-size 32] [--max-length 64] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import torch
from transformers import TrainerCallback, get_linear_schedule_with_warmup

from tunepipe.modeling import build_model, cpu_isa, cpu_model, load_tokenizer, matmul_rates, pick_precision
from tunepipe.params import parse_params
from tunepipe.tasks import get_task
from tunepipe.tasks.classification.data import load_source, select_columns
from tunepipe.training import train_flops_per_token

WARMUP = 5
LABELS = ["negative", "neutral", "positive"]


class StepTimer(TrainerCallback):
    """Wall time and real tokens from the end of warm-up to the last training step (no eval, no saving)."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen
        self.t1, self.tok1 = time.perf_counter(), state.num_input_tokens_seen


def texts_and_labels(n: int, seed: int) -> tuple[list[str], list[int]]:
    df = select_columns(load_source("builtin:tweets")["all"], "text", "sentiment", "builtin:tweets")
    df = df.sample(n=n, random_state=seed)
    labels = sorted(df["label"].unique())
    return df["text"].tolist(), [labels.index(x) for x in df["label"]]


def ours(p, texts, labels, warmup: int, **overrides) -> tuple[float, int]:
    import datasets

    from tunepipe.training import build_trainer

    tok = load_tokenizer(p.model.name)
    enc = tok(texts, truncation=True, max_length=p.tokenize.max_length)
    ds = datasets.Dataset.from_dict({**enc, "labels": labels, "length": [len(x) for x in enc["input_ids"]]})
    timer = StepTimer(warmup)  # eval_steps is past the end: only the final eval/save runs, after the timed steps
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(p, datasets.DatasetDict(train=ds, validation=ds.select(range(64))), LABELS, out,
                                [timer], save_checkpoints=False, args_overrides=overrides)
        trainer.train()
    return timer.t1 - timer.t0, timer.tok1 - timer.tok0


def reference(p, texts, labels, steps: int, pad_to: int, precision: str) -> tuple[float, int]:
    torch.manual_seed(p.finetune.seed)
    tok = load_tokenizer(p.model.name)
    enc = tok(texts, padding="max_length", truncation=True, max_length=pad_to, return_tensors="pt")
    data = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                          torch.tensor(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=p.finetune.batch_size, shuffle=True)
    model = build_model(p.model.name, LABELS, p.finetune, get_task("classification")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.finetune.learning_rate, weight_decay=p.finetune.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)

    def autocast():  # as Trainer's bf16=True does on CPU
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    step, tokens = 0, 0
    for ids, mask, types, y in loader:
        if step == WARMUP:
            t0, tokens = time.perf_counter(), 0
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=y).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        tokens += int(mask.sum())
        step += 1
        if step == steps:
            break
    return time.perf_counter() - t0, tokens


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed-pad", type=int, default=128, help="the tutorial's fixed padding (the seeds' setting)")
    ap.add_argument("--model", default="builtin:minilm-l6")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile on few cores)")
    args = ap.parse_args()
    p = parse_params({"model": {"name": args.model}, "tokenize": {"max_length": args.max_length},
                      "finetune": {"batch_size": args.batch_size, "max_steps": args.steps, "eval_steps": 10**6}})
    ours_precision = pick_precision("auto")
    texts, labels = texts_and_labels(args.steps * args.batch_size, seed=0)
    tok = load_tokenizer(p.model.name)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    # Useful work per real token, the same for every variant (padding is waste, not work).
    per_token = train_flops_per_token(build_model(p.model.name, LABELS, p.finetune, get_task("classification")),
                                      lengths)
    load_before = load_average()
    peak = matmul_rates(("fp32", "bf16"))

    variants = {  # name -> (precision, run)
        f"tutorial loop, pad to {args.seed_pad}, fp32 (the seeds' settings)":
            ("fp32", lambda: reference(p, texts, labels, args.steps, args.seed_pad, "fp32")),
        f"tutorial loop, pad to {args.max_length}, {ours_precision} (our settings)":
            (ours_precision, lambda: reference(p, texts, labels, args.steps, args.max_length, ours_precision)),
        f"tunepipe finetune ({ours_precision}, dynamic padding, length-grouped)":
            (ours_precision, lambda: ours(p, texts, labels, WARMUP)),
        "tunepipe finetune + fused AdamW": (ours_precision, lambda: ours(p, texts, labels, WARMUP,
                                                                          optim="adamw_torch_fused")),
    }
    if args.compile:  # compiling (and recompiling for new sequence lengths) is in the warm-up, as far as it goes
        variants["tunepipe finetune + torch.compile"] = (ours_precision, lambda: ours(
            p, texts, labels, min(3 * WARMUP, args.steps // 2), torch_compile=True))
    results = {}
    for name, (precision, run) in variants.items():
        seconds, tokens = run()
        results[name] = {"precision": precision, "tokens_per_s": round(tokens / seconds, 1),
                         "seconds": round(seconds, 2)}
        print(f"{name}: {tokens / seconds:,.0f} real tokens/s", flush=True)
    after = matmul_rates(("fp32", "bf16"))
    peak = {k: max(peak[k], after[k]) for k in peak}
    base_seed, base_ours, mine = (results[k]["tokens_per_s"] for k in list(variants)[:3])
    for r in results.values():
        r["mfu"] = round(per_token * r["tokens_per_s"] / peak[r["precision"]], 4)
        r["x_vs_seeds_tutorial"] = round(r["tokens_per_s"] / base_seed, 2)
        r["x_vs_tutorial_at_our_settings"] = round(r["tokens_per_s"] / base_ours, 2)
    summary = {
        "cpu": cpu_model() if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "isa": cpu_isa(), "threads": torch.get_num_threads(), "model": args.model,
        "steps_timed": args.steps - WARMUP, "batch_size": args.batch_size, "max_length": args.max_length,
        "load_average_before": load_before, "load_average_after": load_average(),
        "train_flops_per_token": round(per_token),
        "peak_matmul_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "speedup_vs_seeds_tutorial": round(mine / base_seed, 2), "speedup_vs_tutorial_at_our_settings":
            round(mine / base_ours, 2), "variants": results,
    }
    print(f"\n{summary['cpu']} ({summary['isa']}, {summary['threads']} threads), load average before "
          f"{load_before}, after {summary['load_average_after']}; matmul peak fp32 "
          f"{summary['peak_matmul_gflops']['fp32']:,} / bf16 {summary['peak_matmul_gflops']['bf16']:,} GFLOP/s; "
          f"{per_token / 1e6:.1f} MFLOP per real token")
    print(f"{'variant':<64} {'tokens/s':>9} {'MFU':>6} {'x seeds':>8} {'x ours':>7}")
    for name, r in results.items():
        print(f"{name:<64} {r['tokens_per_s']:>9,.0f} {r['mfu']:>6.1%} {r['x_vs_seeds_tutorial']:>7.2f}x "
              f"{r['x_vs_tutorial_at_our_settings']:>6.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
