"""Named-entity recognition: a tag per word (CoNLL IOB1/IOB2/BIOES). Token-classification head; test metrics
seqeval's strict entity F1 (the headline), precision and recall; served output: entity spans with offsets."""

from __future__ import annotations

from tunepipe.tasks import Task


class Ner(Task):
    name = "ner"
    headline_metric = "f1"
    auto_model = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"

    def prepare(self, p):
        from tunepipe.tasks.ner.data import prepare

        return prepare(p)

    def tokenize(self, p, prepared):
        from tunepipe.tasks.ner.encode import tokenize

        return tokenize(p, prepared)

    def augment(self, train, p):
        from tunepipe.tasks.ner.augment import augment

        return augment(train, p)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    def compute_metrics(self, labels):
        from tunepipe.tasks.ner.metrics import ner_metrics

        return ner_metrics(labels)

    def evaluate(self, model, tokenizer, test, labels, reports):
        from tunepipe.tasks.ner.evaluate import evaluate

        return evaluate(model, tokenizer, test, labels, reports)

    def scored_positions(self, batch):
        return batch["attention_mask"].astype(bool)  # every real token (evaluate scores the words)

    def paired_p_value(self, s, new, old):
        from tunepipe.tasks.ner.metrics import paired_p_value

        return paired_p_value(s, new, old)

    def describe_prediction(self, text, result):
        ents = ", ".join(f"{e['text']} [{e['type']}] {e['score']:.2f}" for e in result["entities"]) or "(none)"
        return f"{text}\n  entities: {ents}"


TASK = Ner()
