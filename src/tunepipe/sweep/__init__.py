"""`tunepipe sweep`: an Optuna study over finetune's learning rate, batch size and dropout.

Each trial trains through tunepipe.training.build_trainer (the finetune stage's code path) on data/augmented and
reports the task's validation `headline_metric` at every evaluation, so pruners stop poor trials early. The study
lives in an RDB storage (default: sqlite optuna.db in the project; PostgreSQL to share it across processes and
machines): running the same command again resumes it, and a trial whose process died is retried once its
heartbeat is stale.

`sweep.trials` is the number of finished (complete + pruned) trials the *study* should end with, across every
worker and invocation. Workers reserve a slot by trial number: a trial runs only if fewer than `trials` trials with
a smaller number are finished, running or queued, so parallel workers never overshoot.
"""
