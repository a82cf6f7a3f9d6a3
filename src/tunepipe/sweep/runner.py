"""Running trials: the objective, the pruning callback, the loop filling the study's slots, dead/interrupted trials."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time

import optuna
from optuna.trial import FrozenTrial, TrialState
from transformers import PrinterCallback, TrainerCallback

from tunepipe import distributed
from tunepipe.errors import UserError, masked
from tunepipe.params import Params, SweepParams
from tunepipe.sweep.study import (
    ERROR_ATTR,
    MAX_RETRY,
    RUN_ATTR,
    SURPLUS_ATTR,
    _experimental_ok,
    _frozen,
    n_reserved,
    suggest,
    trial_counts,
    trial_params,
)

# A systematic error (every trial runs out of memory, the tracking server went away) stops the sweep after this many
# failed trials in a row instead of using up its time on trials that cannot finish.
MAX_FAILURES_IN_A_ROW = 3


class SurplusTrial(Exception):
    """A trial created after the study's slots were all taken by other workers; it is failed unrun."""


class TrialFailed(Exception):
    """A trial whose training raised (out of memory, a diverging run...): failed in the study, and the sweep goes on."""


class TooManyFailures(UserError):
    """MAX_FAILURES_IN_A_ROW trials failed one after another: the sweep stops with the last error."""


class _QuietTrialFailures(logging.Filter):
    """Optuna logs a failed trial with the exception's traceback; for the failures the sweep reports itself
    (TrialFailed: one line; UserError: the `error:` line it stops with) that would be a traceback for nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TrialFailed | UserError):
            return False
        # Its follow-up line for an exception (the trial has no value): "Trial 3 failed with value None."
        return not re.fullmatch(r"Trial \d+ failed with value None\.", record.getMessage())


_QUIET = _QuietTrialFailures()


# ---- one trial ----

class OptunaPruningCallback(TrainerCallback):
    """Reports the validation metric to the trial at every evaluation and stops the trial when the pruner says so.

    The step is training examples seen (epochs x train size), so trials with different batch sizes are compared
    after the same amount of data, not the same number of optimizer steps. In a distributed sweep rank 0 holds the
    trial (`trial`) and decides; the other processes (`trial=None`) take its decision, so all stop at once.
    """

    def __init__(self, trial: optuna.Trial | None, metric: str, n_train: int):
        self.trial, self.metric, self.n_train = trial, metric, n_train

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        pruned = None
        value = (metrics or {}).get(f"eval_{self.metric}")
        if self.trial is not None and value is not None:
            step = round((state.epoch or 0.0) * self.n_train)
            self.trial.report(float(value), step)
            # Pruning at the last evaluation would save nothing and throw away the trial's result.
            if state.global_step < state.max_steps and self.trial.should_prune():
                pruned = f"validation {self.metric} {value:.4f} after {step} examples"
        pruned = distributed.from_main(pruned)
        if pruned:
            raise optuna.TrialPruned(pruned)


class Objective:
    """Trains one trial as finetune would (no checkpoints, temp output dir) in a nested MLflow run.

    Subclasses change what a trial trains on and what it returns through _trial_setup and _score (the learning
    curve: a subset of the train split, scored on the test split), and keep the rest: runs, failures, pruning."""

    run_name = "trial"  # nested MLflow runs are named run_name-<trial number>
    save_checkpoints = False  # True: Trainer keeps the best checkpoint and loads it at the end (in the temp dir)

    def __init__(self, p: Params, sw: SweepParams, dsd, labels: list[str], target: int, exp_id: str,
                 parent_run_id: str, precision: str | None = None):
        from tunepipe.tasks import get_task

        self.p, self.sw, self.dsd, self.labels, self.target = p, sw, dsd, labels, target
        self.exp_id, self.parent_run_id, self.precision = exp_id, parent_run_id, precision
        self.metric = get_task(p.task).headline_metric
        self.current: int | None = None  # trial number in progress, for Ctrl-C handling
        self.ran = 0
        self.failed_in_a_row = 0

    def __call__(self, trial: optuna.Trial) -> float:
        if n_reserved(trial.study, before=trial.number) >= self.target:
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.study.stop()
            raise SurplusTrial(f"all {self.target} slots are taken by other workers; not run")
        self.current = trial.number
        try:
            value = self._train(trial)
        except optuna.TrialPruned:
            self.failed_in_a_row = 0
            raise
        except UserError:
            raise  # a mistake in params or data fails every trial alike: stop with its message
        except optuna.exceptions.UpdateFinishedTrialError:
            raise  # another worker failed it as stale: not this trial's fault (run_trials goes on)
        except Exception as exc:  # this trial's own failure (KeyboardInterrupt is not an Exception: it stops)
            self._failed(trial, exc)
        self.failed_in_a_row = 0
        return value

    def _failed(self, trial: optuna.Trial, exc: Exception) -> None:
        """Record why the trial failed (trial attr, MLflow tag), say it in one line, and fail it (or the sweep)."""
        import mlflow

        first = (str(exc).strip().splitlines() or [""])[0]
        error = masked(f"{type(exc).__name__}: {first}".rstrip(": "))[:500]
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed as stale meanwhile
            trial.set_user_attr(ERROR_ATTR, error)
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            with contextlib.suppress(Exception):  # the tracking store may be what failed
                mlflow.MlflowClient().set_tag(run_id, "tunepipe.error", error)
        self.failed_in_a_row += 1
        print(f"sweep: trial {trial.number} failed: {error}", file=sys.stderr, flush=True)
        if self.failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise TooManyFailures(
                f"sweep: stopped after {self.failed_in_a_row} trials in a row failed (last, trial {trial.number}: "
                f"{error}); fix the cause and run `tunepipe sweep` again to go on with the study") from None
        raise TrialFailed(error) from None

    def _trial_setup(self, trial: optuna.Trial) -> tuple[Params, object]:
        """The params and the DatasetDict this trial trains with: the sampled values, all of the data."""
        return trial_params(self.p, suggest(trial, self.sw)), self.dsd

    def _score(self, trial: optuna.Trial, trainer, tp: Params, dsd, run_id: str) -> float:
        """The trial's value once trained: its best validation metric."""
        return trainer.state.best_metric

    def _train(self, trial: optuna.Trial) -> float:
        tp, dsd = self._trial_setup(trial)
        run_id = self._start_run(trial, tp)
        trial.set_user_attr(RUN_ATTR, run_id)
        distributed.from_main(tp)  # a distributed sweep's other processes train these values with this one
        out = tempfile.mkdtemp(prefix=f"tunepipe-{self.run_name}-{trial.number}-")
        state, value, trainer = "fail", None, None
        try:
            from tunepipe import tracking
            from tunepipe.training import build_trainer

            trainer = build_trainer(tp, dsd, self.labels, out, save_checkpoints=self.save_checkpoints,
                                    precision=self.precision,
                                    callbacks=[tracking.MlflowMetricsCallback(run_id),
                                               OptunaPruningCallback(trial, self.metric, len(dsd["train"]))])
            trainer.remove_callback(PrinterCallback)  # per-step log dicts; Optuna prints one line per trial
            trainer.train()
            value = self._score(trial, trainer, tp, dsd, run_id)
            state = "complete"
            return float(value)
        except optuna.TrialPruned:
            state = "pruned"
            raise
        except KeyboardInterrupt:
            state = "killed"
            raise
        finally:
            epochs = float(trainer.state.epoch or 0.0) if trainer else 0.0
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed as stale meanwhile
                trial.set_user_attr("epochs_run", round(epochs, 4))
            self._finish_run(run_id, state, value, epochs)
            shutil.rmtree(out, ignore_errors=True)
            self.ran += 1
            del trainer

    def _start_run(self, trial: optuna.Trial, tp: Params) -> str:
        import mlflow

        from tunepipe import tracking

        client = mlflow.MlflowClient()
        tags = {"mlflow.parentRunId": self.parent_run_id, "mlflow.runName": f"{self.run_name}-{trial.number}",
                "optuna.study": trial.study.study_name, "optuna.trial_number": str(trial.number),
                "optuna.trial_state": "running", "tunepipe.task": self.p.task,
                "tunepipe.processes": str(distributed.world_size())}
        with _experimental_ok():
            retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
                _frozen(trial.study, trial.number))
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        tags.update(self._run_tags(trial))
        run = client.create_run(self.exp_id, tags=tags)
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000])
                                                  for k, v in tracking.flat_params(tp).items()])
        return run.info.run_id

    def value_name(self) -> str:
        """The MLflow metric a trial's value is logged as."""
        return f"best_val_{self.metric}"

    def _run_tags(self, trial: optuna.Trial) -> dict[str, str]:
        """More tags for the trial's MLflow run."""
        return {}

    def _finish_run(self, run_id: str, state: str, value: float | None, epochs: float) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric("epochs_run", epochs, now, 0)]
        if value is not None:
            metrics.append(mlflow.entities.Metric(self.value_name(), float(value), now, 0))
        tag = mlflow.entities.RunTag("optuna.trial_state", "fail" if state == "killed" else state)
        client.log_batch(run_id, metrics=metrics, tags=[tag])
        status = {"complete": "FINISHED", "pruned": "FINISHED", "killed": "KILLED"}.get(state, "FAILED")
        client.set_terminated(run_id, status)


def follow_trials(dsd, labels: list[str], metric: str, precision: str) -> None:
    """Ranks 1.. of a distributed sweep: train each trial's values from rank 0 in step with it (DDP), until it sends
    None. Rank 0 alone talks to Optuna and MLflow; pruning is its decision (OptunaPruningCallback)."""
    from tunepipe.training import build_trainer

    while (tp := distributed.from_main(None)) is not None:
        out = tempfile.mkdtemp(prefix="tunepipe-trial-")
        try:
            trainer = build_trainer(tp, dsd, labels, out, save_checkpoints=False, precision=precision,
                                    callbacks=[OptunaPruningCallback(None, metric, len(dsd["train"]))])
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        except optuna.TrialPruned:
            pass
        except Exception as exc:
            if distributed.lost_peer(exc):  # rank 0 went away: torchrun names it; nothing to add here
                os._exit(distributed.LOST_CONTACT)
            # The same values fail the same way on rank 0, which records the failure and goes on with the study.
            print(f"sweep: rank {distributed.rank()}: trial failed: {masked(str(exc).strip()[:300])}",
                  file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)


def close_dead_runs(study: optuna.Study) -> None:
    """MLflow runs of trials whose worker died stay RUNNING; mark them failed once Optuna has failed the trial."""
    import mlflow

    client = mlflow.MlflowClient()
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get(RUN_ATTR)
        if not run_id:
            continue
        try:
            if client.get_run(run_id).info.status != "RUNNING":
                continue
        except mlflow.exceptions.MlflowException:
            continue  # logged to another tracking store
        client.set_tag(run_id, "optuna.trial_state", "fail")
        client.set_terminated(run_id, "FAILED")


def taken_over(study: optuna.Study, number: int) -> bool:
    """Whether another worker failed trial `number` as stale (no heartbeat) and queued a retry of it."""
    with _experimental_ok():
        return any(number in optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)
                   for t in study.get_trials(deepcopy=False))


def run_trials(study: optuna.Study, objective: Objective, target: int, timeout: float | None,
               heartbeat_interval: int) -> None:
    """Run trials until the study has `target` finished ones (or the timeout passes).

    When every remaining slot is held by a running trial, wait: it belongs to another worker (and will finish) or
    to a dead process (and is failed and queued again once its heartbeat is stale, then run here).
    """

    def stop_when_reserved(study: optuna.Study, _trial: FrozenTrial) -> None:
        if n_reserved(study) >= target:
            study.stop()

    optimize_log = logging.getLogger("optuna.study._optimize")
    if _QUIET not in optimize_log.filters:
        optimize_log.addFilter(_QUIET)
    start, told = time.monotonic(), False
    while True:
        with _experimental_ok():
            optuna.storages.fail_stale_trials(study)
        c = trial_counts(study)
        left = None if timeout is None else timeout - (time.monotonic() - start)
        if c["complete"] + c["pruned"] >= target or (left is not None and left <= 0):
            return
        if n_reserved(study) < target or c["waiting"]:
            try:
                study.optimize(objective, timeout=left, catch=(SurplusTrial, TrialFailed),
                               callbacks=[stop_when_reserved], gc_after_trial=True)
            except Exception:
                if objective.current is None or not taken_over(study, objective.current):
                    raise
                # This worker stalled past the grace period; another one failed the trial and queued it again.
                print(f"sweep: trial {objective.current} was silent for over {2 * heartbeat_interval}s, so another "
                      "worker failed it and queued it again; continuing", file=sys.stderr, flush=True)
            continue
        if not told:
            print(f"sweep: waiting for {c['running']} running trial(s): another worker's, or a killed run's "
                  f"(retried here once silent for {2 * heartbeat_interval}s)", flush=True)
            told = True
        poll = min(5.0, heartbeat_interval)
        time.sleep(poll if left is None else max(0.0, min(poll, left)))


def _setup_tracking(p: Params) -> str:
    """tracking.setup for a worker that may start together with others: workers sharing a sqlite store take turns
    inside it (a file lock); other stores are retried after a failed first touch."""
    from tunepipe import tracking

    for attempt in range(5):
        try:
            return tracking.setup(p.tracking)
        except UserError:
            raise  # unreachable: trying again would only repeat the message
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 + secrets.randbelow(1500) / 1000)
    raise AssertionError("unreachable")


def _requeue_interrupted(study: optuna.Study, number: int | None) -> None:
    """Ctrl-C fails the running trial; queue it again with the same params, as a dead worker's would be."""
    if number is None:
        return
    trial = _frozen(study, number)
    if trial is not None and trial.state == TrialState.FAIL:
        with _experimental_ok():
            optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)(study, trial)
        print(f"sweep: trial {number} was interrupted; it runs again when the sweep resumes", file=sys.stderr)
