"""Sentence embeddings from a pretrained encoder, the way sentence-transformers computes them for
all-MiniLM-L6-v2: mean of the token embeddings over the attention mask, then L2-normalised (so a dot product is a
cosine). Used by evaluate's zero-shot baseline and by `tunepipe suggest` (diversity, near-duplicates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunepipe.files import read_json
from tunepipe.modeling import from_pretrained, input_limit, load_config, load_tokenizer, resolve_model

# sentence-transformers' own cap where a model directory does not state one (sentence_bert_config.json).
DEFAULT_MAX_LENGTH = 256


class SentenceEncoder:
    """model.name (builtin:, a local directory or a hub id) as a sentence encoder, fp32, on the CPU or CUDA."""

    def __init__(self, name: str, batch_size: int = 64, max_length: int | None = None):
        import torch
        from transformers import AutoModel

        self.name, self.batch_size = name, batch_size
        self.tokenizer = load_tokenizer(name)
        config = load_config(name)
        self.max_length = max_length or stated_max_length(resolve_model(name)) or DEFAULT_MAX_LENGTH
        limit = input_limit(config, self.tokenizer)
        if limit is not None:
            self.max_length = min(self.max_length, limit[0])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 forced: the zero-shot figure must not depend on which CPU picks bf16.
        self.model = from_pretrained(name, "model weights", lambda path: AutoModel.from_pretrained(
            path, trust_remote_code=False, dtype=torch.float32)).to(self.device).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32, each row of unit length. Batches in order of length (little padding)."""
        import torch

        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()
        return out


def stated_max_length(path: str) -> int | None:
    """max_seq_length from a sentence-transformers model directory (256 for all-MiniLM-L6-v2), where it has one."""
    cfg = Path(path) / "sentence_bert_config.json"
    if not cfg.is_file():
        return None
    try:
        value = read_json(cfg).get("max_seq_length")
    except ValueError:
        return None
    return int(value) if isinstance(value, int) and value > 0 else None

