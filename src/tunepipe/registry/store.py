"""Registry reads and writes: versions, the champion alias, and the decision recorded as version tags."""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import socket
from collections.abc import Iterator

from tunepipe.errors import UserError, masked
from tunepipe.registry.decision import Outcome, Version

ALIAS = "champion"
# Tags every version registered by the export stage carries from its creation; one lacking any was registered
# some other way, or by an older export that died between registering and tagging.
REQUIRED_TAGS = ("run_id", "task", "test_data_hash", "metrics")


# ---------------------------------------------------------------------------------------------- registry reads

def _version(mv) -> Version:
    return Version(number=int(mv.version), tags=dict(mv.tags or {}), run_id=(mv.tags or {}).get("run_id") or mv.run_id,
                   created_ms=int(mv.creation_timestamp or 0))


def mlflow_error(what: str, exc: Exception) -> UserError:
    import mlflow

    first = masked((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    return UserError(f"{what} (registry {masked(mlflow.get_registry_uri())}): {first[:300]}; nothing was changed")


@contextlib.contextmanager
def registry_errors(what: str) -> Iterator[None]:
    """Unreachable stores and failed requests become one-line UserErrors."""
    import mlflow

    try:
        yield
    except UserError:
        raise
    except mlflow.exceptions.MlflowException as exc:
        raise mlflow_error(what, exc) from None
    except (OSError, ConnectionError) as exc:
        raise mlflow_error(what, exc) from None
    except Exception as exc:  # sqlalchemy/requests errors do not share a base class with the above
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3", "psycopg2"):
            raise mlflow_error(what, exc) from None
        raise


def require_model(client, name: str) -> None:
    import mlflow

    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"tracking.model_name: no registered model {name!r} in "
                            f"{masked(mlflow.get_registry_uri())}; run `dvc repro` (its export stage registers it) "
                            "or fix the name") from None
        raise


def missing_tags(v: Version) -> list[str]:
    return [k for k in REQUIRED_TAGS if not v.tags.get(k)]


def incomplete(name: str, v: Version) -> str:
    return (f"{name} version {v.number} lacks the tags `dvc repro` registers a model with "
            f"({', '.join(missing_tags(v))}); run `dvc repro` to register the export completely (delete "
            f"version {v.number} in the MLflow UI if it stays unused)")


def list_versions(client, name: str) -> list[Version]:
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        out.extend(_version(mv) for mv in page)
        token = page.token
        if not token:
            return sorted(out, key=lambda v: v.number)


def get_version(client, name: str, number: int) -> Version:
    import mlflow

    try:
        return _version(client.get_model_version(name, str(number)))
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"--version: {name} has no version {number}; see `tunepipe models`") from None
        raise


def champion_number(client, name: str) -> int | None:
    aliases = client.get_registered_model(name).aliases or {}
    return int(aliases[ALIAS]) if ALIAS in aliases else None


def champion(client, name: str) -> Version | None:
    number = champion_number(client, name)
    return get_version(client, name, number) if number is not None else None


def aliases_by_version(client, name: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias, v in (client.get_registered_model(name).aliases or {}).items():
        out.setdefault(int(v), []).append(alias)
    return out


def version_rows(client, name: str, metric: str) -> list[dict]:
    """One plain dict per version, newest first: what `tunepipe models` shows."""
    aliases = aliases_by_version(client, name)
    rows = []
    for v in reversed(list_versions(client, name)):
        t = v.tags
        rows.append({
            "version": v.number,
            "aliases": aliases.get(v.number, []),
            "created": datetime.datetime.fromtimestamp(v.created_ms / 1000, datetime.timezone.utc)
            .isoformat(timespec="seconds"),
            "metrics": {m: v.metric(m) for m in v.metric_names()},
            "test_data_hash": t.get("test_data_hash"),
            "data_hash": t.get("data_hash"),
            "git_commit": t.get("git_commit"),
            "run_id": v.run_id,
            "promote": "rolled back" if t.get("champion.rolled_back_at") else t.get("promote.decision"),
            # masked again on the way out: versions registered before params were masked carry the raw URI
            "params": json.loads(masked(t["params"])) if t.get("params") else None,
        })
    return rows


# ---------------------------------------------------------------------------------------------- writes

def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fmt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def move_alias(client, o: Outcome) -> None:
    """The one step that changes the champion (under the lock); the previous one is noted first for rollback."""
    cand = str(o.candidate.number)
    client.set_model_version_tag(o.name, cand, "champion.previous", str(o.champion.number) if o.champion else "")
    client.set_registered_model_alias(o.name, ALIAS, cand)


def record(client, o: Outcome) -> None:
    """The decision as tags on the versions (audit trail, written after the lock is released)."""
    name, cand, at = o.name, str(o.candidate.number), now()
    tags = {
        "promote.decision": "promoted" if o.promote else "refused",
        "promote.reason": o.reason,
        "promote.at": at,
        "promote.by": who(),
        "promote.metric": o.metric,
        "promote.candidate_value": _fmt(o.candidate_value),
        "promote.champion_version": str(o.champion.number) if o.champion else "",
        "promote.champion_value": _fmt(o.champion_value),
        "promote.p_value": _fmt(o.p_value),
        "promote.test": o.test or "",
        "promote.test_data_hash": o.test_data_hash or "",
        "promote.reevaluated": str(o.reevaluated).lower(),
    }
    if o.promote:
        tags["champion.since"] = at
        if o.champion is not None:
            client.set_model_version_tag(name, str(o.champion.number), "champion.replaced_by", cand)
            client.set_model_version_tag(name, str(o.champion.number), "champion.until", at)
        if "champion.rolled_back_at" in o.candidate.tags:  # set by a rollback; an explicit re-promotion clears it
            client.delete_model_version_tag(name, cand, "champion.rolled_back_at")
    for key, value in tags.items():
        # Empty values are skipped, except where "none" is information (a first champion has no previous).
        if value or key == "promote.champion_version" and o.promote:
            client.set_model_version_tag(name, cand, key, value)
