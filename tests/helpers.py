"""Helpers shared by the tests and the benchmarks: tiny labelled data (texts, and CoNLL sentences for NER), a tiny
random BERT, params for quick runs, and what a user gets from `git clone` of this repository. (Fixtures live in
conftest.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The test PostgreSQL server (trust auth); SQLAlchemy 2.1 defaults to psycopg 3, hence the explicit driver.
PG = "postgresql+psycopg2://root@127.0.0.1:5432"

POSITIVE = ["great", "love", "excellent", "happy", "wonderful", "amazing"]
NEGATIVE = ["awful", "hate", "terrible", "sad", "horrible", "broken"]
NEUTRAL = ["table", "monday", "paper", "street", "window", "number"]
FILLER = ["the", "a", "flight", "car", "today", "was", "is", "my", "this", "service", "very", "and"]


def synthetic_rows(n: int, seed: int = 0, classes: tuple[str, ...] = ("negative", "neutral", "positive")
                   ) -> list[tuple[str, str]]:
    """Unique (text, label) rows whose label is carried by keywords, so a tiny model can learn it."""
    rng = random.Random(seed)
    words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
    rows, seen = [], set()
    while len(rows) < n:
        label = classes[len(rows) % len(classes)]
        toks = rng.sample(FILLER, rng.randint(2, 6)) + rng.sample(words[label], 2)
        rng.shuffle(toks)
        text = " ".join(toks) + f" {rng.randint(0, 10**6)}"
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "sentiment")) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# Entities come from small closed lists, so even the tiny random BERT learns them in a few steps.
PEOPLE = [["John", "Smith"], ["Maria", "Garcia"], ["Wei", "Chen"], ["Anna", "Kowalski"], ["Omar"]]
PLACES = [["Paris"], ["Berlin"], ["New", "York"], ["Tokyo"], ["Lagos"]]
ORGS = [["Acme", "Corp"], ["Globex"], ["Initech"], ["Umbrella", "Group"]]
TEMPLATES = [
    "{PER} visited {LOC} on Monday .",
    "{ORG} opened an office in {LOC} .",
    "{PER} works for {ORG} now .",
    "the weather in {LOC} was cold today .",
    "{PER} said the talks with {ORG} went well .",
    "nothing happened here yesterday .",
]


def synthetic_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """(tokens, IOB2 tags) from templates filled with known mentions."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        toks, tags = [], []
        for word in rng.choice(TEMPLATES).split():
            kind = {"{PER}": "PER", "{LOC}": "LOC", "{ORG}": "ORG"}.get(word)
            if kind is None:
                toks.append(word)
                tags.append("O")
                continue
            mention = rng.choice({"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}[kind])
            toks += mention
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(mention) - 1)
        out.append((toks, tags))
    return out


def write_conll(path: Path, sentences, docstart: bool = True) -> Path:
    """CoNLL-2003 layout: TOKEN POS CHUNK TAG, blank line between sentences, an optional -DOCSTART- header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for toks, tags in sentences:
        lines += [f"{t} NN I-NP {g}" for t, g in zip(toks, tags, strict=True)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_tiny_dir(root: Path, n_train: int = 120, n_eval: int = 30) -> Path:
    """data/raw/conll under `root`: CoNLL train, validation (testa) and test (testb) files of synthetic sentences."""
    d = root / "data/raw/conll"
    write_conll(d / "eng.train", synthetic_sentences(n_train, seed=1))
    write_conll(d / "eng.testa", synthetic_sentences(n_eval, seed=2))
    write_conll(d / "eng.testb", synthetic_sentences(n_eval, seed=3), docstart=False)
    return d


def tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the real MiniLM tokenizer (fast, offline)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tunepipe.modeling import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:minilm-l6"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_params(model_dir: Path, **overrides) -> dict:
    """The repository's params.yaml with quick settings for tests, plus dotted-key overrides."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="data/raw/train.csv")
    params["model"]["name"] = str(model_dir)
    params["tokenize"]["max_length"] = 32
    # fp32 pinned: what `auto` picks differs from CPU to CPU, and so would the tiny model's learning curve;
    # tests that need another precision say so (test_stages.py forces each one).
    params["finetune"].update(learning_rate=5e-3, batch_size=16, epochs=2.0, eval_steps=5,
                              early_stopping_patience=50, warmup_ratio=0.0, precision="fp32")
    for key, value in overrides.items():
        node = params
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return params


def clone_repo(dest: Path) -> Path:
    """What a user gets from `git clone` of this repository: the committed tree, nothing untracked or ignored.

    Edits to tracked files not yet committed are applied on top (so a developer's run tests what they are about
    to commit); in CI the working tree is a clean clone and this is exactly `git clone`."""
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: the end-to-end tests start from `git clone`")
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    # Staged changes (deletions included), then unstaged edits to tracked files.
    for staged in (["--cached"], []):
        diff = subprocess.run(["git", "diff", *staged, "--binary"], cwd=REPO, check=True, capture_output=True).stdout
        if diff:
            subprocess.run(["git", "apply", "--index", "--whitespace=nowarn"], cwd=dest, input=diff, check=True)
    return dest


def commit_all(root: Path, message: str = "test setup") -> None:
    """Commit what a test changed in its clone (params, data), as a user would before `dvc repro`."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    sh([*git, "add", "-A"], root)
    sh([*git, "commit", "-qm", message, "--allow-empty"], root)


def sh(cmd: list[str], cwd: Path, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH and no inherited MLflow store, `env` on top (None removes
    a variable); it must succeed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None and k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# ---------------------------------------------------------------------------------------------- DVC queue

QUEUE_STATES = ("Queued", "Running", "Success", "Failed")


def queue_project(base: Path, model_dir: Path) -> Path:
    """A clone of this repository on the tiny settings (90 rows, 1 epoch, robustness and explanations off), its
    baseline `dvc repro` committed: queued experiments reuse its data stages."""
    root = clone_repo(base / "repo")
    write_csv(root / "data/raw/train.csv", synthetic_rows(90))
    params = tiny_params(model_dir, **{"finetune.epochs": 1.0, "robustness.perturbations": [],
                                       "explain.examples_per_class": 0})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root)
    sh(["dvc", "repro"], root)
    commit_all(root, "baseline")
    return root


def queue_rows(root: Path) -> list[list[str]]:
    """`dvc queue status` as rows (Task, Name, Created..., Status): the experiments' lines only."""
    rows = [line.split() for line in sh(["dvc", "queue", "status"], root).stdout.splitlines()]
    return [r for r in rows if r and r[-1] in QUEUE_STATES]


def run_queue(root: Path, jobs: int, timeout: float) -> tuple[list[list[str]], float]:
    """`dvc queue start --jobs N`, then wait until no experiment is queued or running: (the rows, seconds taken).
    No DVC worker or experiment process outlives the call."""
    t0 = time.monotonic()
    try:
        sh(["dvc", "queue", "start", "--jobs", str(jobs)], root)
        while True:
            rows = queue_rows(root)
            if rows and all(r[-1] not in ("Queued", "Running") for r in rows):
                return rows, time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"the queue is not done after {timeout:.0f}s: {rows}"
            time.sleep(1)
    finally:
        stop_queue_workers(root)


def _queue_processes(root: Path) -> list[int]:
    """Live processes DVC recorded for this project's queue (its workers and experiment runs)."""
    pids = []
    for pidfile in (root / ".dvc/tmp").rglob("*.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if "dvc" in cmdline and state not in ("Z", "X"):  # still DVC's process, not a reused pid
                pids.append(pid)
    return pids


def stop_queue_workers(root: Path) -> None:
    """DVC's queue workers stop by themselves 10 s after the queue is empty; `dvc queue stop` asks them now, and
    whatever is still there 30 s later is killed."""
    subprocess.run(["dvc", "queue", "stop"], cwd=root, capture_output=True, timeout=120,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    deadline = time.monotonic() + 30
    while _queue_processes(root) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _queue_processes(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until `url` answers 200; fail with the server's log if it exits or stays silent."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def background(cmd: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """A server process in its own session, output to `log`; the whole group terminated and waited for."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post_json(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "tunepipe_reg") -> Iterator[str]:
    """A new PostgreSQL database with a unique name (its SQLAlchemy URI), dropped afterwards."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="root", dbname="test")
    conn.autocommit = True
    try:
        conn.cursor().execute(f"CREATE DATABASE {name}")
        yield f"{PG}/{name}"
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()
