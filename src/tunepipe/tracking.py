"""MLflow glue: where runs go, one run shared by finetune/evaluate/export, metric logging from Trainer, and the
registration of each exported model."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from transformers import TrainerCallback

from tunepipe.errors import UserError, masked
from tunepipe.params import Params, TrackingParams
from tunepipe.paths import MLFLOW_ARTIFACTS, MLFLOW_DB, project_root
from tunepipe.serving import EXPLAIN_CODE, PYFUNC_CODE, SENTENCE_CLASSIFIER_CODE
from tunepipe.tasks import get_task


def tracking_uri(t: TrackingParams, root: Path | None = None) -> str:
    """params > $MLFLOW_TRACKING_URI > an embedded sqlite database in the project (registry included), also for a
    queued DVC experiment running in a temporary copy of the project (paths.project_root)."""
    if t.uri:
        return t.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{((root or project_root()) / MLFLOW_DB).resolve()}"


# The DVC experiment a stage runs for (`dvc exp run`, queued or not: DVC sets DVC_EXP_NAME), on its MLflow run
# (as tunepipe.dvc_experiment, and the run's name) and its registry version, to match them with `dvc exp show`.
EXPERIMENT_TAG = "dvc_experiment"


def dvc_experiment() -> str | None:
    return os.environ.get("DVC_EXP_NAME") or None


# One quick try: MLflow's own client retries an unreachable store for minutes, then ends in a traceback.
REACH_TIMEOUT_S = 5
# An MLflow server refuses a Host header outside its --allowed-hosts (default: localhost and private IPs), so a
# team's server reached by a DNS name answers 403 to every request until it is started with that name.
BAD_HOST = "HTTP 403 Invalid Host header"
_DB_BACKENDS = ("postgresql", "mysql", "mssql", "oracle")


def check_reachable(t: TrackingParams, root: Path | None = None) -> str:
    """Fail in seconds, with what to do, when the tracking server or database does not answer; returns the URI.

    Stages call this before their work starts (finetune before training, export before exporting), so a store that
    is down costs seconds, not a training run. Local stores (sqlite, file paths) need no check.
    """
    uri = tracking_uri(t, root)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("http", "https"):
        problem = _http_problem(uri, t.experiment)
        what = "the MLflow tracking server"
    elif scheme in _DB_BACKENDS:
        problem = _db_problem(uri)
        what = "the MLflow tracking database"
    else:
        return uri
    if problem is None:
        return uri
    shown = masked(uri)
    key = "tracking.uri" if t.uri else "MLFLOW_TRACKING_URI"
    local = ("set tracking.uri: null in params.yaml" if t.uri else "unset MLFLOW_TRACKING_URI") + \
        f" to use the project's local sqlite store ({MLFLOW_DB})"
    if problem.startswith(BAD_HOST):
        host = urlsplit(uri).netloc.rsplit("@", 1)[-1]
        raise UserError(f"{key}: {what} at {shown} refuses the host name {host} ({problem}, MLflow's DNS-rebinding "
                        f"protection); start the server with --allowed-hosts {host} (comma-separated, `*` "
                        f"wildcards), or {local}")
    if problem.startswith("HTTP 401") or problem.startswith("HTTP 403"):
        raise UserError(f"{key}: {what} at {shown} refused the request ({problem}); set MLFLOW_TRACKING_USERNAME and "
                        f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it, or {local}")
    problem = masked(problem)  # a reason quoting the URL must not show its password either
    if re.match(r"HTTP 5\d\d [A-Z_]+: ", problem):  # an MLflow error from the server, not a proxy's page
        raise UserError(f"{key}: {what} at {shown} answers but cannot use its backend store ({problem}); check the "
                        f"server's database and the server's log, or {local}")
    raise UserError(f"{key}: cannot reach {what} at {shown} ({problem}); start it (or fix {key}), or {local}")


def _http_problem(uri: str, experiment: str) -> str | None:
    """None if an MLflow server answers at `uri`, else why not, in a few words."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:  # MLflow's own request: the same credentials and TLS settings as the runs will use
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                                max_retries=0, backoff_factor=0, timeout=REACH_TIMEOUT_S, raise_on_status=False,
                                params={"experiment_name": experiment})
    except MlflowException as exc:
        causes, cause = [], exc
        while cause is not None:
            causes.append(cause)
            cause = cause.__cause__ or cause.__context__
        text = " ".join(f"{type(c).__name__}: {c}" for c in causes)
        if "Timeout" in text:
            return f"no answer within {REACH_TIMEOUT_S}s"
        found = re.search(r"\[Errno -?\d+\] ([^\"'()\]]+)", text)
        return found.group(1).strip() if found else str(exc).splitlines()[0][:200]
    if response.status_code == 403 and "Invalid Host header" in response.text:
        return BAD_HOST
    if response.status_code in (401, 403):
        return f"HTTP {response.status_code}"
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code == 200 or isinstance(answer, dict) and "error_code" in answer:
        if response.status_code < 500:  # MLflow answered (404: no experiment yet)
            return None
        # The server is up but its database is not (stopped, dropped, wrong credentials on the server's side).
        message = (str(answer.get("message") or "").strip().splitlines() or [""])[0][:200]
        return f"HTTP {response.status_code} {answer['error_code']}: {message}"
    return f"HTTP {response.status_code}, not an MLflow tracking server's answer"


def _db_problem(uri: str) -> str | None:
    """None if the database at `uri` accepts a connection within the timeout, else why not."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
        args = {"connect_timeout": REACH_TIMEOUT_S} if url.get_backend_name() in ("postgresql", "mysql") else {}
        engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
        engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return None


HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def setup(t: TrackingParams, root: Path | None = None) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists; returns its id."""
    if masked(tracking_uri(t, root)) != tracking_uri(t, root):  # MLflow prints run links with the URI as given
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # A server lost in the middle of a stage: MLflow's defaults (7 retries, backoff factor 2, 120 s timeouts) keep
    # a stage waiting for minutes; these fail within about a minute. Set the variables to override them.
    for var, value in HTTP_RETRIES.items():
        os.environ.setdefault(var, value)
    uri = check_reachable(t, root)
    with _sqlite_turn(uri):
        return _setup_experiment(t, uri, root)


@contextlib.contextmanager
def _sqlite_turn(uri: str) -> Iterator[None]:
    """Processes on one machine that share a sqlite store (sweep workers, `dvc queue start --jobs N`) take turns at
    its first use: two at once would both build its schema and both create the experiment. Other stores: no wait."""
    if not uri.startswith("sqlite:"):
        yield
        return
    from filelock import FileLock
    from sqlalchemy.engine import make_url

    db = str(Path(make_url(uri).database or MLFLOW_DB).resolve())
    with FileLock(Path(tempfile.gettempdir()) / f"tunepipe-mlflow-{hashlib.sha1(db.encode()).hexdigest()[:16]}.lock"):
        yield


def _setup_experiment(t: TrackingParams, uri: str, root: Path | None) -> str:
    import mlflow

    if uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(t.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if tracking_uri(t, root).startswith("sqlite:"):
        # Keep artifacts beside the database, not in whatever directory the process started in.
        artifacts = ((root or project_root()) / MLFLOW_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(t.experiment, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel process
        return client.get_experiment_by_name(t.experiment).experiment_id


def client_side_artifacts(client, exp_id: str) -> str | None:
    """A warning when a tracking server leaves artifacts to each client's own disk.

    A server started with `--default-artifact-root /some/dir` (no --artifacts-destination) gives its experiments a
    plain path: every client then writes the run's reports and the registered model under that path on its own
    machine, where teammates and `mlflow models serve` elsewhere cannot read them."""
    import mlflow

    if urlsplit(mlflow.get_tracking_uri()).scheme not in ("http", "https"):
        return None
    location = client.get_experiment(exp_id).artifact_location or ""
    if urlsplit(location).scheme not in ("", "file"):
        return None
    return (f"warning: tracking.uri: the MLflow server stores this experiment's artifacts at {location}, a path this "
            "machine writes on its own disk: teammates and `mlflow models serve` on other machines will not find the "
            "model there unless it is storage mounted at the same path everywhere; start the server with "
            "--artifacts-destination DIR_OR_S3_URI (artifacts go through the server) for new experiments")


def _create_sqlite_store(db: Path) -> None:
    """Create a new sqlite store whole: MLflow builds its schema in dozens of migrations, and a process killed
    midway leaves a database every later run refuses ("out-of-date database schema"). So the schema is built in a
    temp file beside it, renamed in only if no other process created the store meanwhile."""
    from mlflow.tracking._tracking_service.utils import _get_store

    from tunepipe.files import recover

    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    recover(db)  # half-built databases of killed processes
    tmp = db.parent / f".{db.name}.{os.getpid()}.tmp"
    try:
        _get_store(f"sqlite:///{tmp}").engine.dispose()
        os.link(tmp, db)  # fails if another process's store came in first: then that one is used
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def flat_params(p: Params, sections: tuple[str, ...] = ("task", "data", "model", "tokenize", "augment",
                                                          "finetune")) -> dict[str, str]:
    out: dict[str, str] = {}
    dumped = p.model_dump()
    for sec in sections:
        val = dumped[sec]
        if isinstance(val, dict):
            out.update({f"{sec}.{k}": masked(str(v)) for k, v in val.items()})
        else:
            out[sec] = masked(str(val))
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


class MlflowMetricsCallback(TrainerCallback):
    """Trainer logs -> MLflow metrics on one run, by id (works for nested sweep runs without global state)."""

    # Trainer's end-of-training summary reuses "train_loss" for the mean loss: keep it apart from the curve.
    RENAME = {"loss": "train_loss", "train_loss": "train_loss_mean"}

    def __init__(self, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient()
        self.run_id = run_id

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for key, value in logs.items():
            if not isinstance(value, int | float) or key in ("epoch", "total_flos", "step"):
                continue
            name = self.RENAME.get(key) or ("val_" + key.removeprefix("eval_") if key.startswith("eval_") else key)
            metrics.append(Metric(name, float(value), now, state.global_step))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)


def start_training_run(p: Params, run_id: str | None, meta: dict, fp: str, device: str, precision: str) -> str:
    """finetune's MLflow run (or the interrupted one it resumes), tagged with the data, code and hardware."""
    import mlflow

    exp_id = setup(p.tracking)
    client = mlflow.MlflowClient()
    warning = client_side_artifacts(client, exp_id)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was reset meanwhile: start a new run
    experiment = dvc_experiment()
    run = client.create_run(exp_id, tags={
        "tunepipe.git_commit": git_commit() or "unknown",
        "tunepipe.data_hash": meta["data_hash"],
        "tunepipe.test_data_hash": meta["hashes"]["test"],
        "tunepipe.fingerprint": fp,
        "tunepipe.task": p.task,
        "tunepipe.device": device,
        "tunepipe.precision": precision,
        "mlflow.runName": experiment or f"repro-{time.strftime('%Y%m%d-%H%M%S')}",
        **({f"tunepipe.{EXPERIMENT_TAG}": experiment} if experiment else {}),
    })
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000])
                                              for k, v in flat_params(p).items()])
    return run.info.run_id


# What the served model imports; registered versions pin the versions it was exported and checked with.
SERVING_REQUIREMENTS = ("onnxruntime", "transformers", "tokenizers", "pandas", "numpy", "mlflow")
FINGERPRINT_TAG = "export_fingerprint"


def pinned_requirements() -> list[str]:
    out = []
    for name in SERVING_REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)  # e.g. onnxruntime-gpu installed instead: let the serving side pick the build
    return out


def content_fingerprint(*parts: Path | str) -> str:
    """sha256 over files (directories walked in sorted order, relative names included) and plain strings."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            h.update(b"s" + part.encode() + b"\0")
            continue
        files = sorted(f for f in part.rglob("*") if f.is_file()) if part.is_dir() else [part]
        for f in files:
            h.update(b"f" + str(f.relative_to(part) if part.is_dir() else f.name).encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()[:32]


def served_signature(onnx_dir: Path, example: list[str]):
    """The served model's signature: the output MLflow would infer from the example, plus the request params
    (explain, explain_label), which `mlflow models serve` accepts only when declared."""
    import pandas as pd
    from mlflow.models import infer_signature

    from tunepipe.serving.pyfunc_model import PARAMS, TextPredictor

    output = pd.DataFrame(TextPredictor(onnx_dir).predict(example))
    return infer_signature(example, output, params=PARAMS)


def registered_version(client, name: str, fingerprint: str):
    """The version already registered for this export (by a run of export that died before finishing), if any."""
    import mlflow

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{FINGERPRINT_TAG} = '{fingerprint}'")
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda mv: int(mv.version), default=None)


def register(p: Params, run_id: str, onnx_dir: Path, info: dict, metrics: dict, parity_report: dict,
             fingerprint: str | None = None, torch_model_dir: Path | None = None) -> dict:
    """Log the served model (pyfunc from code, the ONNX export as its artifact) on the run and register it as a
    version of tracking.model_name, tagged with what it was trained and scored on. torch_model_dir: the
    fine-tuned PyTorch model, logged as a second artifact for the served {"explain": true} (read only then).

    Idempotent: the version carries `fingerprint` (default: a hash of onnx_dir) and its tags from its creation
    (one registry call), so an export killed at any point and run again finds that version and reuses it
    instead of registering another one, and no version is ever left untagged."""
    import mlflow

    fingerprint = fingerprint or content_fingerprint(onnx_dir)
    name = p.tracking.model_name
    tags = {
        FINGERPRINT_TAG: fingerprint,
        "git_commit": git_commit() or "unknown",
        "data_hash": info["data_hash"],
        "test_data_hash": info["test_data_hash"],
        "run_id": run_id,
        "task": info["task"],
        # the params that reproduce it; store URIs without their passwords
        "params": masked(json.dumps(p.model_dump(exclude={"sweep", "promote"}), sort_keys=True)),
        "metrics": json.dumps({k: v for k, v in metrics.items() if isinstance(v, int | float)}, sort_keys=True),
        "headline_metric": get_task(info["task"]).headline_metric,
        **{f"metric.{k}": repr(float(v)) for k, v in metrics.items() if isinstance(v, int | float)},
        **({EXPERIMENT_TAG: dvc_experiment()} if dvc_experiment() else {}),
    }
    setup(p.tracking)
    client = mlflow.MlflowClient()
    existing = registered_version(client, name, fingerprint)
    if existing is not None:
        for k, v in tags.items():  # complete it; tags it has keep the values of its first registration
            if k not in (existing.tags or {}):
                client.set_model_version_tag(name, existing.version, k, v)
        return {"model_name": name, "version": int(existing.version), "model_uri": existing.source}
    example = ["what a great flight", "the service was awful"]
    artifacts = {"model_dir": str(onnx_dir), **({"torch_model_dir": str(torch_model_dir)} if torch_model_dir else {})}
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: float(v) for k, v in parity_report.items() if isinstance(v, int | float)})
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts=artifacts,
            code_paths=[str(EXPLAIN_CODE), str(SENTENCE_CLASSIFIER_CODE)],
            input_example=example, signature=served_signature(onnx_dir, example),
            pip_requirements=pinned_requirements())
    version = mlflow.register_model(logged.model_uri, name, tags=tags)  # tags in the same call as the version
    return {"model_name": name, "version": int(version.version), "model_uri": logged.model_uri}
