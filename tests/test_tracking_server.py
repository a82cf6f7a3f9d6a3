"""End to end against a team's MLflow tracking server: `mlflow server` on a fresh PostgreSQL database with a proxied
artifact store. In a `git clone` of the repository, `dvc repro` logs and registers through it, `tunepipe promote`
moves the champion alias through it, and `mlflow models serve` loads the champion from it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psycopg2
import pytest
import yaml

from tests.helpers import (
    background,
    clone_repo,
    commit_all,
    free_port,
    fresh_pg_database,
    post_json,
    sh,
    synthetic_rows,
    tiny_params,
    wait_http,
    write_csv,
)
from tunepipe import tracking
from tunepipe.errors import UserError
from tunepipe.params import TrackingParams

LABELS = ["negative", "neutral", "positive"]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
MODEL = "tunepipe-classifier"
# The database password lives on the server's side only (trust auth here ignores it): nothing a client writes or
# prints may show it.
DB_PASSWORD = "pg-Secret-4711"


@dataclass
class Server:
    uri: str  # what clients use: plain http, no database credentials
    artifacts: Path  # --artifacts-destination: where the server stores what clients upload through it
    log: Path
    database: str


@contextlib.contextmanager
def tracking_server(tmp: Path) -> Iterator[Server]:
    """`mlflow server` as a team runs it: PostgreSQL backend store, artifacts proxied to a local directory."""
    with fresh_pg_database("tunepipe_srv") as db:
        backend = db.replace("://root@", f"://root:{DB_PASSWORD}@")
        port = free_port()
        server = Server(f"http://127.0.0.1:{port}", tmp / "artifacts", tmp / "server.log", db.rsplit("/", 1)[1])
        # --allowed-hosts as a team sets it for the name its clients use (host:port, as in their Host header).
        cmd = [MLFLOW, "server", "--backend-store-uri", backend, "--artifacts-destination", str(server.artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--allowed-hosts", f"127.0.0.1:{port}"]
        with background(cmd, server.log) as proc:
            wait_http(f"{server.uri}/health", proc, server.log)
            yield server


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`tunepipe ...` in the clone, as a user runs it (exit status left to the caller)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "tunepipe.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True)


def write_params(root: Path, model_dir: Path, uri: str, **overrides) -> None:
    params = tiny_params(model_dir, **{"tracking.uri": uri, **overrides})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_repro_promote_and_serve_through_a_tracking_server(tmp_path, tiny_model_dir):
    times: dict[str, float] = {}
    t0 = time.monotonic()
    with tracking_server(tmp_path) as server:
        times["server start"] = time.monotonic() - t0
        root = clone_repo(tmp_path / "repo")
        write_csv(root / "data/raw/train.csv", synthetic_rows(120))
        write_params(root, tiny_model_dir, server.uri)
        commit_all(root)
        client = mlflow.MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        # A host name the server does not accept is named, with the server option that fixes it.
        other = server.uri.replace("127.0.0.1", "localhost")
        with pytest.raises(UserError, match=f"refuses the host name {other[7:]} .* --allowed-hosts {other[7:]} "):
            tracking.check_reachable(TrackingParams(uri=other))

        # 1. dvc repro logs the run and registers version 1 on the server, nothing in the clone.
        t = time.monotonic()
        first = sh(["dvc", "repro"], root)
        times["dvc repro"] = time.monotonic() - t
        for stage in ("finetune", "evaluate", "export"):
            assert f"Running stage '{stage}'" in first.stdout
        for local in ("mlflow.db", "mlruns", "mlartifacts"):
            assert not (root / local).exists(), f"{local} was created in the clone instead of using the server"
        assert "warning: tracking.uri" not in first.stderr  # artifacts go through the server: no warning
        untracked = [x for x in sh(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout
                     .splitlines() if x.startswith("??")]
        assert not untracked, untracked

        exp = client.get_experiment_by_name("tunepipe")
        assert exp.artifact_location.startswith("mlflow-artifacts:")  # uploads go through the server
        (run,) = client.search_runs([exp.experiment_id])
        local_metrics = json.loads((root / "reports/metrics.json").read_text())
        assert run.data.params["finetune.learning_rate"] == "0.005" and run.data.params["task"] == "classification"
        assert run.data.metrics["test_macro_f1"] == pytest.approx(local_metrics["macro_f1"])
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) > 1  # finetune's curve
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/metrics.json", "evaluation/classification_report.txt", "evaluation/predictions.csv",
                "evaluation/explanations.html"} <= logged, logged
        report = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation/metrics.json",
                                                     dst_path=str(tmp_path / "dl"), tracking_uri=server.uri)
        assert json.loads(Path(report).read_text()) == local_metrics
        assert list(server.artifacts.rglob("classification_report.txt"))  # stored where the server was told

        (v1,) = client.search_model_versions(f"name = '{MODEL}'")
        assert v1.version == "1" and v1.tags["run_id"] == run.info.run_id and v1.tags["task"] == "classification"
        assert client.get_model_version_download_uri(MODEL, "1").startswith("mlflow-artifacts:")

        # 2. promote moves the alias through the server (under its registry lock entry, removed afterwards).
        res = cli(root, "promote")
        assert res.returncode == 0 and "PROMOTE" in res.stdout and "champion none -> v1" in res.stdout, res
        fresh = mlflow.MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        assert fresh.get_registered_model(MODEL).aliases == {"champion": "1"}
        assert not fresh.search_registered_models(f"name = '{MODEL}.promote-lock'")
        listed = cli(root, "models")
        assert listed.returncode == 0, listed
        assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["1", "champion"]]

        # 3. A changed param: finetune, evaluate and export again, version 2, and promote's verdict is what the
        #    registry then holds.
        write_params(root, tiny_model_dir, server.uri, **{"finetune.learning_rate": 0.002})
        commit_all(root, "lower learning rate")
        t = time.monotonic()
        second = sh(["dvc", "repro"], root)
        times["second dvc repro"] = time.monotonic() - t
        assert "Running stage 'finetune'" in second.stdout and "Running stage 'prepare'" not in second.stdout
        versions = {int(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
        assert sorted(versions) == [1, 2] and versions[2].tags["run_id"] != run.info.run_id
        res = cli(root, "promote")
        tags = client.get_model_version(MODEL, "2").tags
        champion = client.get_registered_model(MODEL).aliases["champion"]
        for v in ("1", "2"):  # both versions' figures as the registry holds them
            assert f"{float(client.get_model_version(MODEL, v).tags['metric.macro_f1']):.4f}" in res.stdout
        if res.returncode == 0:
            assert "PROMOTE" in res.stdout and "champion v1 -> v2" in res.stdout
            assert champion == "2" and tags["promote.decision"] == "promoted" and tags["champion.previous"] == "1"
        else:
            assert res.returncode == 1 and "REFUSE" in res.stdout and "champion stays v1" in res.stdout, res
            assert champion == "1" and tags["promote.decision"] == "refused"
        assert tags["promote.reason"] in res.stdout

        # 4. mlflow models serve fetches the champion through the server and answers.
        port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        cmd = [MLFLOW, "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
        t = time.monotonic()
        with background(cmd, tmp_path / "serve.log", env) as proc:
            wait_http(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log")
            times["serve start"] = time.monotonic() - t
            (pred,) = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": ["what a great flight"]})[
                "predictions"]
        assert pred["label"] in LABELS and set(pred["probabilities"]) == set(LABELS)
        assert sum(pred["probabilities"].values()) == pytest.approx(1, abs=1e-5)

        # The database password stayed on the server's side: not in anything a client printed or recorded.
        recorded = [first.stdout, first.stderr, second.stdout, second.stderr, res.stdout, res.stderr,
                    cli(root, "models", "--json").stdout, json.dumps(run.data.params), json.dumps(run.data.tags),
                    *(json.dumps(v.tags) for v in versions.values()), json.dumps(tags)]
        assert not [text for text in recorded if DB_PASSWORD in text]
        server_log = server.log.read_text()

        # The server up but its database gone: named as that, in seconds, not taken for a working store.
        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=5432, user="root", dbname="test")) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"DROP DATABASE {server.database} WITH (FORCE)")
        t = time.monotonic()
        down = cli(root, "models")
        assert down.returncode == 2 and time.monotonic() - t < 60, down
        assert down.stderr.startswith(f"error: tracking.uri: the MLflow tracking server at {server.uri} answers but "
                                      "cannot use its backend store (HTTP 503 TEMPORARILY_UNAVAILABLE: "), down.stderr
        assert "Traceback" not in down.stderr and DB_PASSWORD not in down.stderr
    times["total"] = time.monotonic() - t0
    assert DB_PASSWORD not in server_log  # MLflow's own log does not print the backend store URI either
    print("tracking server end to end: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
