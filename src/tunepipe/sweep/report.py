"""Reports: summary.json, best_params.yaml and plots in reports/sweep, and their copy in the MLflow run."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import optuna
import yaml as pyyaml
from optuna.trial import FrozenTrial, TrialState

from tunepipe.files import write_json, write_text
from tunepipe.paths import SWEEP_REPORTS
from tunepipe.sweep.study import ERROR_ATTR, FINISHED, OPTIONAL, TUNED, trial_counts

# ---- reports ----

def write_reports(study: optuna.Study, summary: dict, out_dir: Path = SWEEP_REPORTS) -> dict:
    """best_params.yaml, summary.json and plots (PNG via matplotlib, interactive HTML via plotly)."""
    counts = trial_counts(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = {**summary, "trials": counts,
               "best": {"value": best.value, "trial": best.number, "params": best.params} if best else None,
               # Trials whose training raised, with why (a worker that died leaves no error: its trial is retried).
               "failures": [{"trial": t.number, "params": t.params, "error": t.user_attrs[ERROR_ATTR]}
                            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                            if ERROR_ATTR in t.user_attrs],
               "trial_epochs": round(sum(t.user_attrs.get("epochs_run", 0.0) for t in trials), 3),
               "study_elapsed_s": _elapsed(trials)}
    out_dir.mkdir(parents=True, exist_ok=True)
    best_file = out_dir / "best_params.yaml"
    if best:
        header = (f"# Best trial {best.number} of study '{study.study_name}': validation {summary['metric']} "
                  f"{best.value:.4f}.\n# `tunepipe sweep apply` writes these into params.yaml.\n")
        values = {k: best.params[k] for k in (*TUNED, *OPTIONAL) if k in best.params}
        write_text(best_file, header + pyyaml.safe_dump({"finetune": values}, sort_keys=False))
    else:
        best_file.unlink(missing_ok=True)
    summary["param_importances"] = None
    if len(complete) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary["param_importances"] = {k: round(v, 4) for k, v in
                                            optuna.importance.get_param_importances(study).items()}
    summary["plots"] = write_plots(study, out_dir, len(complete))
    write_json(out_dir / "summary.json", summary)
    return summary


PLOTS = {"optimization_history": 1, "intermediate_values": 1, "parallel_coordinate": 1, "param_importances": 2}


def write_plots(study: optuna.Study, out_dir: Path, n_complete: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    written = []
    for name, needs in PLOTS.items():
        png, html = out_dir / f"{name}.png", out_dir / f"{name}.html"
        if n_complete < needs:
            png.unlink(missing_ok=True)
            html.unlink(missing_ok=True)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = getattr(vis_mpl, f"plot_{name}")(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            _atomic(png, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
            plt.close(fig)
            # plotly.min.js is written once beside the pages, so they open offline.
            page = getattr(vis, f"plot_{name}")(study)
            _atomic(html, lambda tmp, page=page: page.write_html(tmp, include_plotlyjs="directory", full_html=True))
        written += [png.name, html.name]
    return written


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _elapsed(trials: list[FrozenTrial]) -> float | None:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None


def _log_summary(client, run_id: str, summary: dict, out_dir: Path) -> None:
    import mlflow

    now, c = int(time.time() * 1000), summary["trials"]
    metrics = {"trials_complete": c["complete"], "trials_pruned": c["pruned"], "trials_failed": c["fail"],
               "trials_run": summary["invocation"]["trials_run"], "trial_epochs": summary["trial_epochs"],
               "wall_time_s": summary["invocation"]["wall_time_s"]}
    if summary["best"]:
        metrics[f"best_val_{summary['metric']}"] = summary["best"]["value"]
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for name in ("summary.json", "best_params.yaml", *(f for f in summary["plots"] if f.endswith(".png"))):
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name), "sweep")
