"""The served model. pyfunc_model.py is stored with every registered version (MLflow "models from code"), so it
imports nothing from tunepipe."""

from pathlib import Path

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
