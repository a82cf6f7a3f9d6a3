"""The `tunepipe` command: predict, and the commands around the pipeline (sweep, promote, models).

Each subcommand lives in its own module with `add_parser(subparsers)`; this file only wires them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tunepipe.errors import UserError, run_main
from tunepipe.paths import EXPORT, EXPORT_META
from tunepipe.tasks import get_task


def load_predictor(model: str, params_file: str):
    """A path to an export directory, or an MLflow model URI (models:/NAME@champion, runs:/...) -> (the task named
    in the model's own metadata, a predict function)."""
    if "://" not in model and ":/" not in model:
        path = Path(model)
        if not (path / EXPORT_META).is_file():
            raise UserError(f"--model: {path} is not an exported model directory (no {EXPORT_META}); "
                            "run `dvc repro` first or pass models:/NAME@champion")
        from tunepipe.serving.pyfunc_model import TextPredictor

        predictor = TextPredictor(path)
        return predictor.task, predictor.predict
    import mlflow

    from tunepipe import tracking
    from tunepipe.params import load_params

    if Path(params_file).is_file():
        tracking.setup(load_params(params_file).tracking)
    try:
        pyfunc = mlflow.pyfunc.load_model(model)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"--model: could not load {model}: {str(exc).splitlines()[0]}") from None

    def predict(texts: list[str]) -> list[dict]:
        return pyfunc.predict(texts).to_dict(orient="records")

    return pyfunc.unwrap_python_model().predictor.task, predict


def cmd_predict(args: argparse.Namespace) -> None:
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("predict: give one or more texts as arguments or on standard input")
    task, predict = load_predictor(args.model, args.params)
    for text, res in zip(texts, predict(texts), strict=True):
        if args.json:
            print(json.dumps({"text": text, **res}, ensure_ascii=False))
        else:
            print(get_task(task).describe_prediction(text, res))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="label texts with an exported or registered model")
    p.add_argument("text", nargs="*", help="texts to label (default: one per line on stdin)")
    p.add_argument("--model", default=str(EXPORT),
                   help="export directory, or an MLflow URI such as models:/NAME@champion (default: models/onnx)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.set_defaults(func=cmd_predict)

    from tunepipe.registry import cli as registry_cli
    from tunepipe.sweep import cli as sweep_cli

    for module in (sweep_cli, registry_cli):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    run_main(lambda: args.func(args))


if __name__ == "__main__":
    main()
