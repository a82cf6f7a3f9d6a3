"""Data and models shared through a DVC remote: the committed default (a folder beside the project), and a real
S3-compatible endpoint (moto's server, started here on 127.0.0.1): `dvc repro` + `dvc push` in one clone, then a
teammate's clone `dvc pull`s and finds nothing to re-run, with byte-identical models."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, clone_repo, commit_all, sh, synthetic_rows, tiny_params, write_csv

BUCKET = "tunepipe-team"
# A recognisable secret: it must show up nowhere (committed files, DVC's config, any command's output).
SECRET = "s3cr3t-TUNEPIPE-never-shown-7d1f"


def test_default_remote_is_a_folder_beside_the_project():
    """A fresh clone can `dvc push`/`dvc pull` at once; the folder is outside the repository and shared by every
    clone in the same parent folder."""
    name = sh(["dvc", "config", "--project", "core.remote"], REPO).stdout.strip()
    assert name, ".dvc/config must set core.remote"
    url = sh(["dvc", "config", "--project", f"remote.{name}.url"], REPO).stdout.strip()
    assert "://" not in url, f"the default remote must be a local folder: {url}"
    # `dvc config` shows the url resolved from .dvc/: beside this checkout, whichever folder it was cloned into.
    assert Path(url).resolve().parent == REPO.resolve().parent, url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(tmp_path):
    """moto's S3 server as a real process on a free local port, with one empty bucket; the env that reaches it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "moto.log", "w")  # closed once the server has stopped
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "moto.log").read_text()
                assert time.monotonic() < deadline, "moto_server did not answer within 60 s"
                time.sleep(0.3)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
               # nothing from the machine's own AWS setup
               "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key=SECRET)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, env, client
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _files(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.slow
def test_push_to_s3_and_a_teammate_pulls_without_rerunning(tmp_path, tiny_model_dir, s3):
    endpoint, env, client = s3
    outputs: list[str] = []

    def run(cmd: list[str], cwd: Path) -> str:
        res = sh(cmd, cwd, env=env)
        outputs.append(res.stdout + res.stderr)
        return res.stdout

    a = clone_repo(tmp_path / "alice")
    write_csv(a / "data/raw/train.csv", synthetic_rows(90))
    params = tiny_params(tiny_model_dir, **{"finetune.epochs": 1.0, "robustness.perturbations": [],
                                            "explain.examples_per_class": 0})
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The team's remote, committed (no credentials: those come from the environment or .dvc/config.local).
    run(["dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/tunepipe"], a)
    run(["dvc", "remote", "modify", "team", "endpointurl", endpoint], a)
    commit_all(a)

    run(["dvc", "repro"], a)
    pushed = run(["dvc", "push"], a)
    assert "pushed" in pushed, pushed
    commit_all(a, "run")  # dvc.lock and the small reports, as a user would
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys and all(k.startswith("tunepipe/files/md5/") for k in keys), keys[:5]
    assert not (tmp_path / "tunepipe-dvc-storage").exists(), "the test pushed to the default remote"

    # The teammate: git clone, dvc pull, dvc repro finds nothing to do.
    b = tmp_path / "bob"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    run(["dvc", "pull"], b)
    assert "up to date" in run(["dvc", "status"], b).lower()
    again = run(["dvc", "repro"], b)
    assert "Running stage" not in again and "up to date" in again.lower(), again
    for out in ("models/model", "models/onnx", "data/prepared", "data/augmented"):
        assert _files(b / out) == _files(a / out), f"{out} differs after dvc pull"
    assert _files(b / "models/model"), "nothing pulled"

    # Credentials never land in a committed file, DVC's config, or anything the commands printed.
    for root in (a, b):
        assert SECRET not in (root / ".dvc/config").read_text()
        assert subprocess.run(["git", "grep", "-q", SECRET], cwd=root).returncode == 1
    assert not [o for o in outputs if SECRET in o]
