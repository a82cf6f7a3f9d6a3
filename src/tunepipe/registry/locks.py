"""The lock that serialises alias moves: a file lock, a PostgreSQL advisory lock, or a registry lock entry."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.registry.store import who

LOCK_TIMEOUT_S = 300.0
STALE_REGISTRY_LOCK_S = 120.0  # the locked section only re-reads and moves the alias: seconds, not minutes


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
    """A registered model `<name>.promote-lock` exists while a promotion holds the lock (create is atomic)."""
    import mlflow

    lock = f"{name}.promote-lock"

    def try_acquire() -> bool:
        try:
            client.create_registered_model(lock, tags={"holder": who()},
                                           description="tunepipe promote lock; removed when the promotion ends")
            return True
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            held = client.get_registered_model(lock)
            # A holder that died leaves the entry behind; the locked section is short, so old means stale.
            # (Two waiters breaking the same stale entry at once could both get in: rare, and the alias
            # re-check under the lock still keeps a loser from being moved in.)
            if time.time() - held.creation_timestamp / 1000 > STALE_REGISTRY_LOCK_S:
                client.delete_registered_model(lock)
        return False

    _wait_for(try_acquire, timeout, f"registry lock {lock!r}")
    try:
        yield
    finally:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
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
