"""The lock that serialises alias moves: a file lock, a PostgreSQL advisory lock, or a registry lock entry."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.registry.store import who

LOCK_TIMEOUT_S = 300.0
# A registry lock entry whose content has not changed for this long (the waiter's clock) is a dead holder's.
STALE_REGISTRY_LOCK_S = 120.0


# ---------------------------------------------------------------------------------------------- locking

def _wait_for(try_acquire: Callable[[], bool], timeout: float, what: str) -> None:
    deadline, told = time.monotonic() + timeout, False
    while not try_acquire():
        if time.monotonic() > deadline:
            raise UserError(f"promote: gave up after {timeout:.0f}s waiting for {what}; nothing was changed")
        if not told:
            print(f"promote: waiting for another promotion to finish ({what})", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.2)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)

    def try_acquire() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    try:
        _wait_for(try_acquire, timeout, f"lock file {path}")
        yield
    finally:
        os.close(fd)  # releases the flock; the OS does the same if the process dies


@contextlib.contextmanager
def _pg_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    import psycopg2

    key = int.from_bytes(hashlib.sha256(f"tunepipe.promote:{name}".encode()).digest()[:8], "big", signed=True)
    scheme, rest = uri.split("://", 1)
    conn = psycopg2.connect(f"{scheme.split('+', 1)[0]}://{rest}")  # libpq URI: drop SQLAlchemy's +driver
    conn.autocommit = True
    try:  # the lock lives as long as this session, so a process that dies releases it
        with conn.cursor() as cur:
            def try_acquire() -> bool:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                return bool(cur.fetchone()[0])

            _wait_for(try_acquire, timeout, f"PostgreSQL advisory lock {key}")
            try:
                yield
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()


@contextlib.contextmanager
def _registry_lock(client, name: str, timeout: float) -> Iterator[None]:
    """A registered model `<name>.promote-lock` exists while a promotion holds the lock (create is atomic).

    No clocks are compared across machines: the holder bumps a `heartbeat` tag while it holds the lock, and a
    waiter calls the entry stale only once its content (owner token, heartbeat) has stayed the same for
    STALE_REGISTRY_LOCK_S on the waiter's own monotonic clock. Release deletes the entry only if it still
    carries this holder's token."""
    import mlflow

    lock = f"{name}.promote-lock"
    token = uuid.uuid4().hex
    seen: dict[str, object] = {"content": None, "since": 0.0}

    def try_acquire() -> bool:
        try:
            client.create_registered_model(lock, tags={"holder": who(), "token": token, "heartbeat": "0"},
                                           description="tunepipe promote lock; removed when the promotion ends")
            return True
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            tags = client.get_registered_model(lock).tags or {}
            content = (tags.get("token"), tags.get("heartbeat"))
            if content != seen["content"]:  # a new holder, or a live one's heartbeat: start counting again
                seen.update(content=content, since=time.monotonic())
            elif time.monotonic() - seen["since"] > STALE_REGISTRY_LOCK_S:
                # A holder that died leaves the entry behind. (Two waiters breaking the same stale entry at once
                # could both get in: rare, and the alias re-check under the lock keeps a loser from moving it.)
                _delete_if_owned(client, lock, content[0])
        return False

    _wait_for(try_acquire, timeout, f"registry lock {lock!r}")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(client, lock, token, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        _delete_if_owned(client, lock, token)


def _heartbeat(client, lock: str, token: str, stop: threading.Event) -> None:
    """Change the entry's content well within STALE_REGISTRY_LOCK_S, so waiters see the holder alive."""
    import mlflow

    n = 0
    while not stop.wait(STALE_REGISTRY_LOCK_S / 4):
        n += 1
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            if (client.get_registered_model(lock).tags or {}).get("token") != token:
                return  # broken by a waiter (we looked dead): never keep another holder's entry alive
            client.set_registered_model_tag(lock, "heartbeat", str(n))


def _delete_if_owned(client, lock: str, token: str | None) -> None:
    """Delete the lock entry only if it carries `token` (release by its holder, or a break of the stale entry
    the waiter watched); read-then-delete is not atomic, but the window is one request wide."""
    import mlflow

    with contextlib.suppress(mlflow.exceptions.MlflowException):
        if (client.get_registered_model(lock).tags or {}).get("token") == token:
            client.delete_registered_model(lock)


def promote_lock(client, name: str, timeout: float = LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager:
    """The lock that serialises alias moves for `name`, chosen by the registry store's kind."""
    import mlflow

    uri = mlflow.get_registry_uri()
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    if scheme == "sqlite":
        db = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return _file_lock(Path(db + ".promote.lock"), timeout) if db else contextlib.nullcontext()
    if scheme in ("", "file"):
        root = Path(uri.removeprefix("file://") if scheme else uri)
        return _file_lock(root / ".promote.lock", timeout)
    if scheme in ("postgresql", "postgres"):
        return _pg_lock(uri, name, timeout)
    return _registry_lock(client, name, timeout)
