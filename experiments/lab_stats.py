"""Paired statistics of the lab (issue 15): every model is scored on the same prompts with the same
sampling seeds, so a method is compared with the best baseline example by example.

A score table is, per data set, an array [training seeds, examples] (already averaged over the
evaluation seeds; single models have one "training seed"). The bootstrap resamples examples
within each set and training seeds with replacement, the same draws for both sides of a
difference, and averages the sets like the table's Avg. column.
"""

from __future__ import annotations

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
# Minimum detectable effect of a two-sided 5% test at 80% power: (1.96 + 0.84) x the SE of the difference.
MDE_FACTOR = 1.96 + 0.84

Scores = dict[str, np.ndarray]  # data set -> [training seeds, examples]


def point(scores: Scores) -> float:
    return float(np.mean([values.mean() for values in scores.values()]))


def bootstrap(scores: Scores, seed: int = 0, replicates: int = REPLICATES) -> np.ndarray:
    """[replicates] set-averaged means under resampled examples and training seeds."""
    rng = np.random.default_rng(seed)
    total = np.zeros(replicates)
    for name in sorted(scores):
        values = scores[name]
        seeds = rng.integers(0, values.shape[0], size=(replicates, values.shape[0]))
        examples = rng.integers(0, values.shape[1], size=(replicates, values.shape[1]))
        per_example = values[seeds].mean(axis=1)  # [replicates, examples]
        total += np.take_along_axis(per_example, examples, axis=1).mean(axis=1)
    return total / len(scores)


def interval(scores: Scores, seed: int = 0) -> dict:
    """Point estimate, percentile bootstrap 95% CI and bootstrap SE."""
    samples = bootstrap(scores, seed)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {"estimate": point(scores), "low": float(low), "high": float(high), "se": float(samples.std(ddof=1))}


def difference(scores: Scores, baseline: Scores, seed: int = 0) -> dict:
    """Paired difference scores - baseline (same examples, same seeds) with its CI."""
    return interval({name: scores[name] - baseline[name] for name in scores}, seed)


def compare(models: dict[str, Scores], methods: list[str], baselines: list[str], higher_is_better: bool) -> dict:
    """Each model's score CI; each method's paired difference to the best baseline; the MDE.

    The best baseline is the one with the best point estimate among `baselines`; the minimum
    detectable effect is MDE_FACTOR x the median SE of the methods' differences.
    """
    sign = 1 if higher_is_better else -1
    best = max(baselines, key=lambda key: sign * point(models[key]))
    differences = {key: difference(models[key], models[best]) for key in methods if key != best}
    ses = sorted(entry["se"] for entry in differences.values())
    return {
        "higher_is_better": higher_is_better,
        "scores": {key: interval(scores) for key, scores in models.items()},
        "best_baseline": best,
        "differences": differences,
        "mde": MDE_FACTOR * ses[len(ses) // 2] if ses else None,
    }


def teacher_gap(comparison: dict, methods: list[str]) -> dict:
    """Is the teacher clearly better than the init? Gap vs 3x the median half-width of a method's score CI."""
    scores = comparison["scores"]
    gap = scores["teacher"]["estimate"] - scores["student-init"]["estimate"]
    gap = gap if comparison["higher_is_better"] else -gap
    widths = sorted((scores[key]["high"] - scores[key]["low"]) / 2 for key in methods)
    half_width = widths[len(widths) // 2]
    return {"gap": gap, "half_width": half_width, "ratio": gap / half_width if half_width else float("inf"), "met": gap >= 3 * half_width}


def resolved(entry: dict, higher_is_better: bool = True) -> str:
    """'+' (better) / '−' (worse) when the difference's CI excludes 0, '≈' otherwise."""
    if not higher_is_better:
        entry = {"low": -entry["high"], "high": -entry["low"]}
    if entry["low"] > 0:
        return "+"
    return "−" if entry["high"] < 0 else "≈"
