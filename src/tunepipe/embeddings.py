"""Sentence embeddings of a pretrained encoder through sentence-transformers (as fewshot.py loads SetFit's body):
a sentence-transformers model (the embedded all-MiniLM-L6-v2: mean pooling, normalised) as it is, a plain
transformers encoder with sentence-transformers' default mean pooling; rows L2-normalised, so a dot product is a
cosine. Used by evaluate's zero-shot baseline and by `tunepipe suggest` (diversity, near-duplicates)."""

from __future__ import annotations

import numpy as np

from tunepipe.errors import UserError
from tunepipe.modeling import ensure_pad_token, resolve_model


class SentenceEncoder:
    """model.name (builtin:, a local directory or a hub id) as a sentence encoder, fp32, on the CPU or CUDA."""

    def __init__(self, name: str, batch_size: int = 64):
        import torch
        from sentence_transformers import SentenceTransformer

        self.batch_size = batch_size
        try:
            # fp32 forced: the zero-shot figure must not depend on which CPU picks bf16.
            self.model = SentenceTransformer(resolve_model(name), device="cuda" if torch.cuda.is_available() else "cpu",
                                             trust_remote_code=False, model_kwargs={"dtype": torch.float32})
        except (OSError, ValueError) as exc:
            raise UserError(f"model.name: could not load '{name}' as a sentence encoder: "
                            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
        # A GPT-2 style tokenizer has no pad token: pad with its end-of-sequence token, as training does.
        ensure_pad_token(self.model.tokenizer, name)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32, each row of unit length."""
        return self.model.encode([str(t) for t in texts], batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False).astype(np.float32)
