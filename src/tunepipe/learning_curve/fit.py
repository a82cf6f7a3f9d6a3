"""The saturating power law metric(n) = a - b * n^(-c) fitted to learning-curve points (scipy's curve_fit), its
bootstrap band, and what it says: the labels at which the curve reaches a share of its plateau, and what doubling
the data is expected to add."""

from __future__ import annotations

import math
import warnings

import numpy as np

# Three parameters: fewer distinct training sizes cannot pin the curve down.
MIN_SIZES = 3
# Starting exponents tried; the fit with the smallest squared error is kept (curve_fit finds a local minimum).
START_C = (0.2, 0.5, 1.0)
# The labels for a share of the plateau are only reported up to this multiple of the largest size measured.
FAR = 10
# Where the fitted curve misses the measured mean at the largest size by more than this, the sentence gives both:
# a power law cannot follow a recipe that barely trains the smallest subsets and then levels off quickly, and the
# figure a reader acts on is the measured one (on the default corpus the fit said 0.802 where 0.781 was measured).
MISFIT = 0.005


class TooFewPoints(ValueError):
    """Fewer than MIN_SIZES distinct training sizes among the finished points."""


def power_law(n, a: float, b: float, c: float):
    return a - b * np.power(np.asarray(n, dtype=float), -c)


def fit_power_law(n, y, upper: float | None = 1.0) -> tuple[float, float, float]:
    """(a, b, c) by least squares. `upper` bounds the plateau a (1.0 for a score in [0, 1]; None: unbounded).

    The fit runs on n / max(n), so b stays of the order of the metric whatever the sizes; b is converted back."""
    from scipy.optimize import curve_fit

    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(n)) < MIN_SIZES:
        raise TooFewPoints(f"{len(np.unique(n))} distinct training size(s); the fit needs at least {MIN_SIZES}")
    scale = n.max()
    x = n / scale
    top = math.inf if upper is None else upper
    best, best_sse = None, math.inf
    for c0 in START_C:
        a0 = min(y.max() + 0.1 * (y.max() - y.min()) + 1e-3, top - 1e-9)
        b0 = max((a0 - y.min()) * x.min() ** c0, 1e-6)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # OptimizeWarning: covariance not estimable (as many points as params)
                params, _ = curve_fit(power_law, x, y, p0=(a0, b0, c0), method="trf", maxfev=20000,
                                      bounds=([-math.inf, 0.0, 1e-3], [top, math.inf, 10.0]))
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((power_law(x, *params) - y) ** 2))
        if sse < best_sse:
            best, best_sse = params, sse
    if best is None:
        raise RuntimeError("the power law did not converge on these points")
    a, b_scaled, c = (float(v) for v in best)
    return a, b_scaled * scale**c, c


def labels_for_share(a: float, b: float, c: float, share: float) -> float | None:
    """n where a - b n^-c = share * a; None where the fit has no rise (b ~ 0) or no positive plateau."""
    if a <= 0 or b <= 1e-12:
        return None
    return float((b / ((1 - share) * a)) ** (1 / c))


def summarize(n, y, share: float, resamples: int, seed: int = 0, upper: float | None = 1.0) -> dict:
    """The fit, the labels for `share` of the plateau, the gain from doubling the largest size, and 95% percentile
    bands for each (and for the curve on a grid) from refits on bootstrap resamples of the points."""
    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    a, b, c = fit_power_law(n, y, upper)
    largest = float(n.max())
    grid = np.unique(np.geomspace(n.min(), 2 * largest, 60))
    point = {"a": a, "b": b, "c": c, "n95": labels_for_share(a, b, c, share),
             "gain_doubling": float(power_law(2 * largest, a, b, c) - power_law(largest, a, b, c))}
    rng = np.random.default_rng(seed)
    draws, curves = [], []
    for _ in range(resamples):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < MIN_SIZES:
            continue
        try:
            ra, rb, rc = fit_power_law(n[idx], y[idx], upper)
        except (RuntimeError, ValueError):
            continue
        draws.append((ra, labels_for_share(ra, rb, rc, share),
                      float(power_law(2 * largest, ra, rb, rc) - power_law(largest, ra, rb, rc))))
        curves.append(power_law(grid, ra, rb, rc))
    dof = len(n) - 3
    # A band from a handful of refits (or around an exact fit: no residual freedom) would claim a precision it lacks.
    banded = dof >= 1 and len(draws) >= max(10, resamples // 4)

    def band(values: list) -> list[float] | None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not banded or len(values) < len(draws) // 2:
            return None
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    low, high = np.percentile(np.array(curves), [2.5, 97.5], axis=0) if banded else (None, None)
    return {
        **point,
        "share": share,
        "largest_n": int(largest),
        "smallest_n": int(n.min()),
        "metric_at_smallest": float(power_law(n.min(), a, b, c)),
        "metric_at_largest": float(power_law(largest, a, b, c)),
        "measured_at_largest": float(y[n == largest].mean()),
        "metric_at_n95": None if point["n95"] is None else float(power_law(point["n95"], a, b, c)),
        "residual_dof": dof,
        "bootstrap": {"resamples": resamples, "fits": len(draws),
                      "a": band([d[0] for d in draws]), "n95": band([d[1] for d in draws]),
                      "gain_doubling": band([d[2] for d in draws])},
        "curve": [{"n": float(g), "metric": float(power_law(g, a, b, c)),
                   "low": None if low is None else float(low[i]), "high": None if high is None else float(high[i])}
                  for i, g in enumerate(grid)],
    }


def count(n: float) -> str:
    """A number of labels as a person says it: 740, 6.2k, 30k, 1.3M."""
    if n < 1000:
        return f"{n:.0f}"
    if n < 1e6:
        return f"{n / 1000:.1f}k".replace(".0k", "k") if n < 1e4 else f"{n / 1000:.0f}k"
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n:.1e}"


def _within(values: list[float] | None, show) -> str:
    return f" [95% band {show(values[0])}-{show(values[1])}]" if values else ""


def sentence(s: dict, metric: str) -> str:
    """What the fit means for someone deciding how many texts to label."""
    share, largest, n95, boot = s["share"], s["largest_n"], s["n95"], s["bootstrap"]
    gain = (f"doubling to {count(2 * largest)} labels is expected to add {s['gain_doubling']:.3f}"
            + _within(boot["gain_doubling"], lambda v: f"{v:.3f}"))
    if n95 is None:
        return f"{metric} does not rise with more labels in the measured range (flat at {s['a']:.3f}); {gain}"
    measured = s["measured_at_largest"]
    reach = f"the {count(largest)} labels reach {measured:.3f} {metric}"
    if abs(measured - s["metric_at_largest"]) > MISFIT:
        reach += f" (measured; the fitted curve says {s['metric_at_largest']:.3f}, so read its figures as rough)"
    if n95 > FAR * largest:
        # An extrapolation this far says only that the curve is not bending yet.
        return (f"{reach} and the curve is not levelling off yet (the fit puts {share:.0%} of its plateau "
                f"beyond {FAR}x the labels measured); {gain}")
    plateau = f"{share:.0%} of the fitted plateau {s['a']:.3f}" + _within(boot["a"], lambda v: f"{v:.3f}")
    if n95 < s["smallest_n"]:
        return (f"already the smallest subset, {count(s['smallest_n'])} labels, reaches "
                f"{s['metric_at_smallest']:.3f} {metric} ({plateau}); the full {count(largest)} add "
                f"{s['metric_at_largest'] - s['metric_at_smallest']:.3f}; {gain}")
    labels = f"~{count(n95)} labels" + _within(boot["n95"], count)
    if n95 <= largest:
        return (f"with {labels} you reach {s['metric_at_n95']:.3f} {metric} ({plateau}); the full {count(largest)} "
                f"add {s['metric_at_largest'] - s['metric_at_n95']:.3f}; {gain}")
    return f"{reach}, short of {plateau}, which the fit puts at {labels}; {gain}"
