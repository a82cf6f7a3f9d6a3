"""The promotion rule on plain values: a registered version, one decision's outcome, and `decide`."""

from __future__ import annotations

from dataclasses import dataclass

from tunepipe.params import PromoteParams

# ---------------------------------------------------------------------------------------------- plain values

@dataclass(frozen=True)
class Version:
    number: int
    tags: dict[str, str]
    run_id: str | None
    created_ms: int

    def metric(self, name: str) -> float | None:
        raw = self.tags.get(f"metric.{name}")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    def metric_names(self) -> list[str]:
        return sorted(k.removeprefix("metric.") for k in self.tags if k.startswith("metric."))


@dataclass(frozen=True)
class Outcome:
    """One promotion decision: what was compared, on which data, the verdict and why."""

    name: str
    candidate: Version
    champion: Version | None
    metric: str
    candidate_value: float | None
    champion_value: float | None
    p_value: float | None
    test: str | None
    test_data_hash: str | None
    reevaluated: bool
    promote: bool
    reason: str
    already_champion: bool = False

    @property
    def delta(self) -> float | None:
        if self.candidate_value is None or self.champion_value is None:
            return None
        return self.candidate_value - self.champion_value


ROBUST_DROP = "robust_drop"  # the metrics.json key (and metric.<key> tag) promote.max_robust_drop reads


def decide(s: PromoteParams, candidate: float, champion: float | None, same_data: bool,
           p_value: float | None, robust_drop: float | None = None) -> tuple[bool, str]:
    """The promotion rule on plain numbers: (promote?, one-line reason). `robust_drop`: the candidate's recorded
    clean-minus-perturbed headline metric, which promote.max_robust_drop caps (None = not recorded)."""
    ok, reason = _clean_rule(s, candidate, champion, same_data, p_value)
    if not ok or s.max_robust_drop is None:
        return ok, reason
    limit = s.max_robust_drop
    if robust_drop is None:
        # Refused, not waved through: a guard that cannot be checked would let a fragile model pass unseen.
        return False, (f"{reason}, but the candidate has no {ROBUST_DROP} figure (registered before the robustness "
                       f"report, or with robustness.perturbations: []), so promote.max_robust_drop {limit:g} cannot "
                       "be checked; register it again with `dvc repro` or set promote.max_robust_drop: null")
    if robust_drop > limit + 1e-12:
        return False, (f"{reason}, but {ROBUST_DROP} {robust_drop:.4f} (the test headline metric lost under "
                       f"perturbation) exceeds promote.max_robust_drop {limit:g}")
    return True, f"{reason}; {ROBUST_DROP} {robust_drop:.4f} <= promote.max_robust_drop {limit:g}"


def _clean_rule(s: PromoteParams, candidate: float, champion: float | None, same_data: bool,
                p_value: float | None) -> tuple[bool, str]:
    m = s.metric
    if candidate < s.min_metric:
        return False, f"{m} {candidate:.4f} is below promote.min_metric {s.min_metric:g}"
    if champion is None:
        return True, f"no champion yet and {m} {candidate:.4f} >= promote.min_metric {s.min_metric:g}"
    if not same_data:
        return False, ("the two versions were evaluated on different test data; compare them with "
                       "`tunepipe promote --reevaluate` (scores both on the current test split)")
    delta = candidate - champion
    # A tie never promotes, even with min_delta 0; the epsilon keeps 0.805 - 0.800 from failing 0.005.
    if delta <= 0 or delta < s.min_delta - 1e-12:
        return False, f"{m} gain {delta:+.4f} is less than promote.min_delta {s.min_delta:g}"
    if s.significance is not None:
        assert p_value is not None
        if p_value > s.significance:
            return False, (f"{m} gain {delta:+.4f} is not significant: {s.test} p={p_value:.4g} > "
                           f"promote.significance {s.significance:g}")
        return True, f"{m} gain {delta:+.4f} >= {s.min_delta:g}, {s.test} p={p_value:.4g} <= {s.significance:g}"
    return True, f"{m} gain {delta:+.4f} >= promote.min_delta {s.min_delta:g}"
