"""Data and models shared through a DVC remote (issue 15): the committed default (a folder beside the project) and
a real S3-compatible endpoint (moto's server, started here on 127.0.0.1). One clone runs `dvc repro` and
`dvc push`; a teammate's clone `dvc pull`s, finds nothing to re-run, and holds byte-identical data and models."""

from __future__ import annotations

import hashlib
import importlib.util
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    REPO,
    background,
    clone_repo,
    commit_all,
    free_port,
    sh,
    synthetic_rows,
    tiny_params,
    wait_http,
    write_csv,
)

BUCKET = "tunepipe-team"
# The secret key, made up per run (so not even this file holds it): it must show up nowhere else (committed files,
# .dvc/config, anything a command printed).
SECRET = f"tunepipe-secret-{secrets.token_hex(12)}"
# Every DVC output of the pipeline, compared file by file between the clones.
OUTS = ("data/prepared", "data/tokenized", "data/augmented", "models/model", "models/onnx", "models/checkpoints")
# No proxy may stand between the clients and the local endpoint.
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def test_default_remote_is_a_folder_beside_the_project():
    """A fresh clone can `dvc push`/`dvc pull` at once: the default remote is a local folder outside the
    repository, beside it, so every clone in the same parent folder shares it."""
    name = sh(["dvc", "config", "--project", "core.remote"], REPO).stdout.strip()
    assert name, ".dvc/config must set core.remote"
    listed = dict(line.split()[:2] for line in sh(["dvc", "remote", "list", "--project"], REPO).stdout.splitlines())
    url = listed[name]  # as DVC resolves it: relative to .dvc/
    assert "://" not in url, f"the default remote must be a local folder: {url}"
    assert Path(url).parent == REPO.resolve().parent and Path(url).name == "tunepipe-dvc-storage", url


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto's S3 server as a real process on a free loopback port, with one empty bucket; yields its URL and the
    environment that reaches it (dummy credentials, no proxy, nothing from this machine's own AWS setup)."""
    script = Path(sys.executable).parent / "moto_server"
    if importlib.util.find_spec("moto") is None or not script.is_file():
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]'): no local S3 endpoint to test against")
    env: dict[str, str | None] = {
        **dict.fromkeys(PROXIES), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups for credentials
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None,
        "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_ENDPOINT_URL": None,
    }
    for key, value in env.items():  # this process's own requests (readiness check, boto3) too
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path / "moto.log"
    with background([str(script), "-H", "127.0.0.1", "-p", str(port)], log) as server:
        wait_http(f"{endpoint}/", server, log, timeout=120)  # moto answers ListBuckets at /
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
        yield endpoint, env


def _files(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _bucket_keys(endpoint: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key=SECRET)
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]


@pytest.mark.slow
def test_push_to_s3_then_a_teammate_pulls_and_nothing_reruns(tmp_path, tiny_model_dir, s3):
    endpoint, env = s3
    printed: list[str] = []

    def run(cmd: list[str], cwd: Path, creds: bool = False) -> str:
        extra = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET} if creds else {}
        res = sh(cmd, cwd, env={**env, **extra})
        printed.append(res.stdout + res.stderr)
        return res.stdout

    # Alice: the team's remote as the committed default, her credentials in .dvc/config.local (git-ignored).
    alice = clone_repo(tmp_path / "alice")
    write_csv(alice / "data/raw/train.csv", synthetic_rows(90))
    params = tiny_params(tiny_model_dir, **{"finetune.epochs": 1.0, "robustness.perturbations": [],
                                            "explain.examples_per_class": 0})
    (alice / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/tunepipe"], alice)
    run(["dvc", "remote", "modify", "team", "endpointurl", endpoint], alice)
    run(["dvc", "remote", "modify", "--local", "team", "access_key_id", "testing"], alice)
    run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", SECRET], alice)
    commit_all(alice)
    run(["dvc", "repro"], alice)
    run(["dvc", "push"], alice)
    run(["dvc", "push", "-r", "shared"], alice)  # and the committed default folder, for Carol below
    commit_all(alice, "run")  # dvc.lock and the small reports, as a user would
    keys = _bucket_keys(endpoint)
    assert keys and all(k.startswith("tunepipe/files/md5/") for k in keys), keys[:5]
    assert (tmp_path / "tunepipe-dvc-storage/files/md5").is_dir(), "the default remote is not beside the clone"

    # Bob: git clone, dvc pull (credentials from the environment), and `dvc repro` finds nothing to do.
    bob = tmp_path / "bob"
    subprocess.run(["git", "clone", "-q", str(alice), str(bob)], check=True)
    run(["dvc", "pull"], bob, creds=True)
    assert "up to date" in run(["dvc", "status"], bob).lower()
    again = run(["dvc", "repro"], bob, creds=True)
    assert "Running stage" not in again and "up to date" in again.lower(), again
    # Carol pulls from the committed default remote, the folder beside the clones.
    carol = tmp_path / "carol"
    subprocess.run(["git", "clone", "-q", str(alice), str(carol)], check=True)
    run(["dvc", "pull", "-r", "shared"], carol)
    assert "up to date" in run(["dvc", "status"], carol).lower()
    for out in OUTS:
        expected = _files(alice / out)
        assert expected, f"{out}: nothing to compare"
        assert _files(bob / out) == expected, f"{out} differs after dvc pull from S3"
        assert _files(carol / out) == expected, f"{out} differs after dvc pull from the default remote"

    # The secret is in Alice's .dvc/config.local and nowhere else: not committed, not in .dvc/config, not printed.
    assert SECRET in (alice / ".dvc/config.local").read_text()
    for root in (alice, bob, carol):
        assert SECRET not in (root / ".dvc/config").read_text()
        assert subprocess.run(["git", "grep", "-q", SECRET, "HEAD"], cwd=root).returncode == 1
        assert not (root / ".dvc/config.local").exists() or root == alice
    assert not [out for out in printed if SECRET in out]
