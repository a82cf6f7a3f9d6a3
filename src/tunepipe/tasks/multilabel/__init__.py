"""Multi-label classification: any number of labels per text (emotions, topics, tags). Sequence-classification
head with a sigmoid per label and binary cross-entropy (problem_type multi_label_classification); a decision
threshold per label, tuned on validation (multilabel.threshold); test metrics micro-F1 (the headline), macro- and
samples-F1, subset accuracy, Hamming loss and per-label precision/recall/F1; served output: the labels above their
thresholds with their probabilities, and every label's probability."""

from __future__ import annotations

from tunepipe.tasks import Task


class Multilabel(Task):
    name = "multilabel"
    headline_metric = "micro_f1"
    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    problem_type = "multi_label_classification"
    calibrator = "sigmoid"  # one temperature per label (tunepipe/calibration.py)
    explainable = True  # one label's logit at a time (the most probable, or the one asked for)
    # A label is given where the text's score passes a threshold; cosines have no threshold that holds without
    # labelled data to tune it on, so an embedding baseline would report that guess, not the model.
    zero_shot_unsupported = ("multi-label needs a decision threshold per label, which cannot be chosen without "
                             "labelled data")

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)  # labels: one float 0/1 vector per text

    def validation_metrics(self, labels, validation, p):
        return self.part("metrics").compute_metrics(labels, p.multilabel.threshold)

    def scored_positions(self, batch):
        return slice(None)  # one logit vector per text

    def trained_metadata(self, trainer, dsd, labels, p):
        return self.part("metrics").trained_thresholds(trainer, dsd["validation"], labels, p.multilabel.threshold)

    def served_metadata(self, info):
        return {"thresholds": info["thresholds"]}

    def describe_prediction(self, text, result):
        chosen = ", ".join(f"{x['label']} {x['probability']:.3f}" for x in result["labels"]) or "(none)"
        return f"{chosen}\t{text}"


TASK = Multilabel()
