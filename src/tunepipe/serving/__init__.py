"""The served model. pyfunc_model.py is stored with every registered version (MLflow "models from code"), so it
imports nothing from tunepipe; explain.py (word attributions) and sentence_classifier.py (the SetFit model's class,
which explain.py loads) are stored beside it (code_paths). The task's output code (tasks/<task>/serve.py) is copied
into the exported model directory as serve.py."""

from pathlib import Path

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
EXPLAIN_CODE = Path(__file__).with_name("explain.py")
# The SetFit-trained model's class (finetune.method: setfit), which explain.py loads: stored beside it.
SENTENCE_CLASSIFIER_CODE = Path(__file__).with_name("sentence_classifier.py")
