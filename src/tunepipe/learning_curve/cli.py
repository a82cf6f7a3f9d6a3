"""The `tunepipe learning-curve` command: the test metric against the number of labelled examples, on nested,
stratified fractions of the train split, with a fitted saturating power law and what it means for labelling.

The points are the trials of an Optuna study (enqueued when it is created), so the sweep's machinery runs them: a
killed run resumes with the points it finished, and workers sharing the storage share the points."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from tunepipe.errors import UserError, masked
from tunepipe.files import atomic_dir, read_json, write_csv, write_json
from tunepipe.learning_curve.fit import MIN_SIZES, TooFewPoints, sentence, summarize
from tunepipe.learning_curve.points import POINT_ATTRS, Point, PointObjective, main_model_result, nested_order, plan
from tunepipe.params import LearningCurveParams, Params, load_params
from tunepipe.paths import LEARNING_CURVE_REPORTS, PREPARED_META, TOKENIZED

ENQUEUED_ATTR = "tunepipe.points_enqueued"
# A worker joining a study another one has just created waits this long for its points to be enqueued.
ENQUEUE_WAIT_S = 120


def add_parser(sub) -> None:
    sp = sub.add_parser("learning-curve", help="how many labels: the test metric on growing fractions of the train "
                                               "split, with a fitted power law",
                        description="Train on nested, stratified fractions of the train split (params.yaml's "
                                    "learning_curve section), score each on the test split, fit metric(n) = a - b "
                                    "n^-c and report the labels at which it reaches a share of its plateau "
                                    f"({LEARNING_CURVE_REPORTS}/). Run it again to resume; run it in several "
                                    "processes sharing the storage to share the points.")
    sp.add_argument("--fractions", help="comma-separated fractions of the train split, e.g. 0.1,0.5,1 "
                                        "(default: learning_curve.fractions)")
    sp.add_argument("--seeds", type=int, help="repeats of each small fraction (default: learning_curve.seeds)")
    sp.add_argument("--max-train", type=int, help="cap the train split first (default: learning_curve.max_train)")
    sp.add_argument("--storage", help="Optuna storage URL (default: sweep.storage, else sqlite optuna.db here)")
    sp.add_argument("--no-repro", action="store_true", help="use data/tokenized as it is (skip `dvc repro tokenize`)")
    sp.set_defaults(func=cmd_learning_curve)


def effective(p: Params, args: argparse.Namespace) -> LearningCurveParams:
    """learning_curve with the command line's overrides, validated as params.yaml is."""
    update: dict = {}
    if args.fractions is not None:
        try:
            update["fractions"] = [float(f) for f in args.fractions.split(",") if f.strip()]
        except ValueError:
            raise UserError(f"--fractions: {args.fractions!r} is not a comma-separated list of numbers") from None
    if args.seeds is not None:
        update["seeds"] = args.seeds
    if args.max_train is not None:
        update["max_train"] = args.max_train
    try:
        return LearningCurveParams.model_validate({**p.learning_curve.model_dump(), **update})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "learning_curve"
        flag = f"--{key.replace('_', '-')}" if key in update else f"learning_curve.{key}"
        raise UserError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None


def cmd_learning_curve(args: argparse.Namespace) -> None:
    p = load_params(args.params)
    lc = effective(p, args)
    if not args.no_repro:
        print("learning-curve: dvc repro tokenize", flush=True)
        rc = subprocess.run([sys.executable, "-m", "dvc", "repro", "tokenize"], check=False).returncode
        if rc != 0:
            raise UserError(f"`dvc repro tokenize` failed (exit {rc}); see its output above, or pass --no-repro to "
                            "use data/tokenized as it is")
    from tunepipe.sweep.study import default_storage

    run(p.model_copy(update={"learning_curve": lc}), args.storage or p.sweep.storage or default_storage())


def run(p: Params, url: str, out_dir: Path = LEARNING_CURVE_REPORTS) -> dict:
    """Train the points this worker gets, then fit and write the reports from every finished point."""
    import datasets
    import mlflow
    import transformers

    from tunepipe import distributed, tracking
    from tunepipe.modeling import pick_precision
    from tunepipe.sweep.runner import _requeue_interrupted, _setup_tracking, close_dead_runs, run_trials
    from tunepipe.sweep.study import open_storage
    from tunepipe.tasks import get_task
    from tunepipe.training import fingerprint

    lc, task = p.learning_curve, get_task(p.task)
    # Everything the user can get wrong is checked before the study or MLflow is touched.
    if distributed.world_size() > 1 or distributed.requested_processes() > 1:
        raise UserError(f"learning-curve: runs in one process; unset {distributed.NPROC_ENV} and start more "
                        "workers on the same storage instead")
    if p.tokenize.long_text == "window":
        raise UserError("learning-curve: tokenize.long_text: window is not supported (a text's windows would be "
                        "split between subsets); use truncate")
    if not (TOKENIZED / "dataset_dict.json").is_file() or not PREPARED_META.is_file():
        raise UserError(f"{TOKENIZED}: no tokenized data; run `dvc repro tokenize` (or drop --no-repro)")
    datasets.disable_caching()  # the task's augmentation of a subset would write cache files into data/tokenized
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # a bar per checkpoint saved
    # Each point prints its own line, a failed one its error (Objective._failed) and Ctrl-C or SIGTERM one line:
    # Optuna's own lines would repeat them, with a traceback for an interrupted point.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    dsd, meta = datasets.load_from_disk(str(TOKENIZED)), read_json(PREPARED_META)
    labels, train = meta["labels"], dsd["train"]
    if lc.max_train is not None and lc.max_train < len(train):
        order = nested_order(task.gold_labels(train), len(train), lc.seed)
        train = train.select(sorted(order[: lc.max_train].tolist()))
    points = plan(lc, len(train))
    sizes = sorted({pt.n_train for pt in points})
    if len(sizes) < MIN_SIZES:
        raise UserError(f"learning_curve.fractions: {list(lc.fractions)} give {len(sizes)} distinct training size(s) "
                        f"of {len(train)} examples ({', '.join(map(str, sizes))}); fitting the curve needs at least "
                        f"{MIN_SIZES}: add fractions")
    metric = task.headline_metric
    reuse = main_model_result(p, meta, metric) if len(train) == len(dsd["train"]) else None
    precision = pick_precision(p.finetune.precision)
    tracking.check_reachable(p.tracking)
    storage = open_storage(url, p.sweep.heartbeat_interval)
    setup = {"fingerprint": fingerprint(p, meta["data_hash"]), "n_train": len(train),
             **lc.model_dump(mode="json", exclude={"study", "plateau_share", "bootstrap"})}
    name = f"{lc.study}-{hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:10]}"
    study, created = open_point_study(storage, name, points, setup)

    exp_id = _setup_tracking(p)
    client = mlflow.MlflowClient()
    parent = client.create_run(exp_id, tags={
        "mlflow.runName": f"learning-curve-{time.strftime('%Y%m%d-%H%M%S')}", "tunepipe.learning_curve.study": name,
        "tunepipe.learning_curve.worker": f"{socket.gethostname()}", "tunepipe.task": p.task,
        "tunepipe.git_commit": tracking.git_commit() or "unknown"}).info.run_id
    client.log_batch(parent, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in {
        "fractions": list(lc.fractions), "seeds": lc.seeds, "few_below": lc.few_below, "max_train": lc.max_train,
        "plateau_share": lc.plateau_share, "n_train": len(train), "metric": metric, "study": name,
        "storage": masked(url), **tracking.flat_params(p)}.items()])
    done = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    print(f"learning-curve: study '{name}' {'created' if created else 'resumed'} in {masked(url)}: {done}/"
          f"{len(points)} points finished; {len(train)} train examples, test {metric}; MLflow run {parent}"
          + ("; the largest point is the main pipeline's model (same params and data)" if reuse else ""), flush=True)

    objective = PointObjective(p, dsd, train, labels, points, exp_id, parent, precision, reuse)
    start, status = time.monotonic(), "FAILED"
    try:
        close_dead_runs(study)
        run_trials(study, objective, len(points), None, p.sweep.heartbeat_interval)
        close_dead_runs(study)
        summary = write_reports(study, points, metric, lc, out_dir, {
            "study": name, "storage": masked(url), "n_train_total": len(train), "precision": precision,
            "reused_main_model": reuse["run_id"] if reuse else None,
            "invocation": {"wall_time_s": round(time.monotonic() - start, 1), "points_run": objective.ran,
                           "mlflow_run_id": parent}})
        fit = summary["fit"]
        if fit:
            client.log_batch(parent, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                              for k, v in (("plateau", fit["a"]), ("labels_for_share", fit["n95"]),
                                                           ("gain_doubling", fit["gain_doubling"]))
                                              if v is not None and math.isfinite(v)])
        client.set_tag(parent, "tunepipe.learning_curve.sentence", summary["sentence"][:5000])
        client.log_artifacts(parent, str(out_dir), "learning_curve")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        _requeue_interrupted(study, objective.current)  # the point runs again when the curve is resumed
        raise
    finally:
        client.set_terminated(parent, status)
    print(f"learning-curve: {summary['sentence']}", flush=True)
    print(f"learning-curve: {len(summary['points'])} points ({objective.ran} run here in "
          f"{summary['invocation']['wall_time_s']}s); reports in {out_dir}/", flush=True)
    return summary


def open_point_study(storage, name: str, points: list[Point], setup: dict) -> tuple[optuna.Study, bool]:
    """Create the study and enqueue every point as a trial, or join it once its creator has enqueued them."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(seed=0), pruner=optuna.pruners.NopPruner())
        study.set_user_attr("tunepipe.learning_curve", setup)
        for pt in points:
            study.enqueue_trial({}, user_attrs={k: getattr(pt, k) for k in POINT_ATTRS}, skip_if_exists=False)
        study.set_user_attr(ENQUEUED_ATTR, True)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=optuna.samplers.RandomSampler(),
                                  pruner=optuna.pruners.NopPruner())
    deadline = time.monotonic() + ENQUEUE_WAIT_S
    while not study.user_attrs.get(ENQUEUED_ATTR):
        if time.monotonic() > deadline:
            # Its creator died midway: the points it did not enqueue are run as fresh trials (PointObjective).
            break
        time.sleep(1.0)
    return study, False


def finished_points(study: optuna.Study, points: list[Point]) -> list[dict]:
    """One row per finished point (the first trial that finished it), in plan order."""
    by_key: dict = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        key = (t.user_attrs.get("fraction"), t.user_attrs.get("repeat"))
        by_key.setdefault(key, t)
    rows = []
    for pt in points:
        t = by_key.get(pt.key)
        if t is not None:
            rows.append({"fraction": pt.fraction, "repeat": pt.repeat, "n_train": pt.n_train, "value": t.value,
                         "wall_s": t.user_attrs.get("wall_s"), "eval_steps": t.user_attrs.get("eval_steps"),
                         "reused_run": t.user_attrs.get("reused_run") or "",
                         "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""), "trial": t.number})
    return rows


def write_reports(study: optuna.Study, points: list[Point], metric: str, lc: LearningCurveParams, out_dir: Path,
                  extra: dict) -> dict:
    """points.csv, learning_curve.json and learning_curve.png, written together (atomically) into out_dir."""
    from tunepipe.plots import plot_learning_curve

    rows = finished_points(study, points)
    for r in rows:
        r[metric] = r.pop("value")
    fit, problem = None, None
    try:
        fit = summarize([r["n_train"] for r in rows], [r[metric] for r in rows], lc.plateau_share, lc.bootstrap)
        said = sentence(fit, metric)
    except TooFewPoints as exc:
        problem = f"too few points to fit the curve: {exc} ({len(rows)}/{len(points)} points finished)"
        said = f"{problem}; run `tunepipe learning-curve` again to finish the others"
    except RuntimeError as exc:
        problem = str(exc)
        said = f"no curve: {problem}; the points are in {out_dir / 'points.csv'}"
    summary = {"metric": metric, **extra, "fractions": list(lc.fractions), "seeds": lc.seeds,
               "few_below": lc.few_below, "points_planned": len(points), "points": rows, "fit": fit,
               "fit_problem": problem, "sentence": said}
    with atomic_dir(out_dir) as tmp:
        write_csv(tmp / "points.csv", rows, ["fraction", "repeat", "n_train", metric, "wall_s", "eval_steps",
                                             "reused_run", "mlflow_run_id", "trial"])
        write_json(tmp / "learning_curve.json", summary)
        plot_learning_curve(rows, fit, metric, said, tmp / "learning_curve.png")
    return summary
