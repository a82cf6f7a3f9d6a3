"""`promote` and `rollback`: the two operations that move the champion alias (decided unlocked, moved locked)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams
from tunepipe.paths import TEST_SPLIT
from tunepipe.registry.decision import ROBUST_DROP, Outcome, decide
from tunepipe.registry.evidence import evidence
from tunepipe.registry.locks import LOCK_TIMEOUT_S, promote_lock
from tunepipe.registry.store import (
    ALIAS,
    champion,
    champion_number,
    get_version,
    incomplete,
    list_versions,
    missing_tags,
    move_alias,
    now,
    record,
    require_model,
    who,
)
from tunepipe.tasks import get_task

ATTEMPTS = 3


# ---------------------------------------------------------------------------------------------- commands

def promote(client, name: str, s: PromoteParams, version: int | None = None, reevaluate: bool = False,
            dry_run: bool = False, test_path: Path = TEST_SPLIT, lock_timeout: float = LOCK_TIMEOUT_S) -> Outcome:
    require_model(client, name)
    if version is not None:
        cand = get_version(client, name, version)
        if missing_tags(cand):
            raise UserError(f"--version: {incomplete(name, cand)}; nothing was changed")
    else:
        versions = list_versions(client, name)
        if not versions:
            raise UserError(f"{name} has no versions yet; run `dvc repro` to register one")
        # The newest completely registered version; newer half-registered ones are named and passed over.
        complete = [v for v in versions if not missing_tags(v)]
        for v in versions:
            if missing_tags(v) and (not complete or v.number > complete[-1].number):
                print(f"promote: skipping {incomplete(name, v)}", file=sys.stderr, flush=True)
        if not complete:
            raise UserError(f"{name} has no completely registered version; run `dvc repro` to register one")
        cand = complete[-1]
        if cand.tags.get("champion.rolled_back_at"):
            raise UserError(f"{name} version {cand.number}, the newest, was rolled back from champion at "
                            f"{cand.tags['champion.rolled_back_at']}; pass --version {cand.number} to try it again")
    if s.metric is None:  # params.yaml's null is resolved by Params; settings built in code get the same rule
        s = s.model_copy(update={"metric": get_task(cand.tags.get("task") or "classification").headline_metric})
    for _ in range(ATTEMPTS):
        champ = champion(client, name)
        if champ is not None and champ.number == cand.number:
            return Outcome(name, cand, champ, s.metric, cand.metric(s.metric), cand.metric(s.metric), None, None,
                           cand.tags.get("test_data_hash"), False, False, "is already the champion",
                           already_champion=True)
        ev = evidence(client, name, s, cand, champ, reevaluate, test_path)
        ok, reason = decide(s, ev["candidate"], ev["champion"], ev["same_data"], ev["p_value"],
                            cand.metric(ROBUST_DROP))  # as recorded at registration, also with --reevaluate
        outcome = Outcome(name, cand, champ, s.metric, ev["candidate"], ev["champion"], ev["p_value"],
                          s.test if ev["p_value"] is not None else None, ev["test_data_hash"], ev["reevaluated"],
                          ok, reason)
        if dry_run:
            return outcome
        if ok:
            with promote_lock(client, name, lock_timeout):
                if champion_number(client, name) != (champ.number if champ else None):
                    continue  # another promotion or rollback moved it meanwhile: judge against the new champion
                move_alias(client, outcome)
        record(client, outcome)
        return outcome
    raise UserError(f"promote: the champion of {name} kept changing while this promotion was deciding; "
                    "nothing was changed, run it again")


def rollback(client, name: str, dry_run: bool = False, lock_timeout: float = LOCK_TIMEOUT_S) -> tuple[int, int]:
    """Move the champion back to the one it replaced; returns (from, to)."""
    require_model(client, name)
    with contextlib.nullcontext() if dry_run else promote_lock(client, name, lock_timeout):
        champ = champion(client, name)
        if champ is None:
            raise UserError(f"{name} has no champion to roll back")
        prev = champ.tags.get("champion.previous", "")
        if not prev:
            raise UserError(f"{name} version {champ.number} has no previous champion recorded; nothing to roll "
                            "back to (promote another version with `tunepipe promote --version N` instead)")
        target = get_version(client, name, int(prev))
        if not dry_run:
            client.set_registered_model_alias(name, ALIAS, str(target.number))
    if not dry_run:
        at = now()
        client.set_model_version_tag(name, str(champ.number), "champion.rolled_back_at", at)
        client.set_model_version_tag(name, str(champ.number), "champion.rolled_back_by", who())
        client.set_model_version_tag(name, str(target.number), "champion.since", at)
    return champ.number, target.number
