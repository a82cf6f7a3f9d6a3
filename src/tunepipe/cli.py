"""The `tunepipe` command: predict, and the commands around the pipeline (sweep, promote, models, suggest).

Each subcommand lives in its own module with `add_parser(subparsers)`; this file only wires them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tunepipe.errors import UserError, run_main
from tunepipe.paths import EXPORT, EXPORT_META, MODEL, TRAINING_INFO
from tunepipe.tasks import get_task


def load_predictor(model: str, params_file: str, explain: dict | None = None):
    """A path to an export directory, or an MLflow model URI (models:/NAME@champion, runs:/...) -> (the task named
    in the model's own metadata, a predict function). explain: {"label": L or None}: each result also gets its
    word attributions (serving/pyfunc_model.py's with_explanations, as the served {"explain": true})."""
    if "://" not in model and ":/" not in model:
        path = Path(model)
        if not (path / EXPORT_META).is_file():
            raise UserError(f"--model: {path} is not an exported model directory (no {EXPORT_META}); "
                            "run `dvc repro` first or pass models:/NAME@champion")
        from tunepipe.serving.pyfunc_model import TextPredictor, load_explainer, with_explanations

        try:
            predictor = TextPredictor(path)
        except ValueError as exc:  # e.g. an export made before its task's output code travelled with it
            raise UserError(f"--model: {exc}") from None
        if explain is None:
            return predictor.task, within_limits(predictor, predictor.predict)
        get_task(predictor.task).check_explainable("--explain")
        try:
            explainer = load_explainer(predictor.meta, trained_model_beside(path, predictor.meta))
        except ValueError as exc:
            raise UserError(f"--explain: {str(exc).removeprefix('explain: ')}") from None
        check_label(explain["label"], predictor.labels)
        return predictor.task, within_limits(predictor, lambda texts: with_explanations(
            predictor.predict(texts), texts, explainer, explain["label"]))
    import mlflow

    from tunepipe import tracking
    from tunepipe.params import load_params

    if Path(params_file).is_file():
        tracking.setup(load_params(params_file).tracking)
    try:
        pyfunc = mlflow.pyfunc.load_model(model)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"--model: could not load {model}: {str(exc).splitlines()[0]}") from None

    predictor = pyfunc.unwrap_python_model().predictor
    params = None
    if explain is not None:
        get_task(predictor.task).check_explainable("--explain")
        check_label(explain["label"], predictor.labels)
        params = {"explain": True, "explain_label": explain["label"] or ""}

    def predict(texts: list[str]) -> list[dict]:
        try:
            return pyfunc.predict(texts, params=params).to_dict(orient="records")
        except ValueError as exc:  # the served model's own message (e.g. a version registered before explanations)
            raise UserError(f"--explain: {str(exc).removeprefix('explain: ')}") from None

    return predictor.task, within_limits(predictor, predict)


def within_limits(predictor, predict):
    """`predict`, refusing texts over the model's request-size limits (serve.*, stored with it at export) as the
    served model does, before any work."""

    def checked(texts: list[str]) -> list[dict]:
        try:
            predictor.check_request(texts)
        # Its RequestTooLarge (a ValueError): a registered model's code is its own module, with its own class.
        except ValueError as exc:
            raise UserError(f"predict: {str(exc).replace('in one request', 'at once')}; or raise the limit in "
                            "params.yaml and export again (`dvc repro export`)") from None
        return predict(texts)

    checked.max_texts = predictor.meta.get("max_texts_per_request")  # callers with many texts send them in parts
    # The graph export chose to serve (int8 or fp32); a model exported before that choice serves model.onnx.
    checked.served = getattr(predictor, "served_file", "model.onnx")
    return checked


def trained_model_beside(export: Path, meta: dict) -> Path:
    """An export directory holds ONNX only: explanations run the fine-tuned PyTorch model, models/model beside
    it (models/onnx -> models/model), which must be the model that was exported there."""
    trained = export.parent / MODEL.name
    if not (trained / TRAINING_INFO).is_file():
        raise UserError(f"--explain: {export} holds no PyTorch model and {trained} has none either; run "
                        "`dvc repro` (or `dvc pull models/model`), or pass --model models:/NAME@champion")
    from tunepipe.files import read_json

    fingerprint = read_json(trained / TRAINING_INFO).get("fingerprint")
    if meta.get("model_fingerprint") not in (None, fingerprint):
        raise UserError(f"--explain: {trained} is not the model exported in {export} (trained since); run "
                        "`dvc repro export`, or pass --model models:/NAME@champion")
    return trained


def check_label(label: str | None, labels: list[str]) -> None:
    if label is not None and label not in labels:
        raise UserError(f"--label: unknown label {label!r} (labels: {', '.join(labels)})")


def cmd_predict(args: argparse.Namespace) -> None:
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("predict: give one or more texts as arguments or on standard input")
    if (args.label or args.html) and not args.explain:
        raise UserError("predict: --label and --html go with --explain")
    task, predict = load_predictor(args.model, args.params, {"label": args.label} if args.explain else None)
    print(f"predict: {args.model} serves {predict.served}", file=sys.stderr)
    results = predict(texts)
    color = sys.stdout.isatty()
    for text, res in zip(texts, results, strict=True):
        if args.json:
            print(json.dumps({"text": text, **res}, ensure_ascii=False))
            continue
        print(get_task(task).describe_prediction(text, res))
        if args.explain:
            from tunepipe.serving.explain import format_words

            print(f"  why {res['explained_label']}: {format_words(res['attributions'], color)}  "
                  f"(convergence delta {res['convergence_delta']:+.2g})")
    if args.html:
        from tunepipe.files import write_text
        from tunepipe.serving.explain import html_page

        write_text(args.html, html_page("tunepipe predict --explain", [("Explanations", [
            {"text": text, **res} for text, res in zip(texts, results, strict=True)])]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="label texts with an exported or registered model")
    p.add_argument("text", nargs="*", help="texts to label (default: one per line on stdin)")
    p.add_argument("--model", default=str(EXPORT),
                   help="export directory, or an MLflow URI such as models:/NAME@champion (default: models/onnx)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.add_argument("--explain", action="store_true",
                   help="also the words' attributions (integrated gradients) to the predicted label")
    p.add_argument("--label", help="--explain: explain this label instead of the predicted one")
    p.add_argument("--html", metavar="FILE", help="--explain: also write a highlighted HTML page")
    p.set_defaults(func=cmd_predict)

    from tunepipe import suggest
    from tunepipe.learning_curve import cli as learning_curve_cli
    from tunepipe.registry import cli as registry_cli
    from tunepipe.sweep import cli as sweep_cli

    for module in (sweep_cli, learning_curve_cli, registry_cli, suggest):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    run_main(lambda: args.func(args))


if __name__ == "__main__":
    main()
