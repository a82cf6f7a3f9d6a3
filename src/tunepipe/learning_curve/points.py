"""The points of a learning curve: nested, stratified subsets of the train split, each trained by the sweep's
Objective (the same build_trainer as finetune) and scored on the test split; the main pipeline's model stands in
for the largest point where it was trained with the same params and data."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import optuna
import yaml

from tunepipe.files import read_json
from tunepipe.params import LearningCurveParams, Params
from tunepipe.paths import METRICS, MODEL, TRAINING_INFO
from tunepipe.sweep.runner import Objective, SurplusTrial
from tunepipe.sweep.study import RESERVED, RUN_ATTR
from tunepipe.tasks import get_task

POINT_ATTRS = ("fraction", "repeat", "n_train")


@dataclass(frozen=True)
class Point:
    fraction: float
    repeat: int  # subset draw learning_curve.seed + repeat, training seed finetune.seed + repeat
    n_train: int

    @property
    def key(self) -> tuple[float, int]:
        return self.fraction, self.repeat


def plan(lc: LearningCurveParams, n_total: int) -> list[Point]:
    """Every (fraction, repeat) to train, smallest first."""
    return [Point(f, k, max(1, round(f * n_total)))
            for f in lc.fractions for k in range(lc.seeds if f < lc.few_below else 1)]


def nested_order(labels: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) whose every prefix is stratified by `labels` (one class id per example;
    None: a plain permutation). Each class is shuffled and spread evenly over [0, 1): its i-th example gets a key in
    [i/n_c, (i+1)/n_c), and the examples are taken in key order, so any prefix holds each class's share to within one
    example. Prefixes of one order are nested: the 2% subset holds the 1% one."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return rng.permutation(n)
    labels = np.asarray(labels)
    key = np.empty(n)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        key[idx] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(key, kind="stable")


def subset(train, order: np.ndarray, n: int):
    """The first n examples of `order`, kept in the split's own order (at 100% the split exactly as finetune sees
    it: the task's seeded augmentation then draws as the augment stage did)."""
    return train.select(np.sort(order[:n]).tolist())


def point_params(p: Params, pt: Point) -> Params:
    """finetune's params for a point: its training seed, and an evaluation at least at the end of training (a small
    subset trains fewer steps than finetune.eval_steps, and would otherwise never be evaluated, so have no best
    model)."""
    ft = p.finetune
    steps = ft.max_steps or math.ceil(ft.epochs * math.ceil(pt.n_train / ft.batch_size))
    values = {"seed": ft.seed + pt.repeat, "eval_steps": max(1, min(ft.eval_steps, steps))}
    return p.model_copy(update={"finetune": type(ft).model_validate({**ft.model_dump(), **values})})


def main_model_result(p: Params, meta: dict, metric: str) -> dict | None:
    """The main pipeline's test result, where it is that of the largest point at repeat 0: models/model trained with
    these params on this data (its fingerprint), and reports/metrics.json evaluated on that model (the same test
    split, written after the model, and in dvc.lock evaluate's models/model is finetune's). None otherwise."""
    from tunepipe.training import fingerprint

    info_path = MODEL / TRAINING_INFO
    if not info_path.is_file() or not METRICS.is_file():
        return None
    info, metrics = read_json(info_path), read_json(METRICS)
    if info.get("fingerprint") != fingerprint(p, meta["data_hash"]) or metric not in metrics:
        return None
    if not metrics.get("test_data_hash") == info.get("test_data_hash") == meta["hashes"]["test"]:
        return None
    if METRICS.stat().st_mtime < info_path.stat().st_mtime:
        return None  # the model was trained again after this evaluation
    lock = Path("dvc.lock")
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})

        def md5(stage: str, kind: str) -> str | None:
            entries = stages.get(stage, {}).get(kind, [])
            return next((e.get("md5") for e in entries if e.get("path") == str(MODEL)), None)

        if md5("evaluate", "deps") != md5("finetune", "outs"):
            return None
    return {"run_id": info.get("run_id"), "value": float(metrics[metric]), "epochs": float(info.get("epochs") or 0.0)}


class PointObjective(Objective):
    """One learning-curve point per trial: which point is the trial's user attrs (enqueued with it), or for a fresh
    trial (one filling a failed point's slot) the first point no other trial holds."""

    run_name = "point"
    save_checkpoints = True  # the best validation checkpoint is the one scored on test, as finetune keeps it

    def __init__(self, p: Params, dsd, train, labels: list[str], points: list[Point], exp_id: str, parent_run_id: str,
                 precision: str, reuse: dict | None):
        super().__init__(p, p.sweep, dsd, labels, len(points), exp_id, parent_run_id, precision)
        self.train, self.points, self.reuse = train, points, reuse
        self.gold = get_task(p.task).gold_labels(train)
        self.orders: dict[int, np.ndarray] = {}
        self.point: Point | None = None
        self.t0 = 0.0

    def value_name(self) -> str:
        return f"test_{self.metric}"

    def _point(self, trial: optuna.Trial) -> Point:
        if all(k in trial.user_attrs for k in POINT_ATTRS):
            return Point(*(trial.user_attrs[k] for k in POINT_ATTRS))
        held = {(t.user_attrs.get("fraction"), t.user_attrs.get("repeat"))
                for t in trial.study.get_trials(deepcopy=False, states=RESERVED) if t.number != trial.number}
        for pt in self.points:
            if pt.key not in held:
                for k, v in asdict(pt).items():
                    trial.set_user_attr(k, v)
                return pt
        trial.study.stop()
        raise SurplusTrial("every point is taken by another trial; not run")

    def _run_tags(self, trial: optuna.Trial) -> dict[str, str]:
        pt = self.point
        return {"tunepipe.learning_curve.fraction": str(pt.fraction), "tunepipe.learning_curve.repeat": str(pt.repeat),
                "tunepipe.learning_curve.n_train": str(pt.n_train)}

    def _train(self, trial: optuna.Trial) -> float:
        self.point, self.t0 = self._point(trial), time.monotonic()
        if self.reuse and self.point.key == (1.0, 0) and self.point.n_train == len(self.train):
            return self._reused(trial)
        return super()._train(trial)

    def _reused(self, trial: optuna.Trial) -> float:
        """The largest point from the main pipeline's model: a nested run that points to its training run."""
        import mlflow

        run_id = self._start_run(trial, self.p)
        trial.set_user_attr(RUN_ATTR, run_id)
        trial.set_user_attr("reused_run", self.reuse["run_id"])
        trial.set_user_attr("wall_s", 0.0)
        mlflow.MlflowClient().set_tag(run_id, "tunepipe.learning_curve.reused_from", str(self.reuse["run_id"]))
        self._finish_run(run_id, "complete", self.reuse["value"], self.reuse["epochs"])
        self.ran += 1
        print(f"learning-curve: {self._describe()}: the main pipeline's model (MLflow run {self.reuse['run_id']}), "
              f"test {self.metric} {self.reuse['value']:.4f}", flush=True)
        return self.reuse["value"]

    def _trial_setup(self, trial: optuna.Trial):
        import datasets

        pt = self.point
        if pt.repeat not in self.orders:
            self.orders[pt.repeat] = nested_order(self.gold, len(self.train), self.p.learning_curve.seed + pt.repeat)
        tp = point_params(self.p, pt)
        train = get_task(tp.task).augment(subset(self.train, self.orders[pt.repeat], pt.n_train), tp)
        print(f"learning-curve: {self._describe()}: training on {pt.n_train} labelled examples"
              + (f" ({len(train)} with augmentation)" if len(train) != pt.n_train else ""), flush=True)
        return tp, datasets.DatasetDict({"train": train, "validation": self.dsd["validation"],
                                         "test": self.dsd["test"]})

    def _score(self, trial: optuna.Trial, trainer, tp: Params, dsd, run_id: str) -> float:
        """The best validation checkpoint on the test split, through the task's evaluate as the evaluate stage
        scores the main model."""
        task = get_task(tp.task)
        info = {"task": tp.task, "labels": self.labels, "max_length": tp.tokenize.max_length,
                "long_text": tp.tokenize.long_text, **task.trained_metadata(trainer, dsd, self.labels, tp)}
        with tempfile.TemporaryDirectory(prefix="tunepipe-point-eval-") as tmp:
            result = task.evaluate(trainer.model, trainer.processing_class, dsd["test"], self.labels, Path(tmp),
                                   info=info)
        value = float(result.metrics[self.metric])
        wall = round(time.monotonic() - self.t0, 1)
        trial.set_user_attr("wall_s", wall)
        trial.set_user_attr("eval_steps", tp.finetune.eval_steps)
        print(f"learning-curve: {self._describe()}: test {self.metric} {value:.4f} ({wall:.0f}s)", flush=True)
        return value

    def _describe(self) -> str:
        pt = self.point
        return f"{pt.fraction:g} of train (n={pt.n_train}, repeat {pt.repeat})"
