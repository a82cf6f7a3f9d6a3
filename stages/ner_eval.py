"""Token classification (NER) support: being built (issue 5)."""

from stages.errors import UserError


def _not_yet(*_args, **_kwargs):
    raise UserError("task: ner is not available yet in this version; use task: classification")


prepare_ner = tokenize_ner = augment_ner = ner_metrics = evaluate_ner = _not_yet
