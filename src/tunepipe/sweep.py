"""`tunepipe sweep`: an Optuna study over finetune's learning rate, batch size and dropout.

Each trial trains through tunepipe.training.build_trainer (the finetune stage's code path) on data/augmented and
reports validation `headline_metric` at every evaluation, so pruners stop poor trials early. The study lives in
an RDB storage (default: sqlite optuna.db in the project; PostgreSQL to share it across processes and machines):
running the same command again resumes it, and a trial whose process died is retried once its heartbeat is stale.

`sweep.trials` is the number of finished (complete + pruned) trials the *study* should end with, across every
worker and invocation. Workers reserve a slot by trial number: a trial runs only if fewer than `trials` trials with
a smaller number are finished, running or queued, so parallel workers never overshoot.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import yaml as pyyaml
from optuna.trial import FrozenTrial, TrialState
from transformers import PrinterCallback, TrainerCallback

from tunepipe.errors import UserError
from tunepipe.files import read_json, write_json, write_text
from tunepipe.params import Params, SweepParams, load_params, parse_params
from tunepipe.paths import AUGMENTED, OPTUNA_DB, PARAMS_FILE, PREPARED_META, SWEEP_REPORTS

TUNED = ("learning_rate", "batch_size", "dropout")
SPACE_ATTR = "tunepipe.search_space"
SETUP_ATTR = "tunepipe.trial_setup"
SURPLUS_ATTR = "tunepipe.surplus"
RUN_ATTR = "mlflow_run_id"
MAX_RETRY = 3  # re-runs of a trial whose process died, before its slot goes to a fresh trial
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RESERVED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class SurplusTrial(Exception):
    """A trial created after the study's slots were all taken by other workers; it is failed unrun."""


@contextlib.contextmanager
def _experimental_ok():
    """Heartbeats and trial retries are marked experimental in Optuna; they are what resuming relies on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# ---- search space and study ----

def search_space(sw: SweepParams, metric: str) -> dict:
    """What a study is recorded with (a study user attr) and checked against on resume."""
    return {"learning_rate": {"low": sw.learning_rate[0], "high": sw.learning_rate[1], "log": True},
            "batch_size": {"choices": list(sw.batch_size)},
            "dropout": {"low": sw.dropout[0], "high": sw.dropout[1]},
            "metric": metric}


def trial_setup(p: Params, data_hash: str) -> dict:
    """Everything but the tuned values that shapes a trial's score: trials of one study must share it."""
    dumped = p.model_dump(mode="json", include={"task", "model", "tokenize", "augment", "finetune"})
    flat = {"task": dumped.pop("task"), "data_hash": data_hash}
    for section, values in dumped.items():
        flat.update({f"{section}.{k}": v for k, v in values.items() if not (section == "finetune" and k in TUNED)})
    return flat


def suggest(trial: optuna.Trial, sw: SweepParams) -> dict[str, float | int]:
    return {"learning_rate": trial.suggest_float("learning_rate", *sw.learning_rate, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(sw.batch_size)),
            "dropout": trial.suggest_float("dropout", *sw.dropout)}


def trial_params(p: Params, values: dict) -> Params:
    return p.model_copy(update={"finetune": p.finetune.model_copy(update={k: values[k] for k in TUNED})})


def default_storage(root: Path | None = None) -> str:
    return f"sqlite:///{((root or Path.cwd()) / OPTUNA_DB).resolve()}"


def masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, heartbeat_interval: int) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; a dead worker's trial is failed after 2 intervals and queued again."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(f"sweep.storage: {url!r} is not a database URL "
                        "(e.g. sqlite:///optuna.db or postgresql://user@host:5432/db)") from None
    backend = parsed.get_backend_name()
    kwargs: dict = {"pool_pre_ping": True}
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
    elif backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}  # workers on one machine wait for each other's writes
    try:  # fail fast, in one line, before Optuna touches the schema
        engine = sqlalchemy.create_engine(url, **kwargs)
        with engine.connect():
            pass
        engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"sweep.storage: cannot connect to {masked(url)}: {reason}") from None
    with _experimental_ok():
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY))
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
                if attempt == 4:
                    raise
                time.sleep(0.5 + secrets.randbelow(1000) / 1000)  # another worker was creating the tables
    raise AssertionError("unreachable")


def make_sampler(sw: SweepParams, seed: int) -> optuna.samplers.BaseSampler:
    if sw.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # running trials count as "liars" in parallel


def make_pruner(sw: SweepParams, first_eval_examples: int) -> optuna.pruners.BasePruner:
    if sw.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sw.pruner_startup_trials)
    if sw.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, first_eval_examples), max_resource="auto")
    return optuna.pruners.NopPruner()


def open_study(storage, name: str, sw: SweepParams, space: dict, setup: dict, pruner
               ) -> tuple[optuna.Study, bool, int]:
    """Create the study (seeded with sweep.seed) or join/resume it; refuse one recorded with another search space
    or trial setup (data, model, the other finetune params), whose scores would not compare with the new ones."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=make_sampler(sw, sw.seed), pruner=pruner)
        created, seed = True, sw.seed
    except optuna.exceptions.DuplicatedStudyError:
        # Resuming or joining: a fresh seed, or parallel workers would all draw the same trials.
        created, seed = False, secrets.randbelow(2**31)
        study = optuna.load_study(storage=storage, study_name=name, sampler=make_sampler(sw, seed), pruner=pruner)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(f"--study: '{name}' exists but minimises; it was not created by tunepipe sweep. "
                            "Choose another --study name") from None
    for attr, value, what, where in ((SPACE_ATTR, space, "search space", "the sweep section of params.yaml"),
                                     (SETUP_ATTR, setup, "trial setup", "params.yaml (or the data)")):
        recorded = study.user_attrs.get(attr)
        if recorded is None:
            study.set_user_attr(attr, value)
        elif recorded != value:
            diff = [f"{k} {_show(recorded.get(k))} -> {_show(value.get(k))}" for k in sorted({*recorded, *value})
                    if recorded.get(k) != value.get(k)]
            raise UserError(f"sweep: study '{name}' was created with another {what} ({', '.join(diff[:3])}"
                            f"{', ...' if len(diff) > 3 else ''}); restore {where}, or start a new study with "
                            "--study NAME")
    return study, created, seed


def _show(v: object) -> str:
    """A recorded range or choice list as params.yaml writes it."""
    if isinstance(v, dict) and "choices" in v:
        return str(v["choices"])
    if isinstance(v, dict) and {"low", "high"} <= set(v):
        return f"[{v['low']}, {v['high']}]"
    return str(v)


def trial_counts(study: optuna.Study) -> dict[str, int]:
    counts = dict.fromkeys(("complete", "pruned", "fail", "running", "waiting", "surplus"), 0)
    for t in study.get_trials(deepcopy=False):
        counts["surplus" if t.user_attrs.get(SURPLUS_ATTR) else t.state.name.lower()] += 1
    return counts


def n_reserved(study: optuna.Study, before: int | None = None) -> int:
    """Trials finished, running or queued (optionally only those numbered below `before`)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=RESERVED) if before is None or t.number < before)


# ---- one trial ----

class OptunaPruningCallback(TrainerCallback):
    """Reports the validation metric to the trial at every evaluation and stops the trial when the pruner says so.

    The step is training examples seen (epochs x train size), so trials with different batch sizes are compared
    after the same amount of data, not the same number of optimizer steps.
    """

    def __init__(self, trial: optuna.Trial, metric: str, n_train: int):
        self.trial, self.metric, self.n_train = trial, metric, n_train

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None:
            return
        step = round((state.epoch or 0.0) * self.n_train)
        self.trial.report(float(value), step)
        # Pruning at the last evaluation would save nothing and throw away the trial's result.
        if state.global_step < state.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"validation {self.metric} {value:.4f} after {step} examples")


class Objective:
    """Trains one trial as finetune would (no checkpoints, temp output dir) in a nested MLflow run."""

    def __init__(self, p: Params, sw: SweepParams, dsd, labels: list[str], target: int, exp_id: str,
                 parent_run_id: str):
        from tunepipe.training import headline_metric

        self.p, self.sw, self.dsd, self.labels, self.target = p, sw, dsd, labels, target
        self.exp_id, self.parent_run_id = exp_id, parent_run_id
        self.metric = headline_metric(p.task)
        self.current: int | None = None  # trial number in progress, for Ctrl-C handling
        self.ran = 0

    def __call__(self, trial: optuna.Trial) -> float:
        if n_reserved(trial.study, before=trial.number) >= self.target:
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.study.stop()
            raise SurplusTrial(f"all {self.target} slots are taken by other workers; not run")
        self.current = trial.number
        tp = trial_params(self.p, suggest(trial, self.sw))
        run_id = self._start_run(trial, tp)
        trial.set_user_attr(RUN_ATTR, run_id)
        out = tempfile.mkdtemp(prefix=f"tunepipe-trial-{trial.number}-")
        state, value, trainer = "fail", None, None
        try:
            from tunepipe import tracking
            from tunepipe.training import build_trainer

            trainer = build_trainer(tp, self.dsd, self.labels, out, save_checkpoints=False, callbacks=[
                tracking.MlflowMetricsCallback(run_id),
                OptunaPruningCallback(trial, self.metric, len(self.dsd["train"]))])
            trainer.remove_callback(PrinterCallback)  # per-step log dicts; Optuna prints one line per trial
            trainer.train()
            value = trainer.state.best_metric
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
        tags = {"mlflow.parentRunId": self.parent_run_id, "mlflow.runName": f"trial-{trial.number}",
                "optuna.study": trial.study.study_name, "optuna.trial_number": str(trial.number),
                "optuna.trial_state": "running", "tunepipe.task": self.p.task}
        with _experimental_ok():
            retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
                _frozen(trial.study, trial.number))
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        run = client.create_run(self.exp_id, tags=tags)
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000])
                                                  for k, v in tracking.flat_params(tp).items()])
        return run.info.run_id

    def _finish_run(self, run_id: str, state: str, value: float | None, epochs: float) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric("epochs_run", epochs, now, 0)]
        if value is not None:
            metrics.append(mlflow.entities.Metric(f"best_val_{self.metric}", float(value), now, 0))
        tag = mlflow.entities.RunTag("optuna.trial_state", "fail" if state == "killed" else state)
        client.log_batch(run_id, metrics=metrics, tags=[tag])
        status = {"complete": "FINISHED", "pruned": "FINISHED", "killed": "KILLED"}.get(state, "FAILED")
        client.set_terminated(run_id, status)


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
                study.optimize(objective, timeout=left, catch=(SurplusTrial,), callbacks=[stop_when_reserved],
                               gc_after_trial=True)
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


# ---- reports ----

def write_reports(study: optuna.Study, summary: dict, out_dir: Path = SWEEP_REPORTS) -> dict:
    """best_params.yaml, summary.json and plots (PNG via matplotlib, interactive HTML via plotly)."""
    counts = trial_counts(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = {**summary, "trials": counts,
               "best": {"value": best.value, "trial": best.number, "params": best.params} if best else None,
               "trial_epochs": round(sum(t.user_attrs.get("epochs_run", 0.0) for t in trials), 3),
               "study_elapsed_s": _elapsed(trials)}
    out_dir.mkdir(parents=True, exist_ok=True)
    best_file = out_dir / "best_params.yaml"
    if best:
        header = (f"# Best trial {best.number} of study '{study.study_name}': validation {summary['metric']} "
                  f"{best.value:.4f}.\n# `tunepipe sweep apply` writes these into params.yaml.\n")
        write_text(best_file, header + pyyaml.safe_dump({"finetune": {k: best.params[k] for k in TUNED}},
                                                        sort_keys=False))
    else:
        best_file.unlink(missing_ok=True)
    summary["param_importances"] = None
    if len(complete) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary["param_importances"] = {k: round(v, 4) for k, v in
                                            optuna.importance.get_param_importances(study).items()}
    summary["plots"] = write_plots(study, out_dir, len(complete))
    write_json(out_dir / "summary.json", summary)
    return summary


PLOTS = {"optimization_history": 1, "intermediate_values": 1, "parallel_coordinate": 1, "param_importances": 2}


def write_plots(study: optuna.Study, out_dir: Path, n_complete: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    written = []
    for name, needs in PLOTS.items():
        png, html = out_dir / f"{name}.png", out_dir / f"{name}.html"
        if n_complete < needs:
            png.unlink(missing_ok=True)
            html.unlink(missing_ok=True)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = getattr(vis_mpl, f"plot_{name}")(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            _atomic(png, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
            plt.close(fig)
            # plotly.min.js is written once beside the pages, so they open offline.
            page = getattr(vis, f"plot_{name}")(study)
            _atomic(html, lambda tmp, page=page: page.write_html(tmp, include_plotlyjs="directory", full_html=True))
        written += [png.name, html.name]
    return written


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _elapsed(trials: list[FrozenTrial]) -> float | None:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None


# ---- apply ----

def _round_trip_yaml():
    """ruamel round-trip, writing new floats with a '.' (PyYAML reads 1e-05 as a string) and None as null."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    def represent_float(rep, value: float):
        text = repr(value)
        mantissa, _, exp = text.partition("e")
        if exp and "." not in mantissa:
            text = f"{mantissa}.0e{exp}"
        return rep.represent_scalar("tag:yaml.org,2002:float", text)

    class Representer(RoundTripRepresenter):  # a subclass: ruamel's registries are class-wide
        pass

    Representer.add_representer(float, represent_float)
    Representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml = YAML()
    yaml.Representer = Representer
    return yaml


def apply_best(params_file: str | Path, values: dict) -> list[str]:
    """Write finetune.learning_rate/batch_size/dropout into params.yaml; comments, order and the rest kept."""
    from ruamel.yaml.comments import CommentedMap

    path = Path(params_file)
    yaml = _round_trip_yaml()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(path.read_text(encoding="utf-8")) or CommentedMap()
    if doc.get("finetune") is None:
        doc["finetune"] = CommentedMap()
    ft, changes = doc["finetune"], []
    for key in TUNED:
        old = ft.get(key)
        value = int(values[key]) if key == "batch_size" else float(values[key])
        if old != value:
            ft[key] = value
            changes.append(f"finetune.{key}: {old if old is None else type(value)(old)!r} -> {value!r}")
    buf = io.StringIO()
    yaml.dump(doc, buf)
    parse_params(pyyaml.safe_load(buf.getvalue()), str(path))  # never write a params file that does not validate
    write_text(path, buf.getvalue())
    return changes


# ---- command ----

def add_parser(sub) -> None:
    sp = sub.add_parser("sweep", help="tune learning rate, batch size and dropout with Optuna",
                        description="Run (or resume, or join) the Optuna study set in params.yaml's sweep "
                                    "section; `tunepipe sweep apply` writes the study's best values into "
                                    "params.yaml without running trials.")
    sp.add_argument("action", nargs="?", choices=["apply"], metavar="apply",
                    help="write the study's best values into params.yaml and stop (no trials)")
    sp.add_argument("--trials", type=int, help="finished trials the study should end with (default: sweep.trials)")
    sp.add_argument("--storage", help="Optuna storage URL (default: sweep.storage, else sqlite optuna.db here)")
    sp.add_argument("--study", help="study name (default: sweep.study)")
    sp.add_argument("--apply", action="store_true", help="after the sweep, write the best values into params.yaml")
    sp.add_argument("--no-repro", action="store_true", help="use data/augmented as it is (skip `dvc repro augment`)")
    sp.set_defaults(func=cmd_sweep)


def effective_sweep(p: Params, args: argparse.Namespace) -> tuple[SweepParams, str]:
    sw = p.sweep
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials: must be a positive number of trials, got {args.trials}")
    if args.study is not None and not args.study.strip():
        raise UserError("--study: give a non-empty study name")
    sw = sw.model_copy(update={k: v for k, v in (("trials", args.trials), ("study", args.study)) if v is not None})
    return sw, args.storage or sw.storage or default_storage()


def cmd_sweep(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = load_params(args.params)
    sw, url = effective_sweep(p, args)
    if args.action == "apply":
        storage = open_storage(url, sw.heartbeat_interval)
        try:
            study = optuna.load_study(storage=storage, study_name=sw.study)
        except KeyError:
            raise UserError(f"--study: no study '{sw.study}' in {masked(url)}; run `tunepipe sweep` first") from None
        _apply(study, args.params)
        return
    if not args.no_repro:
        _repro()
    sweep(p, sw, url, args.params, apply=args.apply)


def sweep(p: Params, sw: SweepParams, url: str, params_file: str | Path = PARAMS_FILE, apply: bool = False,
          out_dir: Path = SWEEP_REPORTS) -> dict:
    """Run this worker's share of the study and write the reports; returns the summary."""
    import datasets
    import mlflow
    import transformers

    from tunepipe import tracking
    from tunepipe.training import headline_metric

    # Everything the user can get wrong is checked before the study or MLflow is touched.
    if not (AUGMENTED / "dataset_dict.json").is_file() or not PREPARED_META.is_file():
        raise UserError(f"{AUGMENTED}: no prepared data; run `dvc repro augment` (or drop --no-repro)")
    dsd, meta = datasets.load_from_disk(str(AUGMENTED)), read_json(PREPARED_META)
    labels = meta["labels"]
    check_evaluated(p, sw, len(dsd["train"]))
    metric = headline_metric(p.task)
    storage = open_storage(url, sw.heartbeat_interval)
    first_eval = min(len(dsd["train"]) * p.finetune.epochs, p.finetune.eval_steps * min(sw.batch_size))
    study, created, seed = open_study(storage, sw.study, sw, search_space(sw, metric),
                                      trial_setup(p, meta["data_hash"]), make_pruner(sw, int(first_eval)))
    # The EarlyStoppingCallback warns about load_best_model_at_end, which trials switch off on purpose.
    transformers.utils.logging.get_logger("transformers.trainer_callback").setLevel("ERROR")

    exp_id = _setup_tracking(p)
    client = mlflow.MlflowClient()
    before = trial_counts(study)
    parent = client.create_run(exp_id, tags={
        "mlflow.runName": f"sweep-{sw.study}-{time.strftime('%Y%m%d-%H%M%S')}", "tunepipe.sweep.study": sw.study,
        "tunepipe.sweep.worker": f"{socket.gethostname()}:{os.getpid()}",
        "tunepipe.git_commit": tracking.git_commit() or "unknown", "tunepipe.task": p.task}).info.run_id
    client.log_batch(parent, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in {
        "study": sw.study, "storage": masked(url), "trials": sw.trials, "timeout": sw.timeout, "sampler": sw.sampler,
        "sampler_seed": seed, "pruner": sw.pruner, "learning_rate": list(sw.learning_rate),
        "batch_size": list(sw.batch_size), "dropout": list(sw.dropout), "metric": metric}.items()])
    print(f"sweep: study '{sw.study}' {'created' if created else 'resumed'} in {masked(url)}: "
          f"{before['complete'] + before['pruned']}/{sw.trials} trials finished; sampler {sw.sampler} "
          f"(seed {seed}), pruner {sw.pruner}; MLflow run {parent}", flush=True)

    objective = Objective(p, sw, dsd, labels, sw.trials, exp_id, parent)
    start, status = time.monotonic(), "FAILED"
    try:
        close_dead_runs(study)
        run_trials(study, objective, sw.trials, sw.timeout, sw.heartbeat_interval)
        close_dead_runs(study)
        summary = write_reports(study, {
            "study": sw.study, "storage": masked(url), "metric": metric, "target_trials": sw.trials,
            "sampler": sw.sampler, "pruner": sw.pruner, "sampler_seed": seed,
            "invocation": {"wall_time_s": round(time.monotonic() - start, 1), "trials_run": objective.ran,
                           "mlflow_run_id": parent}}, out_dir)
        _log_summary(client, parent, summary, out_dir)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        _requeue_interrupted(study, objective.current)
        raise
    finally:
        client.set_terminated(parent, status)
    c, best = summary["trials"], summary["best"]
    print(f"sweep: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed "
          f"({objective.ran} run here in {summary['invocation']['wall_time_s']}s); "
          + (f"best validation {metric} {best['value']:.4f} (trial {best['trial']}: {best['params']}); "
             if best else "no complete trial yet; ") + f"reports in {out_dir}/", flush=True)
    if apply:
        _apply(study, params_file)
    return summary


def check_evaluated(p: Params, sw: SweepParams, n_train: int) -> None:
    """A trial that never reaches finetune.eval_steps would have nothing to report or return."""
    bs = max(sw.batch_size)
    steps = p.finetune.max_steps or math.ceil(p.finetune.epochs * math.ceil(n_train / bs))
    if steps < p.finetune.eval_steps:
        raise UserError(f"finetune.eval_steps: {p.finetune.eval_steps} is more than the {steps} steps a trial with "
                        f"batch_size {bs} trains on {n_train} examples, so it would never be evaluated; lower "
                        "finetune.eval_steps or the sweep.batch_size choices")


def _repro() -> None:
    print("sweep: dvc repro augment", flush=True)
    rc = subprocess.run([sys.executable, "-m", "dvc", "repro", "augment"], check=False).returncode
    if rc != 0:
        raise UserError(f"`dvc repro augment` failed (exit {rc}); see its output above, or pass --no-repro "
                        "to sweep on data/augmented as it is")


def _setup_tracking(p: Params) -> str:
    """tracking.setup for a worker that may start together with others.

    Concurrent first use of a fresh sqlite store runs MLflow's migrations twice and leaves it broken, so workers
    on one machine take turns (a lock file in the temp dir); other stores are retried after a failed first touch.
    """
    import hashlib

    from filelock import FileLock
    from sqlalchemy.engine import make_url

    from tunepipe import tracking

    uri = tracking.tracking_uri(p.tracking)
    lock = None
    if uri.startswith("sqlite:"):
        key = hashlib.sha1(str(Path(make_url(uri).database or "").resolve()).encode()).hexdigest()[:16]
        lock = FileLock(Path(tempfile.gettempdir()) / f"tunepipe-mlflow-{key}.lock")
    for attempt in range(5):
        try:
            if lock is None:
                return tracking.setup(p.tracking)
            with lock:
                return tracking.setup(p.tracking)
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


def _frozen(study: optuna.Study, number: int) -> FrozenTrial | None:
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)


def _log_summary(client, run_id: str, summary: dict, out_dir: Path) -> None:
    import mlflow

    now, c = int(time.time() * 1000), summary["trials"]
    metrics = {"trials_complete": c["complete"], "trials_pruned": c["pruned"], "trials_failed": c["fail"],
               "trials_run": summary["invocation"]["trials_run"], "trial_epochs": summary["trial_epochs"],
               "wall_time_s": summary["invocation"]["wall_time_s"]}
    if summary["best"]:
        metrics[f"best_val_{summary['metric']}"] = summary["best"]["value"]
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for name in ("summary.json", "best_params.yaml", *(f for f in summary["plots"] if f.endswith(".png"))):
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name), "sweep")


def _apply(study: optuna.Study, params_file: str | Path) -> None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"sweep apply: study '{study.study_name}' has no complete trial yet; run `tunepipe sweep`")
    best = max(complete, key=lambda t: t.value)
    changes = apply_best(params_file, best.params)
    print(f"sweep: {params_file} <- trial {best.number} ({best.value:.4f}): "
          + ("; ".join(changes) if changes else "already set"), flush=True)
