"""PNG plots for reports (DVC renders the CSV/JSON plot data itself)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(loss: list[dict], val: list[dict], metric: str, path: Path) -> None:
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot([r["step"] for r in loss], [r["loss"] for r in loss], color="tab:blue", label="train loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot([r["step"] for r in val], [r[metric] for r in val], "o-", color="tab:orange", label=f"val {metric}")
    ax2.set_ylabel(f"validation {metric}", color="tab:orange")
    ax1.set_title("training curves")
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "confusion matrix") -> None:
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=labels).plot(ax=ax, colorbar=False,
                                                                          xticks_rotation=45)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(rows: list[dict], temperature, path: Path) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, before and after calibration, with the
    diagonal of perfect calibration and the share of predictions per bin below."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    t = f"{temperature:.4g}" if isinstance(temperature, int | float) else "per label"
    for suffix, name, style in (("_uncalibrated", "uncalibrated", "o--"), ("", f"calibrated (T={t})", "s-")):
        pts = [(r[f"confidence{suffix}"], r[f"accuracy{suffix}"]) for r in rows if r[f"count{suffix}"]]
        ax.plot([c for c, _ in pts], [a for _, a in pts], style, label=name)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("reliability (test split)")
    width = 1 / max(len(rows), 1)
    total = max(sum(r["count"] for r in rows), 1)
    hist.bar([r["midpoint"] for r in rows], [r["count"] / total for r in rows], width=width * 0.9,
             color="tab:orange")
    hist.set_xlabel("confidence (calibrated)")
    hist.set_ylabel("share")
    fig.tight_layout()
    _save(fig, path)


def plot_robustness(rows: list[dict], metric: str, path: Path) -> None:
    """Test `metric` on the clean split and on each perturbed copy (rows: perturbation, metric, drop), one bar
    each, labelled with the value and its drop from clean. No rows: a note that the report is off."""
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(rows) + 1.8))
    if not rows:
        ax.text(0.5, 0.5, "robustness report off (robustness.perturbations: [])", ha="center", va="center")
        ax.set_axis_off()
    else:
        names = [r["perturbation"] for r in rows]
        bars = ax.barh(names, [r["metric"] for r in rows],
                       color=["tab:blue" if n == "clean" else "tab:orange" for n in names])
        for bar, r in zip(bars, rows, strict=True):
            drop = "" if r["perturbation"] == "clean" else f" ({-r['drop']:+.4f})"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['metric']:.4f}{drop}", va="center")
        ax.invert_yaxis()  # clean on top
        ax.set_xlim(0, 1.25)
        ax.set_xlabel(f"test {metric}")
    ax.set_title(f"robustness: test {metric} under perturbation")
    fig.tight_layout()
    _save(fig, path)


def plot_learning_curve(rows: list[dict], fit: dict | None, metric: str, caption: str, path: Path) -> None:
    """Test `metric` per point against the labelled examples (log scale), the fitted power law with its bootstrap
    band, and the labels at which it reaches its share of the plateau; the sentence as a caption."""
    import textwrap

    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot([r["n_train"] for r in rows], [r[metric] for r in rows], "o", color="tab:blue", label="points (test)")
    if fit:
        curve = fit["curve"]
        ns = [c["n"] for c in curve]
        ax.plot(ns, [c["metric"] for c in curve], "-", color="tab:orange",
                label=f"{fit['a']:.3f} - {fit['b']:.3g} n^-{fit['c']:.3f}")
        if curve and curve[0]["low"] is not None:
            ax.fill_between(ns, [c["low"] for c in curve], [c["high"] for c in curve], color="tab:orange", alpha=0.2,
                            label="95% bootstrap band")
        ax.axhline(fit["a"], ls=":", color="gray", label="plateau")
        if fit["n95"] is not None and fit["n95"] <= ns[-1]:
            ax.axvline(fit["n95"], ls="--", color="tab:green", label=f"{fit['share']:.0%} of plateau")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("learning curve")
    ax.legend(loc="lower right", fontsize="small")
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, 110)), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
