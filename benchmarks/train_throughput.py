"""Training throughput of the finetune stage vs. the common tutorial loop, on the same model, data and steps.

Reference ("tutorial"): every example padded to tokenize.max_length, fp32, random batches, a plain PyTorch loop
with AdamW and a linear schedule. Ours: tunepipe.training.build_trainer, exactly what `dvc repro` runs (dynamic
padding, length-grouped batches, bf16 autocast where the hardware runs it fast).
Figure: real (non-padding) tokens per second of training steps, warm-up steps excluded.

    python benchmarks/train_throughput.py [--steps 60] [--batch-size 32] [--max-length 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import TrainerCallback, get_linear_schedule_with_warmup

from tunepipe.modeling import build_model, cpu_model, load_tokenizer, pick_precision
from tunepipe.params import parse_params
from tunepipe.tasks import get_task
from tunepipe.tasks.classification.data import load_source, select_columns

WARMUP = 5


class StepTimer(TrainerCallback):
    """Wall time and real tokens from the end of warm-up to the last training step (no eval, no saving)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP:
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen
        self.t1, self.tok1 = time.perf_counter(), state.num_input_tokens_seen


def texts_and_labels(n: int, seed: int) -> tuple[list[str], list[int]]:
    df = select_columns(load_source("builtin:tweets")["all"], "text", "sentiment", "builtin:tweets")
    df = df.sample(n=n, random_state=seed)
    labels = sorted(df["label"].unique())
    return df["text"].tolist(), [labels.index(x) for x in df["label"]]


def ours(p, texts, labels, steps: int) -> tuple[float, int]:
    import datasets

    from tunepipe.training import build_trainer

    tok = load_tokenizer(p.model.name)
    enc = tok(texts, truncation=True, max_length=p.tokenize.max_length)
    ds = datasets.Dataset.from_dict({**enc, "labels": labels, "length": [len(x) for x in enc["input_ids"]]})
    timer = StepTimer()  # eval_steps is past the end: only the final eval/save runs, after the timed steps
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(p, datasets.DatasetDict(train=ds, validation=ds.select(range(64))),
                                ["negative", "neutral", "positive"], out, [timer])
        trainer.train()
    return timer.t1 - timer.t0, timer.tok1 - timer.tok0


def reference(p, texts, labels, steps: int) -> tuple[float, int]:
    torch.manual_seed(p.finetune.seed)
    tok = load_tokenizer(p.model.name)
    enc = tok(texts, padding="max_length", truncation=True, max_length=p.tokenize.max_length, return_tensors="pt")
    data = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                          torch.tensor(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=p.finetune.batch_size, shuffle=True)
    model = build_model(p.model.name, ["negative", "neutral", "positive"], p.finetune,
                        get_task("classification")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.finetune.learning_rate, weight_decay=p.finetune.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    step, tokens = 0, 0
    for ids, mask, types, y in loader:
        if step == WARMUP:
            t0, tokens = time.perf_counter(), 0
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--model", default="builtin:minilm-l6")
    args = ap.parse_args()
    p = parse_params({"model": {"name": args.model}, "tokenize": {"max_length": args.max_length},
                      "finetune": {"batch_size": args.batch_size, "max_steps": args.steps, "eval_steps": 10**6}})
    texts, labels = texts_and_labels(args.steps * args.batch_size, seed=0)
    ref_s, ref_tok = reference(p, texts, labels, args.steps)
    our_s, our_tok = ours(p, texts, labels, args.steps)
    ref_tps, our_tps = ref_tok / ref_s, our_tok / our_s
    result = {
        "cpu": cpu_model() if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "threads": torch.get_num_threads(), "model": args.model, "steps_timed": args.steps - WARMUP,
        "batch_size": args.batch_size, "max_length": args.max_length, "precision_ours": pick_precision("auto"),
        "reference_tokens_per_s": round(ref_tps, 1), "ours_tokens_per_s": round(our_tps, 1),
        "reference_s": round(ref_s, 2), "ours_s": round(our_s, 2), "speedup": round(our_tps / ref_tps, 2),
    }
    print(f"reference (pad to {args.max_length}, fp32, random batches): {ref_tps:,.0f} real tokens/s")
    print(f"tunepipe finetune ({result['precision_ours']}, dynamic padding, length-grouped): {our_tps:,.0f} "
          f"real tokens/s")
    print(f"speedup: {result['speedup']}x on {result['cpu']} ({result['threads']} threads)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
