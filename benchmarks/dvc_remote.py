"""What sharing a run through a DVC remote costs, against re-running it: in a project where `dvc repro` has finished
and its dvc.lock is committed, `dvc push` to an empty folder remote; then, in a fresh `git clone`, `dvc pull` and
`dvc repro` (which must re-run nothing); with --repro also `dvc repro` in another fresh clone that pulls nothing
(the teammate's alternative: the whole pipeline), side by side in one run.

    python benchmarks/dvc_remote.py [--workspace .] [--repro]

The remote is a temporary folder (added to the workspace's .dvc/config.local for the run, removed after): the
project's own remotes are left alone. A folder on the same disk measures DVC's own work (hashing, linking,
copying); a network store adds its transfer time on top. Writes benchmarks/dvc_remote.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REMOTE = "tunepipe-bench"


def run(cmd: list[str], cwd: Path) -> float:
    """Run a command (the venv's tools first on PATH), fail loudly, return its wall seconds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    if res.returncode:
        sys.exit(f"error: `{' '.join(cmd)}` in {cwd} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return took


def cached_outs(root: Path) -> list[str]:
    """The outputs DVC caches (what push and pull move); the small `cache: false` reports travel through git."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(str(out.def_path) for out in repo.index.outs if out.use_cache)


def size_of(root: Path, paths: list[str]) -> tuple[int, int]:
    files = [p for path in paths for p in ([root / path] if (root / path).is_file() else (root / path).rglob("*"))
             if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=REPO, help="a project where `dvc repro` has finished")
    ap.add_argument("--repro", action="store_true", help="also time `dvc repro` in a clone that pulls nothing")
    args = ap.parse_args()
    ws = args.workspace.resolve()

    from tunepipe.modeling import cpu_isa, cpu_model

    status = subprocess.run(["git", "status", "--porcelain", "dvc.lock", "params.yaml"], cwd=ws,
                            capture_output=True, text=True, check=True).stdout
    if status.strip():
        sys.exit(f"error: {ws}: dvc.lock or params.yaml has uncommitted changes; commit them first (a teammate's "
                 "clone gets the committed dvc.lock)")
    outs = cached_outs(ws)
    nbytes, nfiles = size_of(ws, outs)
    results = {"cpu": f"{cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores", "workspace": str(ws),
               "outputs": outs, "bytes": nbytes, "files": nfiles,
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "seconds": {}}
    secs = results["seconds"]
    with tempfile.TemporaryDirectory(prefix="tunepipe-remote-bench-") as tmp:
        storage = Path(tmp) / "storage"
        run(["dvc", "remote", "add", "--local", REMOTE, str(storage)], ws)
        try:
            secs["dvc push (empty remote)"] = run(["dvc", "push", "-r", REMOTE], ws)
            secs["dvc push again (nothing new)"] = run(["dvc", "push", "-r", REMOTE], ws)
        finally:
            run(["dvc", "remote", "remove", "--local", REMOTE], ws)
        mate = Path(tmp) / "teammate"
        secs["git clone"] = run(["git", "clone", "-q", str(ws), str(mate)], Path(tmp))
        run(["dvc", "remote", "add", "--local", "-d", REMOTE, str(storage)], mate)
        secs["dvc pull"] = run(["dvc", "pull"], mate)
        secs["dvc repro after the pull (a no-op)"] = run(["dvc", "repro"], mate)
        out = subprocess.run(["dvc", "status"], cwd=mate, capture_output=True, text=True).stdout
        if "up to date" not in out:
            sys.exit(f"error: the pulled clone is not up to date; `dvc status` says:\n{out}")
        shutil.rmtree(mate)
        if args.repro:
            other = Path(tmp) / "no-pull"
            run(["git", "clone", "-q", str(ws), str(other)], Path(tmp))
            secs["dvc repro without a remote (the whole pipeline)"] = run(["dvc", "repro"], other)

    results["seconds"] = {k: round(v, 1) for k, v in secs.items()}
    get = secs["git clone"] + secs["dvc pull"] + secs["dvc repro after the pull (a no-op)"]
    lines = [f"{len(outs)} cached outputs, {nfiles} files, {nbytes / 1e6:.0f} MB; {results['cpu']}; load average "
             f"{results['load_average_at_start'][0]:.2f} at start", "",
             "| step | wall time | MB/s |", "| --- | --- | --- |"]
    for step, took in secs.items():
        rate = f"{nbytes / 1e6 / took:.0f}" if step in ("dvc push (empty remote)", "dvc pull") else ""
        lines.append(f"| `{step}` | {took:.1f} s | {rate} |")
    lines.append(f"\nA teammate's clone + pull + no-op repro: {get:.0f} s.")
    full = secs.get("dvc repro without a remote (the whole pipeline)")
    if full:
        lines.append(f"Re-running the pipeline instead: {full:.0f} s ({full / get:.0f}x the pull).")
        results["speedup_pull_vs_repro"] = round(full / get, 1)
    print("\n".join(lines))
    (REPO / "benchmarks/dvc_remote.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
