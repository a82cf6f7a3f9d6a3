"""Outputs survive kills and keep their files' modes (issue 11): atomic_dir never loses the old output, leftovers of
dead writers are cleaned up, SIGTERM is one line after cleanup, written files get normal modes and symlinks are
written through, and CSV reports quote labels holding commas or quotes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import mlflow
import pytest

from tests.helpers import REPO
from tunepipe.files import atomic_dir, write_csv, write_json, write_text


def _python(code: str, cwd: Path, **kw) -> subprocess.Popen:
    """A separate process running `code` with this checkout's tunepipe (it will be killed)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _wait_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()


def _old_output(root: Path) -> Path:
    with atomic_dir(root / "out") as tmp:
        (tmp / "weights.bin").write_text("old")
    return root / "out"


# ---------------------------------------------------------------------------------------------- kills

def test_kill_between_swapping_outputs_keeps_the_old_one(tmp_path):
    """A kill after the new output is complete but before it is renamed in: the next writer finds the old output
    (it was moved aside, not deleted, and is put back), and nothing else is left over."""
    out = _old_output(tmp_path)
    proc = _python("""
        import os, signal
        from pathlib import Path
        from tunepipe import files

        real_replace = os.replace
        def replace(src, dst):  # the failure injection point: the instant the new output would be renamed in
            if Path(dst).name == "out" and Path(src).name.endswith(".tmp"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        files.os.replace = replace
        with files.atomic_dir("out") as tmp:
            (tmp / "weights.bin").write_text("new")
    """, tmp_path)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # The next writer of `out` puts the old output back when it starts; it fails, leaving the old output as it was.
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("boom")
    assert (out / "weights.bin").read_text() == "old"
    assert _hidden(tmp_path) == []


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    out = _old_output(tmp_path)
    code = """
        import sys, time
        from tunepipe.files import atomic_dir, write_text
        with atomic_dir("out") as tmp:
            (tmp / "weights.bin").write_bytes(b"x" * 2**20)  # as large as a model, in spirit
            print("ready", flush=True)
            time.sleep(600)
    """
    killed = _python(code, tmp_path)
    _wait_ready(killed)
    killed.kill()
    killed.wait()
    assert _hidden(tmp_path) == [f".out.{killed.pid}.tmp"]  # what a kill -9 leaves, as large as the model
    (tmp_path / f".report.json.{killed.pid}.tmp").write_text("{half")  # a write_text killed midway
    live = _python(code, tmp_path)
    try:
        _wait_ready(live)  # it removed the dead writer's copy of `out` when it started
        assert _hidden(tmp_path) == sorted([f".out.{live.pid}.tmp", f".report.json.{killed.pid}.tmp"])
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_text("new")
        write_json(tmp_path / "report.json", {"ok": True})
        # The dead writers' temp copies are gone; the live writer's is untouched.
        assert _hidden(tmp_path) == [f".out.{live.pid}.tmp"]
        assert (out / "weights.bin").read_text() == "new"
    finally:
        live.kill()
        live.wait()


def test_sigterm_cleans_up_and_exits_with_one_line(tmp_path):
    out = _old_output(tmp_path)
    proc = _python("""
        import time
        from tunepipe.errors import run_main
        from tunepipe.files import atomic_dir

        def main():
            with atomic_dir("out") as tmp:
                (tmp / "weights.bin").write_text("new")
                print("ready", flush=True)
                time.sleep(600)

        run_main(main)
    """, tmp_path)
    _wait_ready(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err == "terminated (SIGTERM)\n"
    assert (out / "weights.bin").read_text() == "old"
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------- modes, links

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_get_normal_modes(tmp_path, umask_022):
    write_text(tmp_path / "new.yaml", "a: 1\n")
    assert (tmp_path / "new.yaml").stat().st_mode & 0o777 == 0o644
    kept = tmp_path / "shared.yaml"
    kept.write_text("a: 1\n")
    kept.chmod(0o664)  # group-writable on purpose: a rewrite must not make it owner-only
    write_text(kept, "a: 2\n")
    assert kept.stat().st_mode & 0o777 == 0o664 and kept.read_text() == "a: 2\n"
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_sweep_apply_keeps_params_mode_and_symlink(tmp_path, umask_022):
    from tunepipe.sweep.apply import apply_best

    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    target.chmod(0o644)
    link = tmp_path / "params.yaml"
    link.symlink_to(target)
    t0 = time.time()
    assert apply_best(link, {"learning_rate": 1e-4, "batch_size": 8, "dropout": 0.2})
    assert link.is_symlink() and link.resolve() == target
    assert "learning_rate: 0.0001" in target.read_text()
    assert target.stat().st_mode & 0o777 == 0o644 and target.stat().st_mtime >= t0 - 1
    assert _hidden(shared) == [] and _hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------- CSV quoting

def test_write_csv_quotes_commas_and_quotes(tmp_path):
    import pandas as pd

    rows = [{"actual": 'say "hi", please', "predicted": "a,b"}, {"actual": "plain", "predicted": "x"}]
    write_csv(tmp_path / "c.csv", rows, ["actual", "predicted"])
    df = pd.read_csv(tmp_path / "c.csv", dtype=str, keep_default_na=False)
    assert df.to_dict("records") == rows


def test_labels_with_commas_round_trip_to_the_paired_test(tmp_path, tiny_model_dir, monkeypatch):
    """The classification evaluate writes predictions.csv; promotion's paired test reads it back from MLflow."""
    from tunepipe.modeling import build_model, load_tokenizer
    from tunepipe.params import FinetuneParams
    from tunepipe.registry.evidence import run_predictions
    from tunepipe.tasks import get_task
    from tunepipe.tasks.classification.encode import tokenize_split
    from tunepipe.tasks.classification.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    labels = ['bad, really', 'so-so "meh"', "good"]
    task = get_task("classification")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = build_model(str(tiny_model_dir), labels, FinetuneParams(), task)
    raw = datasets.Dataset.from_dict({"text": [f"text {i}, with a comma" for i in range(9)],
                                      "label": [labels[i % 3] for i in range(9)]})
    test = tokenize_split(raw, tokenizer, 32, {lab: i for i, lab in enumerate(labels)})
    evaluate(model, tokenizer, test, labels, tmp_path / "reports")

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "reports/predictions.csv"), "evaluation")
    df = run_predictions(run.info.run_id, 1)
    assert list(df["label"]) == [labels[i % 3] for i in range(9)]
    assert set(df["prediction"]) <= set(labels)
    assert list(df["id"]) == list(range(9))
