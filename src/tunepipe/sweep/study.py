"""The study: constants, search space, trial setup, storage, sampler, pruner; creating, joining or resuming it."""

from __future__ import annotations

import contextlib
import secrets
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from tunepipe.errors import UserError, masked
from tunepipe.params import Params, SweepParams
from tunepipe.paths import OPTUNA_DB, project_root

TUNED = ("learning_rate", "batch_size", "dropout")  # always searched
OPTIONAL = ("adversarial", "adversarial_epsilon")  # searched when their sweep key is set (not null)
SPACE_ATTR = "tunepipe.search_space"
SETUP_ATTR = "tunepipe.trial_setup"
SURPLUS_ATTR = "tunepipe.surplus"
RUN_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"  # why a trial failed (also the tag tunepipe.error on its MLflow run)
MAX_RETRY = 3  # re-runs of a trial whose process died, before its slot goes to a fresh trial
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RESERVED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@contextlib.contextmanager
def _experimental_ok():
    """Heartbeats and trial retries are marked experimental in Optuna; they are what resuming relies on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# ---- search space and study ----

def tuned(sw: SweepParams) -> tuple[str, ...]:
    """The finetune keys this sweep searches (each named as its sweep key)."""
    return TUNED + tuple(k for k in OPTIONAL if getattr(sw, k) is not None)


def search_space(sw: SweepParams, metric: str) -> dict:
    """What a study is recorded with (a study user attr) and checked against on resume. An optional dimension
    appears only when searched, so a study recorded before it existed still matches when it is not."""
    space = {"learning_rate": {"low": sw.learning_rate[0], "high": sw.learning_rate[1], "log": True},
             "batch_size": {"choices": list(sw.batch_size)},
             "dropout": {"low": sw.dropout[0], "high": sw.dropout[1]},
             "metric": metric}
    if sw.adversarial is not None:
        space["adversarial"] = {"choices": list(sw.adversarial)}
    if sw.adversarial_epsilon is not None:
        space["adversarial_epsilon"] = {"low": sw.adversarial_epsilon[0], "high": sw.adversarial_epsilon[1],
                                        "log": True}
    return space


def check_search_space(p: Params, sw: SweepParams) -> None:
    """Optional dimensions that would search nothing or give a trial invalid params, caught before any trial."""
    methods = set(sw.adversarial) if sw.adversarial is not None else {p.finetune.adversarial}
    if sw.adversarial_epsilon is not None and methods == {"none"}:
        raise UserError("sweep.adversarial_epsilon: no trial trains adversarially (finetune.adversarial is none and "
                        "sweep.adversarial does not search fgm or pgd); set sweep.adversarial, e.g. [none, fgm], or "
                        "sweep.adversarial_epsilon: null")
    low = sw.adversarial_epsilon[0] if sw.adversarial_epsilon is not None else p.finetune.adversarial_epsilon
    if "pgd" in methods and low < p.finetune.adversarial_alpha:
        key = "sweep.adversarial_epsilon's low end" if sw.adversarial_epsilon else "finetune.adversarial_epsilon"
        raise UserError(f"{key} {low:g} is below finetune.adversarial_alpha {p.finetune.adversarial_alpha:g}, the pgd "
                        "step size, so a pgd trial could step out of its epsilon ball; raise it or lower "
                        "finetune.adversarial_alpha")


def trial_setup(p: Params, data_hash: str) -> dict:
    """Everything but the tuned values that shapes a trial's score: trials of one study must share it."""
    dumped = p.model_dump(mode="json", include={"task", "model", "tokenize", "augment", "finetune"})
    flat = {"task": dumped.pop("task"), "data_hash": data_hash}
    for section, values in dumped.items():
        flat.update({f"{section}.{k}": v for k, v in values.items()
                     if not (section == "finetune" and k in tuned(p.sweep))})
    return flat


def suggest(trial: optuna.Trial, sw: SweepParams) -> dict[str, float | int | str]:
    values = {"learning_rate": trial.suggest_float("learning_rate", *sw.learning_rate, log=True),
              "batch_size": trial.suggest_categorical("batch_size", list(sw.batch_size)),
              "dropout": trial.suggest_float("dropout", *sw.dropout)}
    if sw.adversarial is not None:
        values["adversarial"] = trial.suggest_categorical("adversarial", list(sw.adversarial))
    if sw.adversarial_epsilon is not None:  # drawn for `none` trials too: a fixed space keeps TPE simple
        values["adversarial_epsilon"] = trial.suggest_float("adversarial_epsilon", *sw.adversarial_epsilon, log=True)
    return values


def trial_params(p: Params, values: dict) -> Params:
    """p with the trial's values in finetune, validated as params.yaml would be (pgd's alpha <= epsilon...)."""
    ft = type(p.finetune).model_validate({**p.finetune.model_dump(), **values})
    return p.model_copy(update={"finetune": ft})


def default_storage(root: Path | None = None) -> str:
    return f"sqlite:///{((root or project_root()) / OPTUNA_DB).resolve()}"


def open_storage(url: str, heartbeat_interval: int) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; a dead worker's trial is failed after 2 intervals and queued again."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(f"sweep.storage: {masked(url)!r} is not a database URL "
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
        raise UserError(f"sweep.storage: cannot connect to {masked(url)}: {masked(reason)}") from None
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


def _frozen(study: optuna.Study, number: int) -> FrozenTrial | None:
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
