"""Text classification: one label per text (sentiment, topic, intent). Sequence-classification head; test
metrics accuracy, macro-F1 (the headline) and weighted F1; served output: label, score and class probabilities."""

from __future__ import annotations

from tunepipe.tasks import Task


class Classification(Task):
    name = "classification"
    headline_metric = "macro_f1"
    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    long_text_modes = ("truncate", "window")
    explainable = True
    zero_shot_unsupported = None  # nearest label description per text (evaluate.zero_shot_metrics)
    setfit = True

    def validation_metrics(self, labels, validation, p):
        # Windows of one text are scored as that text, aggregated the way evaluate and serving do.
        text_ids = validation["text_id"] if "text_id" in validation.column_names else None
        return self.part("metrics").compute_metrics(labels, text_ids, p.tokenize.window_aggregation)

    def evaluate(self, model, tokenizer, test, labels, reports, info=None):
        aggregation = (info or {}).get("window_aggregation", "mean")
        return self.part("evaluate").evaluate(model, tokenizer, test, labels, reports, aggregation)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def scored_positions(self, batch):
        return slice(None)  # one prediction per text

    def gold_labels(self, ds):
        import numpy as np

        return np.asarray(ds["labels"])

    def label_ids(self, train):
        import numpy as np

        return np.asarray(train["labels"])  # one per text

    def served_probabilities(self, results):
        import numpy as np

        labels = list(results[0]["probabilities"]) if results else []
        return labels, np.array([[r["probabilities"][lab] for lab in labels] for r in results], dtype=np.float64)

    def describe_prediction(self, text, result):
        probs = "  ".join(f"{k}={v:.3f}" for k, v in result["probabilities"].items())
        return f"{result['label']}\t{result['score']:.3f}\t{probs}\t{text}"


TASK = Classification()
