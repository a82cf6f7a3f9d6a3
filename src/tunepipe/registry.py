"""`tunepipe promote` and `tunepipe models`: a `champion` alias that only moves for a real improvement.

Every `dvc repro` registers a version of `tracking.model_name` (stages/export.py) tagged with its test metrics
(`metric.<name>`), the hash of the test split it was scored on, its git commit and params. `promote` compares
a candidate with the current champion on `promote.metric`, optionally with a paired significance test on the
per-example test predictions (stages/significance.py), records the decision as version tags and moves the
alias only for a yes. History lives on the versions: `champion.previous` on each champion is what `--rollback`
follows.

Concurrency: the decision is made unlocked, then, under a lock, the champion is re-read and the alias moved
only if it is still the version the candidate was compared with (else the candidate is judged again). The lock
is a file lock beside a sqlite/file store, a PostgreSQL advisory lock for a postgresql store, and for a
tracking server a lock entry in the registry itself (creating a registered model is atomic on the server).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams
from tunepipe.paths import TEST_SPLIT

ALIAS = "champion"
PREDICTIONS = "evaluation/predictions.csv"
LOCK_TIMEOUT_S = 300.0
STALE_REGISTRY_LOCK_S = 120.0  # the locked section only re-reads and moves the alias: seconds, not minutes
ATTEMPTS = 3
BOOTSTRAP_SEED = 0  # fixed: the same registry state gives the same decision


# ---------------------------------------------------------------------------------------------- plain values

@dataclass(frozen=True)
class Version:
    number: int
    tags: dict[str, str]
    run_id: str | None
    created_ms: int

    def metric(self, name: str) -> float | None:
        raw = self.tags.get(f"metric.{name}")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    def metric_names(self) -> list[str]:
        return sorted(k.removeprefix("metric.") for k in self.tags if k.startswith("metric."))


@dataclass(frozen=True)
class Outcome:
    """One promotion decision: what was compared, on which data, the verdict and why."""

    name: str
    candidate: Version
    champion: Version | None
    metric: str
    candidate_value: float | None
    champion_value: float | None
    p_value: float | None
    test: str | None
    test_data_hash: str | None
    reevaluated: bool
    promote: bool
    reason: str
    already_champion: bool = False

    @property
    def delta(self) -> float | None:
        if self.candidate_value is None or self.champion_value is None:
            return None
        return self.candidate_value - self.champion_value


def decide(s: PromoteParams, candidate: float, champion: float | None, same_data: bool,
           p_value: float | None) -> tuple[bool, str]:
    """The promotion rule on plain numbers: (promote?, one-line reason)."""
    m = s.metric
    if candidate < s.min_metric:
        return False, f"{m} {candidate:.4f} is below promote.min_metric {s.min_metric:g}"
    if champion is None:
        return True, f"no champion yet and {m} {candidate:.4f} >= promote.min_metric {s.min_metric:g}"
    if not same_data:
        return False, ("the two versions were evaluated on different test data; compare them with "
                       "`tunepipe promote --reevaluate` (scores both on the current test split)")
    delta = candidate - champion
    # A tie never promotes, even with min_delta 0; the epsilon keeps 0.805 - 0.800 from failing 0.005.
    if delta <= 0 or delta < s.min_delta - 1e-12:
        return False, f"{m} gain {delta:+.4f} is less than promote.min_delta {s.min_delta:g}"
    if s.significance is not None:
        assert p_value is not None
        if p_value > s.significance:
            return False, (f"{m} gain {delta:+.4f} is not significant: {s.test} p={p_value:.4g} > "
                           f"promote.significance {s.significance:g}")
        return True, f"{m} gain {delta:+.4f} >= {s.min_delta:g}, {s.test} p={p_value:.4g} <= {s.significance:g}"
    return True, f"{m} gain {delta:+.4f} >= promote.min_delta {s.min_delta:g}"


def paired_p_value(s: PromoteParams, gold: list[str], new: list[str], old: list[str]) -> float:
    """The configured paired test on per-example label strings (mapped to ids over all labels seen)."""
    from tunepipe.significance import BOOTSTRAP_METRICS, mcnemar, paired_bootstrap_labels

    labels = sorted(set(gold) | set(new) | set(old))
    ids = {lab: i for i, lab in enumerate(labels)}
    y, a, b = (np.array([ids[x] for x in col]) for col in (gold, new, old))
    if s.test == "mcnemar":
        return mcnemar(y, a, b)
    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"promote.test: bootstrap recomputes {', '.join(BOOTSTRAP_METRICS)} on classification "
                        f"predictions, not promote.metric {s.metric!r}; use promote.test: mcnemar")
    return paired_bootstrap_labels(y, a, b, len(labels), s.metric, s.bootstrap_samples, BOOTSTRAP_SEED)


def p_value_frames(s: PromoteParams, new, old) -> float:
    """The paired test on two evaluation/predictions.csv tables (same examples, same gold labels)."""
    from tunepipe.significance import ENTITY_METRICS, mcnemar, paired_bootstrap_entities

    counts = ["correct_entities", "gold_entities", "pred_entities"]
    if not all(c in new.columns and c in old.columns for c in counts):
        return paired_p_value(s, new["label"].tolist(), new["prediction"].tolist(), old["prediction"].tolist())
    # NER: one row per sentence; McNemar on whole-sentence correctness, the bootstrap on entity counts.
    if s.test == "mcnemar":
        return mcnemar(new["label"].to_numpy(), new["prediction"].to_numpy(), old["prediction"].to_numpy())
    if s.metric not in ENTITY_METRICS:
        raise UserError(f"promote.test: bootstrap recomputes {', '.join(ENTITY_METRICS)} on NER predictions, "
                        f"not promote.metric {s.metric!r}; use promote.test: mcnemar")
    return paired_bootstrap_entities(new[counts].to_numpy(), old[counts].to_numpy(), s.metric,
                                     s.bootstrap_samples, BOOTSTRAP_SEED)


# ---------------------------------------------------------------------------------------------- registry reads

def _version(mv) -> Version:
    return Version(number=int(mv.version), tags=dict(mv.tags or {}), run_id=(mv.tags or {}).get("run_id") or mv.run_id,
                   created_ms=int(mv.creation_timestamp or 0))


def _mlflow_error(what: str, exc: Exception) -> UserError:
    import mlflow

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"{what} (registry {mlflow.get_registry_uri()}): {first[:300]}; nothing was changed")


@contextlib.contextmanager
def registry_errors(what: str) -> Iterator[None]:
    """Unreachable stores and failed requests become one-line UserErrors."""
    import mlflow

    try:
        yield
    except UserError:
        raise
    except mlflow.exceptions.MlflowException as exc:
        raise _mlflow_error(what, exc) from None
    except (OSError, ConnectionError) as exc:
        raise _mlflow_error(what, exc) from None
    except Exception as exc:  # sqlalchemy/requests errors do not share a base class with the above
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3", "psycopg2"):
            raise _mlflow_error(what, exc) from None
        raise


def require_model(client, name: str) -> None:
    import mlflow

    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"tracking.model_name: no registered model {name!r} in {mlflow.get_registry_uri()}; "
                            "run `dvc repro` (its export stage registers it) or fix the name") from None
        raise


def list_versions(client, name: str) -> list[Version]:
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        out.extend(_version(mv) for mv in page)
        token = page.token
        if not token:
            return sorted(out, key=lambda v: v.number)


def get_version(client, name: str, number: int) -> Version:
    import mlflow

    try:
        return _version(client.get_model_version(name, str(number)))
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"--version: {name} has no version {number}; see `tunepipe models`") from None
        raise


def champion_number(client, name: str) -> int | None:
    aliases = client.get_registered_model(name).aliases or {}
    return int(aliases[ALIAS]) if ALIAS in aliases else None


def champion(client, name: str) -> Version | None:
    number = champion_number(client, name)
    return get_version(client, name, number) if number is not None else None


def aliases_by_version(client, name: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias, v in (client.get_registered_model(name).aliases or {}).items():
        out.setdefault(int(v), []).append(alias)
    return out


def run_predictions(run_id: str | None, version: int):
    """The version's evaluation/predictions.csv (logged by the evaluate stage) as a DataFrame sorted by id."""
    import mlflow
    import pandas as pd

    if not run_id:
        raise UserError(f"version {version} has no run_id tag, so no per-example predictions for "
                        "promote.significance; unset it or register the model with `dvc repro`")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDICTIONS, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError):
            raise UserError(f"version {version} (run {run_id}) has no {PREDICTIONS}, which promote.significance "
                            "needs; re-run the evaluate stage or unset promote.significance") from None
        df = pd.read_csv(path, dtype={"label": str, "prediction": str}, keep_default_na=False)
    if not {"id", "label", "prediction"} <= set(df.columns):
        raise UserError(f"version {version}: {PREDICTIONS} lacks id/label/prediction columns; re-run evaluate")
    return df.sort_values("id").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- scoring

def _evidence(client, name: str, s: PromoteParams, cand: Version, champ: Version | None, reevaluate: bool,
              test_path: Path) -> dict:
    """Metric values of both versions, whether they share test data, and the p-value when asked for."""
    if reevaluate:
        return _reevaluate(name, s, cand, champ, test_path)
    values = {}
    for role, v in (("candidate", cand), ("champion", champ)):
        if v is None:
            values[role] = None
            continue
        values[role] = v.metric(s.metric)
        if values[role] is None:
            have = ", ".join(v.metric_names()) or "none"
            raise UserError(f"{name} version {v.number} has no metric.{s.metric} tag (metrics: {have}); set "
                            "promote.metric to one of them, or register it again with `dvc repro`")
    cand_hash = cand.tags.get("test_data_hash")
    same = champ is not None and bool(cand_hash) and cand_hash == champ.tags.get("test_data_hash")
    p = None
    if champ is not None and same and s.significance is not None:
        new, old = run_predictions(cand.run_id, cand.number), run_predictions(champ.run_id, champ.number)
        if new["id"].tolist() != old["id"].tolist() or new["label"].tolist() != old["label"].tolist():
            raise UserError(f"versions {cand.number} and {champ.number} share a test_data_hash but their "
                            f"{PREDICTIONS} cover different examples; re-run with --reevaluate")
        p = p_value_frames(s, new, old)
    return {"candidate": values["candidate"], "champion": values["champion"], "same_data": same, "p_value": p,
            "test_data_hash": cand_hash if same or champ is None else None, "reevaluated": False}


def _reevaluate(name: str, s: PromoteParams, cand: Version, champ: Version | None, test_path: Path) -> dict:
    """Load both registered models and score them on the current test split (classification only)."""
    import mlflow
    import pandas as pd

    from stages.evaluate import classification_summary
    from tunepipe.data import content_hash
    from tunepipe.significance import BOOTSTRAP_METRICS

    if not test_path.is_file():
        raise UserError(f"--reevaluate: {test_path} not found; run `dvc repro prepare` first")
    for v in (cand, champ):
        if v is not None and v.tags.get("task", "classification") != "classification":
            raise UserError(f"--reevaluate: version {v.number} is a {v.tags['task']} model; only classification "
                            "models can be re-scored here (re-run `dvc repro` on the same data instead)")
    if s.metric not in BOOTSTRAP_METRICS:
        raise UserError(f"--reevaluate computes {', '.join(BOOTSTRAP_METRICS)}; promote.metric is {s.metric!r}")
    test = pd.read_parquet(test_path, columns=["text", "label"])
    gold = [str(x) for x in test["label"]]
    preds: dict[str, list[str] | None] = {}
    for role, v in (("candidate", cand), ("champion", champ)):
        if v is None:
            preds[role] = None
            continue
        print(f"promote: re-scoring version {v.number} on {len(test)} rows of {test_path}", file=sys.stderr)
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{v.number}")
        except mlflow.exceptions.MlflowException as exc:
            raise _mlflow_error(f"--reevaluate: could not load version {v.number}", exc) from None
        preds[role] = [str(x) for x in model.predict(test["text"].astype(str).tolist())["label"]]
    labels = sorted(set(gold).union(*(p for p in preds.values() if p)))
    ids = {lab: i for i, lab in enumerate(labels)}

    def score(pred: list[str] | None) -> float | None:
        if pred is None:
            return None
        summary = classification_summary(np.array([ids[x] for x in gold]), np.array([ids[x] for x in pred]),
                                         labels)
        return float(summary[s.metric])

    p = None
    if preds["champion"] is not None and s.significance is not None:
        p = paired_p_value(s, gold, preds["candidate"], preds["champion"])
    return {"candidate": score(preds["candidate"]), "champion": score(preds["champion"]), "same_data": True,
            "p_value": p, "test_data_hash": content_hash(test), "reevaluated": True}


# ---------------------------------------------------------------------------------------------- locking

def _wait_for(try_acquire: Callable[[], bool], timeout: float, what: str) -> None:
    deadline, told = time.monotonic() + timeout, False
    while not try_acquire():
        if time.monotonic() > deadline:
            raise UserError(f"promote: gave up after {timeout:.0f}s waiting for {what}; nothing was changed")
        if not told:
            print(f"promote: waiting for another promotion to finish ({what})", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.2)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)

    def try_acquire() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    try:
        _wait_for(try_acquire, timeout, f"lock file {path}")
        yield
    finally:
        os.close(fd)  # releases the flock; the OS does the same if the process dies


@contextlib.contextmanager
def _pg_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    import psycopg2

    key = int.from_bytes(hashlib.sha256(f"tunepipe.promote:{name}".encode()).digest()[:8], "big", signed=True)
    scheme, rest = uri.split("://", 1)
    conn = psycopg2.connect(f"{scheme.split('+', 1)[0]}://{rest}")  # libpq URI: drop SQLAlchemy's +driver
    conn.autocommit = True
    try:  # the lock lives as long as this session, so a process that dies releases it
        with conn.cursor() as cur:
            def try_acquire() -> bool:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                return bool(cur.fetchone()[0])

            _wait_for(try_acquire, timeout, f"PostgreSQL advisory lock {key}")
            try:
                yield
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()


@contextlib.contextmanager
def _registry_lock(client, name: str, timeout: float) -> Iterator[None]:
    """A registered model `<name>.promote-lock` exists while a promotion holds the lock (create is atomic)."""
    import mlflow

    lock = f"{name}.promote-lock"

    def try_acquire() -> bool:
        try:
            client.create_registered_model(lock, tags={"holder": _who()},
                                           description="tunepipe promote lock; removed when the promotion ends")
            return True
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            held = client.get_registered_model(lock)
            # A holder that died leaves the entry behind; the locked section is short, so old means stale.
            # (Two waiters breaking the same stale entry at once could both get in: rare, and the alias
            # re-check under the lock still keeps a loser from being moved in.)
            if time.time() - held.creation_timestamp / 1000 > STALE_REGISTRY_LOCK_S:
                client.delete_registered_model(lock)
        return False

    _wait_for(try_acquire, timeout, f"registry lock {lock!r}")
    try:
        yield
    finally:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_registered_model(lock)


def promote_lock(client, name: str, timeout: float = LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager:
    """The lock that serialises alias moves for `name`, chosen by the registry store's kind."""
    import mlflow

    uri = mlflow.get_registry_uri()
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    if scheme == "sqlite":
        db = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return _file_lock(Path(db + ".promote.lock"), timeout) if db else contextlib.nullcontext()
    if scheme in ("", "file"):
        root = Path(uri.removeprefix("file://") if scheme else uri)
        return _file_lock(root / ".promote.lock", timeout)
    if scheme in ("postgresql", "postgres"):
        return _pg_lock(uri, name, timeout)
    return _registry_lock(client, name, timeout)


# ---------------------------------------------------------------------------------------------- writes

def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fmt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def move_alias(client, o: Outcome) -> None:
    """The one step that changes the champion (under the lock); the previous one is noted first for rollback."""
    cand = str(o.candidate.number)
    client.set_model_version_tag(o.name, cand, "champion.previous", str(o.champion.number) if o.champion else "")
    client.set_registered_model_alias(o.name, ALIAS, cand)


def record(client, o: Outcome) -> None:
    """The decision as tags on the versions (audit trail, written after the lock is released)."""
    name, cand, at = o.name, str(o.candidate.number), _now()
    tags = {
        "promote.decision": "promoted" if o.promote else "refused",
        "promote.reason": o.reason,
        "promote.at": at,
        "promote.by": _who(),
        "promote.metric": o.metric,
        "promote.candidate_value": _fmt(o.candidate_value),
        "promote.champion_version": str(o.champion.number) if o.champion else "",
        "promote.champion_value": _fmt(o.champion_value),
        "promote.p_value": _fmt(o.p_value),
        "promote.test": o.test or "",
        "promote.test_data_hash": o.test_data_hash or "",
        "promote.reevaluated": str(o.reevaluated).lower(),
    }
    if o.promote:
        tags["champion.since"] = at
        if o.champion is not None:
            client.set_model_version_tag(name, str(o.champion.number), "champion.replaced_by", cand)
            client.set_model_version_tag(name, str(o.champion.number), "champion.until", at)
        if "champion.rolled_back_at" in o.candidate.tags:  # set by a rollback; an explicit re-promotion clears it
            client.delete_model_version_tag(name, cand, "champion.rolled_back_at")
    for key, value in tags.items():
        # Empty values are skipped, except where "none" is information (a first champion has no previous).
        if value or key == "promote.champion_version" and o.promote:
            client.set_model_version_tag(name, cand, key, value)


# ---------------------------------------------------------------------------------------------- commands

def promote(client, name: str, s: PromoteParams, version: int | None = None, reevaluate: bool = False,
            dry_run: bool = False, test_path: Path = TEST_SPLIT, lock_timeout: float = LOCK_TIMEOUT_S) -> Outcome:
    require_model(client, name)
    if version is not None:
        cand = get_version(client, name, version)
    else:
        versions = list_versions(client, name)
        if not versions:
            raise UserError(f"{name} has no versions yet; run `dvc repro` to register one")
        cand = versions[-1]
        if cand.tags.get("champion.rolled_back_at"):
            raise UserError(f"{name} version {cand.number}, the newest, was rolled back from champion at "
                            f"{cand.tags['champion.rolled_back_at']}; pass --version {cand.number} to try it again")
    for _ in range(ATTEMPTS):
        champ = champion(client, name)
        if champ is not None and champ.number == cand.number:
            return Outcome(name, cand, champ, s.metric, cand.metric(s.metric), cand.metric(s.metric), None, None,
                           cand.tags.get("test_data_hash"), False, False, "is already the champion",
                           already_champion=True)
        ev = _evidence(client, name, s, cand, champ, reevaluate, test_path)
        ok, reason = decide(s, ev["candidate"], ev["champion"], ev["same_data"], ev["p_value"])
        outcome = Outcome(name, cand, champ, s.metric, ev["candidate"], ev["champion"], ev["p_value"],
                          s.test if ev["p_value"] is not None else None, ev["test_data_hash"], ev["reevaluated"],
                          ok, reason)
        if dry_run:
            return outcome
        if ok:
            with promote_lock(client, name, lock_timeout):
                if champion_number(client, name) != (champ.number if champ else None):
                    continue  # another promotion or rollback moved it meanwhile: judge against the new champion
                move_alias(client, outcome)
        record(client, outcome)
        return outcome
    raise UserError(f"promote: the champion of {name} kept changing while this promotion was deciding; "
                    "nothing was changed, run it again")


def rollback(client, name: str, dry_run: bool = False, lock_timeout: float = LOCK_TIMEOUT_S) -> tuple[int, int]:
    """Move the champion back to the one it replaced; returns (from, to)."""
    require_model(client, name)
    with contextlib.nullcontext() if dry_run else promote_lock(client, name, lock_timeout):
        champ = champion(client, name)
        if champ is None:
            raise UserError(f"{name} has no champion to roll back")
        prev = champ.tags.get("champion.previous", "")
        if not prev:
            raise UserError(f"{name} version {champ.number} has no previous champion recorded; nothing to roll "
                            "back to (promote another version with `tunepipe promote --version N` instead)")
        target = get_version(client, name, int(prev))
        if not dry_run:
            client.set_registered_model_alias(name, ALIAS, str(target.number))
    if not dry_run:
        at = _now()
        client.set_model_version_tag(name, str(champ.number), "champion.rolled_back_at", at)
        client.set_model_version_tag(name, str(champ.number), "champion.rolled_back_by", _who())
        client.set_model_version_tag(name, str(target.number), "champion.since", at)
    return champ.number, target.number


def describe(o: Outcome, s: PromoteParams) -> str:
    """The decision as the user reads it: both versions, the numbers, the rule applied, the verdict."""

    def line(role: str, v: Version | None, value: float | None) -> str:
        if v is None:
            return f"  {role:<9}  (none)"
        t, shown = v.tags, "?" if value is None else f"{value:.4f}"
        return (f"  {role:<9}  v{v.number}: {o.metric} {shown}  test data {t.get('test_data_hash', '?')[:12]}  "
                f"git {t.get('git_commit', '?')[:12]}  run {(v.run_id or '?')[:12]}")

    rule = f"min_delta {s.min_delta:g}" + (f", {s.test} significance {s.significance:g}" if s.significance else "")
    out = [f"promote {o.name}: {o.metric}, {rule}" + (" (re-evaluated on the current test split)"
                                                      if o.reevaluated else ""),
           line("candidate", o.candidate, o.candidate_value)]
    if not o.already_champion:
        out.append(line("champion", o.champion, o.champion_value))
    if o.delta is not None and not o.already_champion:
        out.append(f"  delta {o.delta:+.4f}" + (f", {o.test} p={o.p_value:.4g}" if o.p_value is not None else ""))
    was = f"v{o.champion.number}" if o.champion else "none"
    if o.already_champion:
        out.append(f"no change: v{o.candidate.number} {o.reason}")
    elif o.promote:
        out.append(f"PROMOTE: {o.reason}; champion {was} -> v{o.candidate.number}")
    else:
        out.append(f"REFUSE: {o.reason}; champion stays {was}")
    return "\n".join(out)


def version_rows(client, name: str, metric: str) -> list[dict]:
    """One plain dict per version, newest first: what `tunepipe models` shows."""
    aliases = aliases_by_version(client, name)
    rows = []
    for v in reversed(list_versions(client, name)):
        t = v.tags
        rows.append({
            "version": v.number,
            "aliases": aliases.get(v.number, []),
            "created": datetime.datetime.fromtimestamp(v.created_ms / 1000, datetime.timezone.utc)
            .isoformat(timespec="seconds"),
            "metrics": {m: v.metric(m) for m in v.metric_names()},
            "test_data_hash": t.get("test_data_hash"),
            "data_hash": t.get("data_hash"),
            "git_commit": t.get("git_commit"),
            "run_id": v.run_id,
            "promote": "rolled back" if t.get("champion.rolled_back_at") else t.get("promote.decision"),
            "params": json.loads(t["params"]) if t.get("params") else None,
        })
    return rows


def format_table(rows: list[dict], metric: str) -> str:
    cols = [metric] + [m for m in ("accuracy",) if m != metric]
    head = ["version", "aliases", *cols, "test data", "data", "git commit", "created (UTC)", "promotion"]
    body = [[str(r["version"]), ",".join(r["aliases"]) or "-",
             *(f"{r['metrics'][c]:.4f}" if r["metrics"].get(c) is not None else "-" for c in cols),
             (r["test_data_hash"] or "-")[:12], (r["data_hash"] or "-")[:12], (r["git_commit"] or "-")[:12],
             r["created"][:16].replace("T", " "), r["promote"] or "-"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])


def format_lineage(row: dict, name: str) -> str:
    """Everything needed to reproduce a version: its commit, its params (as a params.yaml) and the commands."""
    import yaml

    commit = row["git_commit"] or "unknown"
    lines = [f"{name} version {row['version']}  aliases: {','.join(row['aliases']) or '-'}  created {row['created']}",
             f"  git commit      {commit}" + ("  (the working tree had uncommitted changes)"
                                            if commit.endswith("-dirty") else ""),
             f"  MLflow run      {row['run_id']}",
             f"  data hash       {row['data_hash']}",
             f"  test data hash  {row['test_data_hash']}",
             "  metrics         " + ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items() if v is not None)]
    if row["params"] is not None:
        lines += ["", "# params.yaml that produced it:",
                  yaml.safe_dump(row["params"], sort_keys=False).rstrip(),
                  "", "# reproduce:",
                  f"#   git checkout {commit.removesuffix('-dirty')}",
                  f"#   tunepipe models --version {row['version']} --params-yaml > params.yaml",
                  "#   dvc repro"]
    return "\n".join(lines)


def _client(params_file: str):
    """Point MLflow at the configured store without creating anything there."""
    import mlflow

    from tunepipe import tracking
    from tunepipe.params import load_params

    p = load_params(params_file)
    # A CLI should say "unreachable" in seconds, not retry for minutes (explicit settings still win).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    uri = tracking.tracking_uri(p.tracking)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).is_file():
        raise UserError(f"tracking.uri: no MLflow registry at {uri.removeprefix('sqlite:///')}; run `dvc repro` "
                        "first (its export stage registers the model) or point tracking.uri at your store")
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(), p


def cmd_promote(args: argparse.Namespace) -> None:
    if args.rollback and (args.version is not None or args.reevaluate):
        raise UserError("promote --rollback takes no --version/--reevaluate: it returns to the recorded previous "
                        "champion (use `tunepipe promote --version N` to pick one)")
    client, p = _client(args.params)
    name = p.tracking.model_name
    with registry_errors(f"promote {name}"):
        if args.rollback:
            old, new = rollback(client, name, dry_run=args.dry_run)
            print(f"rollback {name}: champion v{old} -> v{new}" + (" (dry run: nothing changed)"
                                                                 if args.dry_run else ""))
            return
        outcome = promote(client, name, p.promote, args.version, args.reevaluate, args.dry_run)
    print(describe(outcome, p.promote))
    if args.dry_run:
        print("(dry run: nothing changed)")
    if not outcome.promote and not outcome.already_champion:
        sys.exit(1)  # scripts can tell "refused" (1) from "promoted" (0) and errors (2)


def cmd_models(args: argparse.Namespace) -> None:
    client, p = _client(args.params)
    name = p.tracking.model_name
    with registry_errors(f"models {name}"):
        require_model(client, name)
        rows = version_rows(client, name, p.promote.metric)
    if args.version is not None:
        rows = [r for r in rows if r["version"] == args.version]
        if not rows:
            raise UserError(f"--version: {name} has no version {args.version}; see `tunepipe models`")
    if args.params_yaml:
        if args.version is None or rows[0]["params"] is None:
            raise UserError("--params-yaml needs --version N of a version registered by `dvc repro` (params tag)")
        import yaml

        print(yaml.safe_dump(rows[0]["params"], sort_keys=False), end="")
    elif args.json:
        for r in rows:
            print(json.dumps({"name": name, **r}, sort_keys=True))
    elif args.version is not None:
        print(format_lineage(rows[0], name))
    else:
        print(format_table(rows, p.promote.metric) if rows else f"{name}: no versions")


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=int, help="one version in detail: lineage (git commit, params, run)")
    parser.add_argument("--json", action="store_true", help="one JSON object per version")
    parser.add_argument("--params-yaml", action="store_true",
                        help="with --version: print the params.yaml that produced it (to reproduce it)")
    parser.set_defaults(func=cmd_models)


def add_parser(sub) -> None:
    p = sub.add_parser("promote", help="move the registry's champion alias to a better version (or roll back)",
                       description="Compare the newest (or --version N) registered version with the champion on "
                                   "promote.metric; move the alias only for a real improvement. Exit 0 promoted "
                                   "(or nothing to do), 1 refused, 2 error.")
    p.add_argument("--version", type=int, help="candidate version (default: the newest)")
    p.add_argument("--reevaluate", action="store_true",
                   help=f"score both versions on the current {TEST_SPLIT} instead of their recorded metrics")
    p.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    p.add_argument("--rollback", action="store_true", help="move champion back to the champion it replaced")
    p.set_defaults(func=cmd_promote)

    _models_arguments(sub.add_parser("models", help="list registered versions: metrics, data hash, commit, aliases"))
    reg = sub.add_parser("registry", help="registry commands (`registry list` = `models`)")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    _models_arguments(reg_sub.add_parser("list", help="list registered versions (same as `tunepipe models`)"))
