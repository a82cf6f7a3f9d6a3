"""finetune on 2 CPU processes (DDP, gloo) with the tiny model: TUNEPIPE_NPROC=2 through `dvc repro`, a kill -9 of
one process then a resumed re-run, a sweep whose trials each train on 2 processes, and the one-line errors of a bad
process count or an indivisible batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from stages import augment, prepare
from stages import tokenization as tokenize
from tests.helpers import REPO, clone_repo, commit_all, sh, synthetic_rows, tiny_params, write_csv

# 150 texts, batch 16 for 8 epochs: 64 steps, a checkpoint every 5; the tiny model learns the keywords (validation
# macro-F1 0.56-0.72 here, chance 0.33).
LEARNS = {"finetune.epochs": 8.0, "finetune.learning_rate": 1e-2}


def _env(**extra: str) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _stage(root: Path, nproc: str | None, module: str = "stages.finetune") -> subprocess.CompletedProcess:
    env = _env(**({"TUNEPIPE_NPROC": nproc} if nproc is not None else {}))
    return subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def _runs(root: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tunepipe")
    return client.search_runs([exp.experiment_id]) if exp else []


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")), None)


@pytest.mark.slow
def test_dvc_repro_trains_on_two_processes(tmp_path, tiny_model_dir):
    root = clone_repo(tmp_path / "repo")
    write_csv(root / "data/raw/train.csv", synthetic_rows(150))
    # evaluate's robustness report and explanations page are not what this test is about
    params = tiny_params(tiny_model_dir, **LEARNS, **{"robustness.perturbations": [], "explain.examples_per_class": 0})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    env = _env(TUNEPIPE_NPROC="2")
    res = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "batch 16 = 2 processes x 8 per device" in out
    # One process speaks and writes: one summary line each, and no launcher or DDP chatter.
    assert out.count("finetune: best validation macro_f1") == 1 and out.count("finetune: cpu") == 1
    for noise in ("Traceback", "OMP_NUM_THREADS", "find_unused_parameters", "[rank"):
        assert noise not in out + res.stderr, noise

    train = json.loads((root / "reports/train.json").read_text())
    assert (train["processes"], train["per_device_batch_size"], train["effective_batch_size"]) == (2, 8, 16)
    assert train["best_val_macro_f1"] > 0.5 and train["global_step"] == 64
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["macro_f1"] > 0.5, metrics
    runs = _runs(root)
    assert len(runs) == 1 and runs[0].data.tags["tunepipe.processes"] == "2"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    versions = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(
        "name='tunepipe-classifier'")
    assert len(versions) == 1
    # The process count is how the run was launched, not what it computes: nothing is out of date without it.
    assert "up to date" in sh(["dvc", "status"], root).stdout.lower()


@pytest.mark.slow
def test_kill_9_of_one_process_fails_cleanly_and_the_rerun_resumes(project):
    root = project(150, **LEARNS)
    prepare.main()
    tokenize.main()
    augment.main()
    ckpt = root / "models/checkpoints/checkpoint-15/trainer_state.json"
    proc = subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=root, env=_env(TUNEPIPE_NPROC="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (ckpt.is_file() and ckpt.stat().st_size > 0) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert proc.poll() is None and set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: finetune: training process rank 1 (pid ") and "was killed by SIGKILL" in last
    assert "resumes from the last checkpoint" in last
    assert "Traceback" not in err, err[-3000:]
    run_id = json.loads((root / "models/checkpoints/state.json").read_text())["run_id"]

    again = _stage(root, "2")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from models/checkpoints/checkpoint-" in again.stdout
    train = json.loads((root / "reports/train.json").read_text())
    assert train["resumed_from"] and train["processes"] == 2 and train["best_val_macro_f1"] > 0.5
    assert [r.info.run_id for r in _runs(root)] == [run_id]  # the resumed run is the killed one's
    assert json.loads((root / "models/model/training_info.json").read_text())["run_id"] == run_id
    assert sorted(p.name for p in (root / "models/checkpoints").iterdir()) == ["state.json"]


@pytest.mark.parametrize("nproc", ["two", "0"])
def test_a_bad_process_count_is_one_line(project, nproc):
    root = project(30)
    res = _stage(root, nproc)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: TUNEPIPE_NPROC: must be a positive whole number of training processes, "
                                  f"got '{nproc}'; unset it (or set it to 1) to train in one process")


def test_a_batch_that_does_not_divide_among_the_processes_is_one_line(project):
    root = project(30, **{"finetune.batch_size": 15})
    res = _stage(root, "2")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: finetune.batch_size: 15 does not divide among 2 training processes (it is the global batch, split "
        "evenly); make it a multiple of 2, or change the process count (TUNEPIPE_NPROC or the launcher's)"]


@pytest.mark.slow
def test_a_sweep_trains_each_trial_on_two_processes(project):
    root = project(150, **LEARNS, **{"sweep.batch_size": [16], "sweep.pruner": "none",
                                     "sweep.learning_rate": [5e-3, 2e-2], "sweep.trials": 2})
    prepare.main()
    tokenize.main()
    augment.main()
    res = subprocess.run([sys.executable, "-m", "tunepipe.cli", "sweep", "--no-repro", "--apply"], cwd=root,
                         env=_env(TUNEPIPE_NPROC="2"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    # Rank 0 alone speaks: one start line and one summary line.
    assert res.stdout.count("sweep: study 'tunepipe-sweep' created") == 1, res.stdout
    assert res.stdout.count("sweep: 2 complete, 0 pruned, 0 failed (2 run here") == 1, res.stdout
    summary = json.loads((root / "reports/sweep/summary.json").read_text())
    assert summary["trials"]["complete"] == 2 and summary["best"]["value"] > 0.5  # chance is 0.33
    runs = _runs(root)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(runs) == 3 and len(trials) == 2  # one parent run, one run per trial: rank 0 alone logs
    assert {r.data.tags["tunepipe.processes"] for r in runs} == {"2"}
    # Each trial trained as one DDP group for all its 8 epochs (8 steps each at a global batch of 16).
    assert all(r.data.metrics["epochs_run"] == 8.0 for r in trials)
    assert yaml.safe_load((root / "params.yaml").read_text())["finetune"]["learning_rate"] == \
        summary["best"]["params"]["learning_rate"]  # --apply ran once, on rank 0


def test_a_sweep_batch_that_does_not_divide_among_the_processes_is_one_line(project):
    root = project(30, **{"sweep.batch_size": [16, 15, 25]})
    res = subprocess.run([sys.executable, "-m", "tunepipe.cli", "sweep", "--no-repro"], cwd=root,
                         env=_env(TUNEPIPE_NPROC="2"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: sweep.batch_size: 15, 25 does not divide among 2 training processes (a trial's batch is the global "
        "batch, split evenly); make every choice a multiple of 2, or change the process count (TUNEPIPE_NPROC)"]
