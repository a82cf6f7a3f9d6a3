"""tunepipe: fine-tune BERT-family encoders reproducibly (DVC stages, MLflow tracking and registry, Optuna sweeps).

The DVC entry points live in the project's stages/ directory; this package holds everything they call.
"""

__version__ = "0.1.0"
