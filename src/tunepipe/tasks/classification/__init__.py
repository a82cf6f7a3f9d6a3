"""Text classification: one label per text (sentiment, topic, intent). Sequence-classification head; test
metrics accuracy, macro-F1 (the headline) and weighted F1; served output: label, score and class probabilities."""

from __future__ import annotations

from tunepipe.tasks import Task


class Classification(Task):
    name = "classification"
    headline_metric = "macro_f1"
    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def prepare(self, p):
        from tunepipe.tasks.classification.data import prepare

        return prepare(p)

    def tokenize(self, p, prepared):
        from tunepipe.tasks.classification.encode import tokenize

        return tokenize(p, prepared)

    def augment(self, train, p):
        from tunepipe.tasks.classification.augment import augment

        return augment(train, p)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, labels):
        from tunepipe.tasks.classification.metrics import compute_metrics

        return compute_metrics

    def evaluate(self, model, tokenizer, test, labels, reports):
        from tunepipe.tasks.classification.evaluate import evaluate

        return evaluate(model, tokenizer, test, labels, reports)

    def scored_positions(self, batch):
        return slice(None)  # one prediction per text

    def gold_labels(self, ds):
        import numpy as np

        return np.asarray(ds["labels"])

    def paired_p_value(self, s, new, old):
        from tunepipe.tasks.classification.metrics import paired_p_value

        return paired_p_value(s, new["label"].tolist(), new["prediction"].tolist(), old["prediction"].tolist())

    def rescore(self, s, test, models):
        from tunepipe.tasks.classification.metrics import rescore

        return rescore(s, test, models)

    def describe_prediction(self, text, result):
        probs = "  ".join(f"{k}={v:.3f}" for k, v in result["probabilities"].items())
        return f"{result['label']}\t{result['score']:.3f}\t{probs}\t{text}"


TASK = Classification()
