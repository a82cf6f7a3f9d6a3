"""`tunepipe promote` and `tunepipe models`: a `champion` alias that only moves for a real improvement.

Every `dvc repro` registers a version of `tracking.model_name` (the export stage, tunepipe/tracking.py's
register) tagged with its task, its test metrics (`metric.<name>`), the hash of the test split it was scored on,
its git commit and params. `promote` compares a candidate with the current champion on `promote.metric`,
optionally with a paired significance test on the per-example test predictions (the task's metrics module, on
registry/significance.py), records the decision as version tags and moves the alias only for a yes. History
lives on the versions: `champion.previous` on each champion is what `--rollback` follows.

Concurrency: the decision is made unlocked, then, under a lock, the champion is re-read and the alias moved
only if it is still the version the candidate was compared with (else the candidate is judged again). The lock
is a file lock beside a sqlite/file store, a PostgreSQL advisory lock for a postgresql store, and for a
tracking server a lock entry in the registry itself (creating a registered model is atomic on the server).
"""
