"""Issue 11, registry side: an export killed half-way registers exactly one version, promote passes over versions
registered without their tags, the registry lock on a tracking server ignores clock skew and is released only by
its holder, store passwords reach no tag, param, message or output, and registered versions pin what they need.

Against real MLflow stores (sqlite in a temp dir; PostgreSQL for a store URI that carries a password)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import time

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.store.db import utils as db_utils

from stages import evaluate, export, finetune
from tests import test_registry
from tests.test_registry import Registry, free_port, fresh_pg_database
from tests.test_stages import run_front
from tunepipe import tracking
from tunepipe.errors import UserError, masked
from tunepipe.files import read_json
from tunepipe.params import load_params, parse_params
from tunepipe.registry import locks

# test_registry's fixtures: tiny ONNX exports, a session sqlite store, a fresh registered-model name per test.
onnx_exports, store, reg = test_registry.onnx_exports, test_registry.store, test_registry.reg

INFO = {"task": "classification", "data_hash": "d" * 64, "test_data_hash": "t" * 64}
METRICS = {"macro_f1": 0.5, "accuracy": 0.6}


def kill_at_version_creation(monkeypatch, after: bool) -> None:
    """The next registry call that creates a model version dies (a kill -9 there), just before or just after the
    version exists; later calls go through."""
    real = MlflowClient._create_model_version
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            if after:
                real(self, *args, **kwargs)
            raise RuntimeError("killed while registering")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "_create_model_version", dying)


def params_for(reg: Registry):
    return parse_params({"tracking": {"uri": reg.uri, "experiment": "tunepipe", "model_name": reg.name}})


# ---------------------------------------------------------------------------------------------- item 1

@pytest.mark.parametrize("after", [True, False], ids=["killed-after-version-created", "killed-before"])
def test_registration_killed_between_log_model_and_tags_then_retried_gives_one_tagged_version(
        reg, onnx_exports, monkeypatch, after):
    p = params_for(reg)
    run_id = reg.client.create_run(reg.experiment_id).info.run_id
    kill_at_version_creation(monkeypatch, after)
    with pytest.raises(RuntimeError, match="killed while registering"):
        tracking.register(p, run_id, onnx_exports["random"], INFO, METRICS, {})
    first = tracking.register(p, run_id, onnx_exports["random"], INFO, METRICS, {})  # what `dvc repro` does next
    again = tracking.register(p, run_id, onnx_exports["random"], INFO, METRICS, {})

    versions = reg.client.search_model_versions(f"name = '{reg.name}'")
    assert [int(v.version) for v in versions] == [first["version"]] == [again["version"]]
    tags = reg.tags(first["version"])
    assert tags["run_id"] == run_id and tags["task"] == "classification" and tags["test_data_hash"] == "t" * 64
    assert tags["metric.macro_f1"] == "0.5" and json.loads(tags["metrics"]) == METRICS
    assert tags[tracking.FINGERPRINT_TAG] == tracking.content_fingerprint(onnx_exports["random"])
    code, out, err = reg.cli("promote")
    assert code == 0 and f"champion none -> v{first['version']}" in out, out + err
    assert reg.champion() == first["version"]


def test_export_stage_killed_after_registering_keeps_models_onnx_and_reruns_to_one_version(project, monkeypatch):
    """models/onnx changes only once the version is registered; the re-run reuses that version, fully tagged."""
    root = project(n_rows=90)
    run_front(root)
    finetune.main()
    evaluate.main()
    (root / "models/onnx").mkdir(parents=True)
    (root / "models/onnx/previous-export.txt").write_text("the last good export")
    real = MlflowClient._create_model_version
    kill_at_version_creation(monkeypatch, after=True)
    with pytest.raises(RuntimeError, match="killed while registering"):
        export.main()
    assert [f.name for f in (root / "models/onnx").iterdir()] == ["previous-export.txt"]
    assert not (root / "reports/export.json").exists()
    monkeypatch.setattr(MlflowClient, "_create_model_version", real)

    export.main()  # `dvc repro` after the kill
    registered = read_json(root / "reports/export.json")["registered"]
    assert (root / "models/onnx/model.onnx").is_file() and not (root / "models/onnx/previous-export.txt").exists()
    export.main()  # and once more (`dvc repro -f`): the same trained model and settings, the same version
    assert read_json(root / "reports/export.json")["registered"] == registered

    name = load_params().tracking.model_name
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    assert [int(v.version) for v in versions] == [registered["version"]]
    tags = versions[0].tags
    assert tags["run_id"] == read_json(root / "models/model/training_info.json")["run_id"]
    assert float(tags["metric.macro_f1"]) == pytest.approx(read_json(root / "reports/metrics.json")["macro_f1"])


def test_promote_names_and_skips_a_version_registered_without_tags(reg):
    v1 = reg.add({"macro_f1": 0.7})
    bare = int(mlflow.register_model(reg.store.models["positive"], reg.name).version)  # no tags at all
    code, out, err = reg.cli("promote")
    assert code == 0 and reg.champion() == v1, out + err
    assert (f"promote: skipping {reg.name} version {bare} lacks the tags `dvc repro` registers a model with "
            "(run_id, task, test_data_hash, metrics); run `dvc repro`") in err
    code, _, err = reg.cli("promote", "--version", str(bare))
    assert code == 2 and f"--version: {reg.name} version {bare} lacks the tags" in err and reg.champion() == v1
    assert "nothing was changed" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- item 2

def test_promote_lock_of_a_tracking_server_is_the_registry_entry(monkeypatch):
    used = []
    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: "http://127.0.0.1:5000")
    monkeypatch.setattr(locks, "_registry_lock", lambda client, name, timeout: used.append(name))
    locks.promote_lock(None, "m")
    assert used == ["m"]


@pytest.mark.parametrize("skew", [10_000.0, -10_000.0])
def test_registry_lock_judges_staleness_on_the_waiters_own_clock(reg, monkeypatch, skew):
    """Waiters whose wall clock is hours off the server's neither break a live lock nor wait forever on a dead
    holder's: an entry is stale once it has not changed for STALE seconds of the waiter's monotonic clock."""
    monkeypatch.setattr(locks, "STALE_REGISTRY_LOCK_S", 1.0)  # the holder heartbeats every 0.25 s
    lock = f"{reg.name}.promote-lock"
    real_time = time.time
    with locks._registry_lock(reg.client, reg.name, timeout=5):
        held = reg.client.get_registered_model(lock).creation_timestamp
        monkeypatch.setattr(time, "time", lambda: real_time() + skew)  # the waiter's skewed wall clock
        t0 = time.monotonic()
        with pytest.raises(UserError, match="gave up after 3s waiting for registry lock"):
            with locks._registry_lock(reg.client, reg.name, timeout=3):
                pass
        assert time.monotonic() - t0 >= 3  # three times STALE: the heartbeat kept it alive
        assert reg.client.get_registered_model(lock).creation_timestamp == held  # still the live holder's entry
        monkeypatch.setattr(time, "time", real_time)
    assert not reg.client.search_registered_models(f"name = '{lock}'")

    # A holder that died: its entry never changes again. The skewed waiter takes over after STALE seconds.
    reg.client.create_registered_model(lock, tags={"token": "dead-holder", "heartbeat": "0"})
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    t0 = time.monotonic()
    with locks._registry_lock(reg.client, reg.name, timeout=5):
        assert reg.client.get_registered_model(lock).tags["token"] != "dead-holder"
    assert 1.0 <= time.monotonic() - t0 < 5


def test_registry_lock_release_leaves_another_holders_entry(reg, monkeypatch):
    """A holder whose entry was broken and taken over meanwhile must neither delete nor keep alive the new one."""
    monkeypatch.setattr(locks, "STALE_REGISTRY_LOCK_S", 0.4)
    lock = f"{reg.name}.promote-lock"
    with locks._registry_lock(reg.client, reg.name, timeout=5):
        reg.client.delete_registered_model(lock)  # what a waiter breaking it does, then it takes the lock
        reg.client.create_registered_model(lock, tags={"token": "other-holder", "heartbeat": "0"})
        time.sleep(0.5)  # several heartbeat periods
    entries = reg.client.search_registered_models(f"name = '{lock}'")
    assert [e.tags for e in entries] == [{"token": "other-holder", "heartbeat": "0"}]
    reg.client.delete_registered_model(lock)
    with locks._registry_lock(reg.client, reg.name, timeout=5):  # the owner's own release still works
        pass
    assert not reg.client.search_registered_models(f"name = '{lock}'")


# ---------------------------------------------------------------------------------------------- item 3

PASSWORD = "s3cr3t-pw"


def test_store_password_reaches_no_tag_param_output_or_message(onnx_exports, tmp_path, monkeypatch, capsys):
    """A PostgreSQL store URI with a password (the local server accepts any): the run, the registered version,
    `tunepipe models` in every form, and the error for an unreachable store show it as ***."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    with fresh_pg_database() as db:
        uri = db.replace("root@", f"root:{PASSWORD}@")
        mlflow.set_tracking_uri(uri)
        reg = Registry(None, uri, "", tmp_path, capsys)
        p = params_for(reg)
        meta = {"data_hash": "d" * 64, "hashes": {"test": "t" * 64}}
        run_id = tracking.start_training_run(p, None, meta, "fp", "cpu", "fp32")
        out = tracking.register(p, run_id, onnx_exports["random"], INFO, METRICS, {"fp32_max_abs_logit_diff": 0})
        run = reg.client.get_run(run_id)
        version = reg.client.get_model_version(reg.name, str(out["version"]))
        stored = [*run.data.params.values(), *run.data.tags.values(), *version.tags.values()]
        assert stored and not [s for s in stored if PASSWORD in s]
        assert json.loads(version.tags["params"])["tracking"]["uri"] == uri.replace(PASSWORD, "***")
        assert all(PASSWORD not in v for v in tracking.flat_params(p, ("tracking", "sweep")).values())
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # no "View run at <uri>" links

        n = str(out["version"])
        shown = [reg.cli(*args) for args in (["models"], ["models", "--json"], ["models", "--version", n],
                                              ["models", "--version", n, "--params-yaml"])]
        assert all(code == 0 for code, _, _ in shown) and not [o + e for _, o, e in shown if PASSWORD in o + e]
        assert yaml.safe_load(shown[-1][1])["tracking"]["uri"] == uri.replace(PASSWORD, "***")

    monkeypatch.setattr(db_utils, "MAX_RETRY_COUNT", 1)  # MLflow retries for minutes otherwise
    reg.uri = f"postgresql+psycopg2://root:{PASSWORD}@127.0.0.1:{free_port()}/gone"
    reg.set_promote()
    for args in (["models"], ["promote"]):
        code, out, err = reg.cli(*args)
        assert code == 2 and "postgresql+psycopg2://root:***@127.0.0.1:" in err, err
        assert PASSWORD not in out + err


# ---------------------------------------------------------------------------------------------- item 4

def test_registered_model_pins_the_installed_serving_requirements(reg, onnx_exports):
    out = tracking.register(params_for(reg), reg.client.create_run(reg.experiment_id).info.run_id,
                            onnx_exports["random"], INFO, METRICS, {})
    lines = open(mlflow.pyfunc.get_model_dependencies(f"models:/{reg.name}/{out['version']}")).read().splitlines()
    for name in ("onnxruntime", "transformers", "tokenizers", "pandas", "numpy", "mlflow"):
        assert f"{name}=={importlib.metadata.version(name)}" in lines, lines


@pytest.mark.parametrize("uri", [
    f"postgresql://root:{PASSWORD}@db:5432/mlflow",
    f"postgresql://db:5432/mlflow?user=root&password={PASSWORD}&sslmode=require",
    f"postgresql+psycopg2://db/mlflow?PASSWORD={PASSWORD}",
    f"http://user:{PASSWORD}@tracking.example:5000",
])
def test_masked_hides_passwords_in_userinfo_and_query(uri):
    shown = masked(f"error: cannot reach {uri} (tracking.uri)")
    assert PASSWORD not in shown and "***" in shown
    assert shown.endswith("(tracking.uri)")
