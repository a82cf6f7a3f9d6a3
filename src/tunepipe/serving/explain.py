"""Why the model said so: word-level integrated gradients (Captum's LayerIntegratedGradients on the word
embeddings) from the fine-tuned PyTorch model, and their display (terminal text, a highlighted HTML page).

Self-contained on purpose (no tunepipe imports): the served pyfunc logs this file beside pyfunc_model.py (MLflow
code_paths) and imports it only when a request asks for explanations; `tunepipe predict --explain` and the
evaluate stage use the same code. torch, transformers and captum are imported only when explaining.

Recipe: the baseline is the input with every token but [CLS]/[SEP] (the special tokens) replaced by the pad token;
the path from it to the input is integrated in `n_steps` steps; the target is the explained label's logit.
Sub-token attributions (summed over the embedding dimension) are summed into words (the fast tokenizer's
word_ids and offsets). Weights are signed, in logit units: they add up to the label's logit minus its logit on
the baseline, up to the convergence delta reported with them. A text longer than the model's max_length is
explained on its first max_length tokens.
"""

from __future__ import annotations

import html
import importlib
import json
from collections.abc import Sequence
from pathlib import Path

TRAINING_INFO = "training_info.json"  # the model's own metadata, written by finetune (labels, max_length)


def merge_words(text: str, word_ids: Sequence[int | None], offsets: Sequence[tuple[int, int]],
                weights: Sequence[float]) -> list[dict]:
    """Sub-token weights -> one {word, weight, start, end} per word (the sum of its sub-tokens), in text order;
    special and padding tokens (word id None) are left out."""
    words: dict[int, dict] = {}
    for w, (start, end), weight in zip(word_ids, offsets, weights, strict=True):
        if w is None:
            continue
        if w not in words:
            words[w] = {"start": int(start), "end": int(end), "weight": 0.0}
        entry = words[w]
        entry["start"], entry["end"] = min(entry["start"], int(start)), max(entry["end"], int(end))
        entry["weight"] += float(weight)
    return [{"word": text[e["start"]:e["end"]], "weight": e["weight"], "start": e["start"], "end": e["end"]}
            for _, e in sorted(words.items())]


def sentence_classifier():
    """sentence_classifier.py: tunepipe's own copy inside the package; in the served model, the copy logged beside
    this file (MLflow code_paths puts both on sys.path)."""
    if __package__:
        return importlib.import_module(".sentence_classifier", __package__)
    return importlib.import_module("sentence_classifier")


class Explainer:
    """Integrated gradients of a saved sequence-classification model (a directory with config, safetensors and
    a fast tokenizer, as finetune writes models/model)."""

    def __init__(self, model_dir: str | Path, n_steps: int = 32, max_length: int | None = None):
        import torch
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        info_file = model_dir / TRAINING_INFO
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        # a SetFit-trained model (sentence_classifier.py) or a transformers sequence-classification one
        self.model = sentence_classifier().load_classifier(model_dir, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.labels: list[str] = info.get("labels") or [self.model.config.id2label[i]
                                                          for i in range(self.model.config.num_labels)]
        self.max_length = int(max_length or info.get("max_length") or min(self.tokenizer.model_max_length, 512))
        self.n_steps = int(n_steps)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.unk_token_id or 0)

    def label_index(self, label: str) -> int:
        if label not in self.labels:
            raise ValueError(f"explain_label: unknown label {label!r} (labels: {', '.join(self.labels)})")
        return self.labels.index(label)

    def explain(self, texts: Sequence[str], labels: str | Sequence[str | None] | None = None,
                batch_size: int = 8) -> list[dict]:
        """Per text: {"explained_label", "attributions": [{word, weight, start, end}], "convergence_delta"}.
        labels: None = each text's predicted label (the most probable one, for a multi-label model), one label
        for all texts, or one per text (None = predicted)."""
        import torch
        from captum.attr import LayerIntegratedGradients

        texts = list(texts)
        if labels is None or isinstance(labels, str):
            labels = [labels] * len(texts)
        wanted = [None if lab in (None, "") else self.label_index(lab) for lab in labels]
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in self.tokenizer.model_input_names]

        def forward(input_ids, attention_mask, *rest):
            extra = dict(zip(names[2:], rest, strict=True))
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

        lig = LayerIntegratedGradients(forward, self.model.get_input_embeddings())
        out: list[dict] = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            enc = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
            ids = enc["input_ids"]
            # Baseline: pad everywhere but the special tokens ([CLS], [SEP], and the padding itself).
            baseline = torch.where(enc["special_tokens_mask"].bool(), ids, torch.full_like(ids, self.pad_id))
            with torch.no_grad():
                predicted = forward(*(enc[n] for n in names)).argmax(-1).tolist()
            target = [p if w is None else w for p, w in zip(predicted, wanted[i:i + batch_size], strict=True)]
            attrs, delta = lig.attribute(inputs=ids, baselines=baseline,
                                         additional_forward_args=tuple(enc[n] for n in names[1:]), target=target,
                                         n_steps=self.n_steps, return_convergence_delta=True)
            token_weights = attrs.sum(-1).detach().numpy()
            for row, text in enumerate(chunk):
                out.append({"explained_label": self.labels[target[row]],
                            "attributions": merge_words(text, enc.word_ids(row), enc["offset_mapping"][row].tolist(),
                                                        token_weights[row].tolist()),
                            "convergence_delta": float(delta[row])})
        return out


# ---- display ----

GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


def format_words(attributions: Sequence[dict], color: bool = False, digits: int = 2) -> str:
    """`word(+0.42) word(-0.10) ...`; with color, positive words green and negative red (ANSI)."""
    parts = []
    for a in attributions:
        item = f"{a['word']}({a['weight']:+.{digits}f})"
        if color and round(a["weight"], digits):
            item = f"{GREEN if a['weight'] > 0 else RED}{item}{RESET}"
        parts.append(item)
    return " ".join(parts)


def highlight(text: str, attributions: Sequence[dict]) -> str:
    """The text as HTML, each word's background green (positive) or red (negative), its strength relative to the
    largest |weight| in the text; the text between words kept as it was."""
    scale = max((abs(a["weight"]) for a in attributions), default=0.0) or 1.0
    out, pos = [], 0
    for a in attributions:
        out.append(html.escape(text[pos:a["start"]]))
        alpha = abs(a["weight"]) / scale
        rgb = "0,160,60" if a["weight"] > 0 else "220,30,30"
        out.append(f'<span style="background:rgba({rgb},{alpha:.2f})" title="{a["weight"]:+.4f}">'
                   f"{html.escape(text[a['start']:a['end']])}</span>")
        pos = a["end"]
    out.append(html.escape(text[pos:]))
    return "".join(out)


def html_page(title: str, sections: Sequence[tuple[str, Sequence[dict]]], intro: str = "") -> str:
    """A self-contained page: sections of (heading, items); an item is {"text", "attributions",
    "explained_label", "convergence_delta", optionally "caption"}."""
    body = []
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if not items:
            body.append('<p class="none">none</p>')
        for item in items:
            caption = item.get("caption") or f"explained label: {item['explained_label']}"
            top = sorted(item["attributions"], key=lambda a: -a["weight"])[:3]
            body.append(
                '<div class="item"><div class="caption">' + html.escape(caption)
                + f" &middot; convergence delta {item['convergence_delta']:+.3g}"
                + " &middot; leans on: " + html.escape(", ".join(a["word"] for a in top if a["weight"] > 0) or "-")
                + f'</div><div class="text">{highlight(item["text"], item["attributions"])}</div></div>')
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
             ".item{margin:.8em 0;padding:.5em .8em;border:1px solid #ddd;border-radius:4px}"
             ".caption{font-size:.85em;color:#555;margin-bottom:.3em}.text{line-height:1.8}"
             ".text span{border-radius:3px;padding:0 1px}.none{color:#888}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + (f"<p>{html.escape(intro)}</p>" if intro else "")
            + '<p><span style="background:rgba(0,160,60,.6)">green</span>: pushes toward the explained label; '
            '<span style="background:rgba(220,30,30,.6)">red</span>: pushes away from it (integrated gradients, '
            "hover a word for its weight).</p>" + "".join(body) + "</body></html>\n")
