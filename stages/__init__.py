"""The DVC stages: `python -m stages.<module>` entry points, one per stage in dvc.yaml; not installed."""
