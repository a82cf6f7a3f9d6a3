"""What a fresh clone holds: DVC's outputs are DVC's (never git's), and the committed baseline is a real run's."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from ruamel.yaml import YAML

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout of the repository")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def declared_outs() -> list[tuple[str, str, dict]]:
    """(stage, path, options) for every out, metric and plot file that dvc.yaml declares."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = []
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                found.append((name, path, {"kind": kind, **(opts or {})}))
    return found


def test_cached_outputs_are_ignored_by_git_and_never_tracked():
    cached = [(s, path) for s, path, o in declared_outs() if o.get("cache", True)]
    assert {p for _, p in cached} >= {"data/prepared", "data/tokenized", "data/augmented", "models/model",
                                      "models/onnx"}
    for stage, path in cached:
        assert git("ls-files", "--", path) == "", f"{path} ({stage}) is a DVC output but tracked by git"
        # DVC writes these .gitignore entries itself; they are committed so a clone starts clean.
        res = subprocess.run(["git", "check-ignore", "--no-index", "-q", "--", path], cwd=REPO)
        assert res.returncode == 0, f"{path} ({stage}) is not git-ignored"


def test_checkpoints_never_enter_git():
    assert git("ls-files", "--", "models/checkpoints") == ""
    res = subprocess.run(["git", "check-ignore", "--no-index", "-q", "--", "models/checkpoints/state.json"],
                         cwd=REPO)
    assert res.returncode == 0, "models/checkpoints must be git-ignored"


def test_committed_baseline_is_a_run_of_the_committed_params():
    """dvc.lock and every small `cache: false` metric/plot of that run are committed, so `dvc metrics diff` and
    `dvc exp show` compare against a baseline from the first minute; its params are params.yaml's."""
    assert git("ls-files", "--", "dvc.lock").strip() == "dvc.lock"
    # YAML 1.2 as DVC writes it (PyYAML would read DVC's `8e-05` as a string).
    yaml12 = YAML(typ="safe", pure=True)
    lock = yaml12.load((REPO / "dvc.lock").read_text())["stages"]
    params = yaml12.load((REPO / "params.yaml").read_text())

    def lookup(key: str):
        node = params
        for part in key.split("."):
            node = node[part]
        return node

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(lock) == set(stages), "dvc.lock must hold every stage: commit it after a full `dvc repro`"
    for name, entry in lock.items():
        for key, value in entry.get("params", {}).get("params.yaml", {}).items():
            assert value == lookup(key), f"dvc.lock stage {name}: {key}={value!r} but params.yaml has {lookup(key)!r}"
    uncached = [path for _, path, o in declared_outs() if o.get("cache", True) is False and "checkpoints" not in path]
    tracked = set(git("ls-files", "reports").split())
    for path in uncached:
        assert path in tracked, f"{path} (cache: false) should be committed with dvc.lock"
    assert not [p for p in tracked if p.startswith("reports/") and p not in uncached and not p.endswith(".gitkeep")], \
        "reports/ holds files no stage writes"
