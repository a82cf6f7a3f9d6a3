"""The model finetune.method: setfit trains: an encoder body, mean pooling over the attention mask, L2
normalisation and a linear head, i.e. the sentence-embedding classifier SetFit builds, as one plain torch module.

Why not BertForSequenceClassification: it classifies the [CLS] token through BERT's tanh pooler, while SetFit's
head was trained on the normalised mean of all token embeddings; copying the head into it would change every
prediction. So the model has its own small class, saved as transformers models are (config.json, whose
`tunepipe_pooling` key marks it, and model.safetensors) and loaded from those files alone: no pickles, no
trust_remote_code. Everything downstream sees what a sequence-classification model gives (.logits, .config,
get_input_embeddings for the word attributions), and it exports to ONNX like any other.

Self-contained (no tunepipe imports): the served pyfunc logs it beside explain.py (MLflow code_paths), which loads
the fine-tuned PyTorch model for explanations with `load_classifier`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MARKER = "tunepipe_pooling"  # config.json key of a model of this class; its value names the pooling
POOLING = "mean_normalized"
WEIGHTS = "model.safetensors"


class SentenceEmbeddingClassifier(torch.nn.Module):
    """body (transformers AutoModel) -> mean over the attention mask -> L2 normalise -> linear head (logits)."""

    def __init__(self, config):
        from transformers import AutoModel

        super().__init__()
        self.config = config
        self.body = AutoModel.from_config(config)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)

    def get_input_embeddings(self):
        return self.body.get_input_embeddings()

    def embed(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        """The normalised mean-pooled sentence embedding (sentence-transformers' Pooling(mean) + Normalize)."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           **kwargs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.embed(input_ids, attention_mask, token_type_ids, inputs_embeds))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.classifier.weight.dtype

    def save_pretrained(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        setattr(self.config, MARKER, POOLING)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(out_dir)
        # contiguous copies: safetensors refuses views, and tied/shared tensors
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(out_dir / WEIGHTS))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **_) -> SentenceEmbeddingClassifier:
        from safetensors.torch import load_file
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        if getattr(config, MARKER, None) != POOLING:
            raise ValueError(f"{model_dir}: not a {cls.__name__} ({MARKER}: {getattr(config, MARKER, None)!r})")
        model = cls(config)
        state = load_file(str(Path(model_dir) / WEIGHTS))
        # Buffers a body may or may not save (e.g. BERT's position_ids) are rebuilt by its constructor.
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
        if missing or unexpected:
            raise ValueError(f"{model_dir}/{WEIGHTS}: weights do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return model.eval()


def is_sentence_classifier(model_dir: str | Path) -> bool:
    config = Path(model_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get(MARKER) == POOLING


def load_classifier(model_dir: str | Path, **kwargs):
    """A saved one-label-per-text model: this class where config.json marks it, else transformers'
    AutoModelForSequenceClassification (safetensors, no remote code); in eval mode."""
    if is_sentence_classifier(model_dir):
        return SentenceEmbeddingClassifier.from_pretrained(model_dir)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False, **kwargs).eval()
