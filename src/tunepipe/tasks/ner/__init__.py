"""Named-entity recognition: a tag per word (CoNLL IOB1/IOB2/BIOES). Token-classification head; test metrics
seqeval's strict entity F1 (the headline), precision and recall; served output: entity spans with offsets."""

from __future__ import annotations

from tunepipe.tasks import Task


class Ner(Task):
    name = "ner"
    headline_metric = "f1"
    auto_model = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    extra_perturbations = ("context_noise",)  # noise around the entities, which stay as they are
    zero_shot_unsupported = "NER tags words and spans, not texts: a sentence embedding has no per-word decision"

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    def scored_positions(self, batch):
        return batch["attention_mask"].astype(bool)  # every real token (evaluate scores the words)

    def label_ids(self, train):
        import numpy as np

        from tunepipe.tasks.ner.encode import IGNORED

        ids = np.concatenate([np.asarray(row, dtype=np.int64) for row in train["labels"]] or [np.zeros(0, np.int64)])
        return ids[ids != IGNORED]  # one per labelled sub-token: what the loss sees

    def describe_prediction(self, text, result):
        ents = ", ".join(f"{e['text']} [{e['type']}] {e['score']:.2f}" for e in result["entities"]) or "(none)"
        return f"{text}\n  entities: {ents}"


TASK = Ner()
