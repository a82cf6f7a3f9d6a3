"""`tunepipe promote` and `tunepipe models`: the decision and the versions as the user reads them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.params import PromoteParams
from tunepipe.paths import TEST_SPLIT
from tunepipe.registry.decision import Outcome, Version
from tunepipe.registry.promotion import promote, rollback
from tunepipe.registry.store import registry_errors, require_model, version_rows

# ---------------------------------------------------------------------------------------------- output

def describe(o: Outcome, s: PromoteParams) -> str:
    """The decision as the user reads it: both versions, the numbers, the rule applied, the verdict."""

    def line(role: str, v: Version | None, value: float | None) -> str:
        if v is None:
            return f"  {role:<9}  (none)"
        t, shown = v.tags, "?" if value is None else f"{value:.4f}"
        return (f"  {role:<9}  v{v.number}: {o.metric} {shown}  test data {t.get('test_data_hash', '?')[:12]}  "
                f"git {t.get('git_commit', '?')[:12]}  run {(v.run_id or '?')[:12]}")

    rule = f"min_delta {s.min_delta:g}" + (f", {s.test} significance {s.significance:g}" if s.significance else "")
    out = [f"promote {o.name}: {o.metric}, {rule}" + (" (re-evaluated on the current test split)"
                                                      if o.reevaluated else ""),
           line("candidate", o.candidate, o.candidate_value)]
    if not o.already_champion:
        out.append(line("champion", o.champion, o.champion_value))
    if o.delta is not None and not o.already_champion:
        out.append(f"  delta {o.delta:+.4f}" + (f", {o.test} p={o.p_value:.4g}" if o.p_value is not None else ""))
    was = f"v{o.champion.number}" if o.champion else "none"
    if o.already_champion:
        out.append(f"no change: v{o.candidate.number} {o.reason}")
    elif o.promote:
        out.append(f"PROMOTE: {o.reason}; champion {was} -> v{o.candidate.number}")
    else:
        out.append(f"REFUSE: {o.reason}; champion stays {was}")
    return "\n".join(out)


def format_table(rows: list[dict], metric: str) -> str:
    cols = [metric] + [m for m in ("accuracy",) if m != metric]
    head = ["version", "aliases", *cols, "test data", "data", "git commit", "created (UTC)", "promotion"]
    body = [[str(r["version"]), ",".join(r["aliases"]) or "-",
             *(f"{r['metrics'][c]:.4f}" if r["metrics"].get(c) is not None else "-" for c in cols),
             (r["test_data_hash"] or "-")[:12], (r["data_hash"] or "-")[:12], (r["git_commit"] or "-")[:12],
             r["created"][:16].replace("T", " "), r["promote"] or "-"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])


def format_lineage(row: dict, name: str) -> str:
    """Everything needed to reproduce a version: its commit, its params (as a params.yaml) and the commands."""
    import yaml

    commit = row["git_commit"] or "unknown"
    lines = [f"{name} version {row['version']}  aliases: {','.join(row['aliases']) or '-'}  created {row['created']}",
             f"  git commit      {commit}" + ("  (the working tree had uncommitted changes)"
                                            if commit.endswith("-dirty") else ""),
             f"  MLflow run      {row['run_id']}",
             f"  data hash       {row['data_hash']}",
             f"  test data hash  {row['test_data_hash']}",
             "  metrics         " + ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items() if v is not None)]
    if row["params"] is not None:
        lines += ["", "# params.yaml that produced it:",
                  yaml.safe_dump(row["params"], sort_keys=False).rstrip(),
                  "", "# reproduce:",
                  f"#   git checkout {commit.removesuffix('-dirty')}",
                  f"#   tunepipe models --version {row['version']} --params-yaml > params.yaml",
                  "#   dvc repro"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- commands

def _client(params_file: str):
    """Point MLflow at the configured store without creating anything there."""
    import mlflow

    from tunepipe import tracking
    from tunepipe.params import load_params

    p = load_params(params_file)
    # A CLI should say "unreachable" in seconds, not retry for minutes (explicit settings still win).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    uri = tracking.tracking_uri(p.tracking)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).is_file():
        raise UserError(f"tracking.uri: no MLflow registry at {uri.removeprefix('sqlite:///')}; run `dvc repro` "
                        "first (its export stage registers the model) or point tracking.uri at your store")
    try:
        mlflow.set_tracking_uri(tracking.check_reachable(p.tracking))
    except UserError as exc:  # said like the registry's other errors
        raise UserError(f"{exc}; nothing was changed") from None
    with registry_errors("cannot open the MLflow registry"):  # a database store connects right here
        return mlflow.MlflowClient(), p


def cmd_promote(args: argparse.Namespace) -> None:
    if args.rollback and (args.version is not None or args.reevaluate):
        raise UserError("promote --rollback takes no --version/--reevaluate: it returns to the recorded previous "
                        "champion (use `tunepipe promote --version N` to pick one)")
    client, p = _client(args.params)
    name = p.tracking.model_name
    with registry_errors(f"promote {name}"):
        if args.rollback:
            old, new = rollback(client, name, dry_run=args.dry_run)
            print(f"rollback {name}: champion v{old} -> v{new}" + (" (dry run: nothing changed)"
                                                                 if args.dry_run else ""))
            return
        outcome = promote(client, name, p.promote, args.version, args.reevaluate, args.dry_run)
    print(describe(outcome, p.promote))
    if args.dry_run:
        print("(dry run: nothing changed)")
    if not outcome.promote and not outcome.already_champion:
        sys.exit(1)  # scripts can tell "refused" (1) from "promoted" (0) and errors (2)


def cmd_models(args: argparse.Namespace) -> None:
    client, p = _client(args.params)
    name = p.tracking.model_name
    with registry_errors(f"models {name}"):
        require_model(client, name)
        rows = version_rows(client, name, p.promote.metric)
    if args.version is not None:
        rows = [r for r in rows if r["version"] == args.version]
        if not rows:
            raise UserError(f"--version: {name} has no version {args.version}; see `tunepipe models`")
    if args.params_yaml:
        if args.version is None or rows[0]["params"] is None:
            raise UserError("--params-yaml needs --version N of a version registered by `dvc repro` (params tag)")
        import yaml

        print(yaml.safe_dump(rows[0]["params"], sort_keys=False), end="")
    elif args.json:
        for r in rows:
            print(json.dumps({"name": name, **r}, sort_keys=True))
    elif args.version is not None:
        print(format_lineage(rows[0], name))
    else:
        print(format_table(rows, p.promote.metric) if rows else f"{name}: no versions")


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=int, help="one version in detail: lineage (git commit, params, run)")
    parser.add_argument("--json", action="store_true", help="one JSON object per version")
    parser.add_argument("--params-yaml", action="store_true",
                        help="with --version: print the params.yaml that produced it (to reproduce it)")
    parser.set_defaults(func=cmd_models)


def add_parser(sub) -> None:
    p = sub.add_parser("promote", help="move the registry's champion alias to a better version (or roll back)",
                       description="Compare the newest (or --version N) registered version with the champion on "
                                   "promote.metric; move the alias only for a real improvement. Exit 0 promoted "
                                   "(or nothing to do), 1 refused, 2 error.")
    p.add_argument("--version", type=int, help="candidate version (default: the newest)")
    p.add_argument("--reevaluate", action="store_true",
                   help=f"score both versions on the current {TEST_SPLIT} instead of their recorded metrics")
    p.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    p.add_argument("--rollback", action="store_true", help="move champion back to the champion it replaced")
    p.set_defaults(func=cmd_promote)

    _models_arguments(sub.add_parser("models", help="list registered versions: metrics, data hash, commit, aliases"))
    reg = sub.add_parser("registry", help="registry commands (`registry list` = `models`)")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    _models_arguments(reg_sub.add_parser("list", help="list registered versions (same as `tunepipe models`)"))
