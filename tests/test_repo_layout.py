"""What a fresh clone holds: DVC's outputs are DVC's (never git's), and the committed baseline is a real run's."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from tests.helpers import REPO, clone_repo, sh

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


# ---- dvc.yaml code deps follow the imports ----

SRC = REPO / "src"
# The Task methods each stage calls live in these modules of every task folder (tasks/<name>/<module>.py).
STAGE_TASK_MODULES = {"prepare": ["data"], "tokenize": ["encode"], "augment": ["augment"], "finetune": ["metrics"],
                      "evaluate": ["evaluate"], "export": ["serve"]}
# Files a stage reads without importing them.
READ_FILES = {"export": ["src/tunepipe/serving/pyfunc_model.py",  # logged as the registered model's code
                        "src/tunepipe/serving/explain.py",
                        "src/tunepipe/serving/sentence_classifier.py"]}  # beside it


def _module_file(name: str) -> Path | None:
    path = SRC / Path(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """tunepipe modules `path` imports at load time (module level; function-level imports serve other commands
    and TYPE_CHECKING blocks nothing), parent packages included."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunepipe"):
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("tunepipe")}
    parts = [n.split(".") for n in names]
    return {f for p in parts for i in range(1, len(p) + 1) if (f := _module_file(".".join(p[:i])))}


def _closure(starts: list[Path]) -> set[str]:
    seen, todo = set(), list(starts)
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += _imports(f)
    return {str(f.relative_to(REPO)) for f in seen}


def test_dvc_yaml_code_deps_are_exactly_what_each_stage_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    tasks = sorted(p.name for p in (SRC / "tunepipe/tasks").iterdir() if (p / "__init__.py").is_file())
    assert set(stages) == set(STAGE_TASK_MODULES)
    for name, stage in stages.items():
        module = stage["cmd"].removeprefix("python -m ").replace(".", "/") + ".py"
        starts = [REPO / module] + [SRC / f"tunepipe/tasks/{t}/{m}.py" for t in tasks
                                    for m in ["__init__", *STAGE_TASK_MODULES[name]]]
        expected = _closure(starts) | set(READ_FILES.get(name, []))
        declared = {d for d in stage["deps"] if d.startswith(("stages/", "src/"))}
        assert declared == expected, (f"dvc.yaml stage {name}: missing {sorted(expected - declared)}, "
                                      f"not imported {sorted(declared - expected)}")


@pytest.mark.parametrize("edited, reruns", [
    ("src/tunepipe/exporting.py", {"export"}),  # a shared module
    ("src/tunepipe/plots.py", {"finetune", "evaluate"}),
    ("src/tunepipe/tasks/classification/augment.py", {"augment"}),  # a task module
])
def test_editing_a_module_reruns_the_stages_that_import_it_and_no_other(tmp_path, edited, reruns):
    """Against the committed dvc.lock: `dvc status` names the edited file as a changed dep of exactly these."""
    repo = clone_repo(tmp_path / "repo")
    with open(repo / edited, "a") as fh:
        fh.write("# edited\n")
    res = sh([sys.executable, "-m", "dvc", "status", "--json"], repo)
    changed = {stage for stage, entries in json.loads(res.stdout).items() for e in entries if isinstance(e, dict)
               and edited in e.get("changed deps", {})}
    assert changed == reruns


def test_the_wheel_installs_tunepipe_and_no_stages_package(tmp_path):
    """`pip install` ships the package `tunepipe` (every task folder, the served model's code) and nothing named
    `stages`: the DVC entry points belong to the project, not to site-packages."""
    import zipfile

    repo = clone_repo(tmp_path / "repo")  # building writes build/ beside the sources: not in this checkout
    sh([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation", "-q", "-w",
        str(tmp_path / "dist")], tmp_path)
    wheel = next((tmp_path / "dist").glob("tunepipe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"tunepipe"}
    tasks = sorted(p.name for p in (SRC / "tunepipe/tasks").iterdir() if (p / "__init__.py").is_file())
    assert {f"tunepipe/tasks/{t}/__init__.py" for t in tasks} | {"tunepipe/serving/pyfunc_model.py"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tunepipe.cli, tunepipe.tasks as t; "
            "assert tunepipe.cli.__file__.startswith(sys.argv[1]), tunepipe.cli.__file__; print(t.available())")
    out = sh([sys.executable, "-c", code, str(site)], tmp_path).stdout
    assert out.strip() == str(tasks)
    res = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import stages",
                          str(site)], cwd=tmp_path, capture_output=True, text=True)
    assert "No module named 'stages'" in res.stderr
