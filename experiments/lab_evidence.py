"""The lab's evidence section (issue 15): paired CIs against the best baseline for ROUGE-L and the
fidelity metrics, the teacher-init gap check, the mechanism checks, every logged term, and the
tuning budget; gathered from the run directories and written as lab.md's middle part."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.lab_fidelity import METRICS, Fidelity, example_ids, logged, records_by_key, rouge_scores, scrg_check
from experiments.lab_stats import MDE_FACTOR, REPLICATES, compare, difference, resolved, teacher_gap
from mgsr_cli.artifacts import atomic_write_json

# MGSR's ablations: what taking each component away changes (the paired difference mgsr - ablation).
COMPONENTS = {"mgsr_no_scrg": "SCRG", "mgsr_fkl": "DAC-KL (instead of FKL)", "mgsr_no_span": "span loss"}


def _labels(scale) -> dict[str, list[str]]:
    return {"teacher": ["teacher"], "student-init": ["student-init"], **{r: [f"{r}-s{s}" for s in scale.train_seeds] for r in scale.recipes}}


def _model_dir(runs: Path, label: str) -> Path:
    return runs / ("teacher-sft" if label == "teacher" else label if label == "student-init" else f"distill/{label}") / "student"


def tuning_budget(scale) -> dict:
    """What every method was given to tune on: the same for all, and never a test set."""
    return {
        "hyperparameter_trials_per_method": 1,
        "runs_per_method": len(scale.train_seeds),
        "selection_data": f"dev set only ({scale.dev_examples} Dolly dev examples: validation loss, adaptive θ); no checkpoint or setting chosen on a test set",
        "settings": "each recipe's shipped YAML; only the scale knobs differ from it, identically for every recipe",
    }


def collect_evidence(scale, runs: Path, configs: dict) -> dict:
    """`configs`: recipe -> its resolved DistillConfig (SCRG settings of the mechanism check)."""
    from experiments.lab_scale import EVAL_SETS

    evaluate, seeds, labels = runs / "evaluate", tuple(scale.eval_seeds), _labels(scale)
    ids = example_ids(records_by_key(evaluate, "teacher"), EVAL_SETS, seeds[0])
    models = {metric: {} for metric in METRICS}
    for key, group in labels.items():
        per_label = [rouge_scores(records_by_key(evaluate, label), ids, seeds) for label in group]
        models["rougeL"][key] = {name: np.stack([scores[name] for scores in per_label]) for name in EVAL_SETS}
    fidelity = Fidelity(_model_dir(runs, "teacher"), evaluate, EVAL_SETS, seeds[0], max(scale.eval_examples // 5, 1), scale.response_tokens)
    for key, group in labels.items():
        values = [fidelity.of(label, _model_dir(runs, label), runs / "fidelity" / f"{label}.json") for label in group]
        for metric in models:
            if metric != "rougeL":
                models[metric][key] = {name: np.array([value[metric][name] for value in values]) for name in EVAL_SETS}
    methods = list(scale.recipes)
    baselines = [recipe for recipe in methods if not recipe.startswith("mgsr")] or methods
    comparisons = {metric: compare(models[metric], methods, baselines, METRICS[metric][1]) for metric in METRICS}
    components = {
        ablation: {metric: difference(models[metric]["mgsr"], models[metric][ablation]) for metric in METRICS}
        for ablation in COMPONENTS
        if "mgsr" in methods and ablation in methods
    }
    terms = {label: logged(runs / "distill" / label, [t.name for t in _terms(configs[recipe].loss)]) for recipe in methods for label in labels[recipe]}
    mgsr = next((recipe for recipe in methods if configs[recipe].scrg and configs[recipe].sgo_policy != "none"), None)
    return {
        "fidelity_examples_per_set": {name: len(keys) for name, keys in fidelity.ids.items()},
        "comparisons": comparisons,
        "teacher_gap": {metric: teacher_gap(comparison, methods) for metric, comparison in comparisons.items()},
        "components": components,
        "scrg": _cached(runs / "fidelity" / "scrg.json", lambda: scrg_check(fidelity, _model_dir(runs, "student-init"), configs[mgsr], seed=0)) if mgsr else None,
        "scrg_recipe": mgsr,
        "logged_terms": terms,
        "term_shares": term_shares(terms, {label: [t.name for t in _terms(configs[recipe].loss)] for recipe in methods for label in labels[recipe]}),
        "tuning": tuning_budget(scale),
    }


def _cached(path: Path, compute):
    """A result kept beside the fidelity caches, so a re-run of the report reuses it."""
    import json

    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    atomic_write_json(path, result)
    return result


def _terms(loss: str):
    from mgsr_cli.losses import parse_spec

    return parse_spec(loss)


def share_term(key: str, names: list[str]) -> str | None:
    """The loss term a logged gradient-share key is about ('grad_share/span' -> 'span'), else None."""
    if "share" not in key or key == "sgo_share":
        return None
    rest = key
    for word in ("grad_norm_share", "grad_share", "gradient_share", "share", "grad"):
        rest = rest.replace(word, "")
    rest = rest.strip("/_:.")
    return rest if rest in names else None


def term_shares(logged_terms: dict, names: dict[str, list[str]]) -> dict:
    """Per run with several loss terms: each term's logged magnitude and its share of the gradient
    norm (None where distill logged no share), as training means with first and last values."""
    table = {}
    for label, terms in logged_terms.items():
        if len(names[label]) < 2:
            continue
        shares = {share_term(key, names[label]): value for key, value in terms.items() if share_term(key, names[label])}
        table[label] = {name: {"magnitude": terms.get(name), "grad_share": shares.get(name)} for name in names[label]}
    return table


def term_share_markdown(shares: dict) -> list[str]:
    if not shares:
        return []
    logged = any(entry["grad_share"] for terms in shares.values() for entry in terms.values())
    lines = [
        "### Each loss term: logged magnitude and share of the gradient norm (multi-term objectives)",
        "",
        "| run | term | magnitude: mean (first → last) | gradient share: mean (first → last) |",
        "|---|---|---:|---:|",
    ]
    for label, terms in shares.items():
        for name, entry in terms.items():
            cells = [f"{v['mean']:.3g} ({v['first']:.3g} → {v['last']:.3g})" if v else "—" for v in (entry["magnitude"], entry["grad_share"])]
            lines.append(f"| `{label}` | `{name}` | {cells[0]} | {cells[1]} |")
    lines += ["", "Gradient share as distill logs it (`grad_share/<term>`): the norm of the term's weighted gradient with respect to the student logits over the sum of the terms' norms." if logged else "Gradient shares: **not logged by distill in this run**, so not reported.", ""]
    return lines


def _ci(entry: dict, digits: int = 3) -> str:
    return f"{entry['estimate']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def markdown(evidence: dict, titles: dict[str, str]) -> list[str]:
    comparisons, metrics = evidence["comparisons"], list(METRICS)
    rows = list(comparisons["rougeL"]["scores"])
    lines = [
        "## Paired comparison: every model on the same prompts with the same sampling seeds",
        "",
        f"Point estimate [95% CI] from {REPLICATES} paired bootstrap replicates (examples within each set and training seeds "
        "resampled, the same draws for both sides of a difference; sets averaged like Avg.). ROUGE-L uses every evaluated example "
        f"and evaluation seed; the fidelity metrics the first {', '.join(f'{n} {c}' for n, c in evidence['fidelity_examples_per_set'].items())} "
        "examples (first evaluation seed for samples). KL in nats per token; lower is better for all but ROUGE-L.",
        "",
        "| model | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
        "|---" + "|---:" * len(metrics) + "|",
        *[f"| {titles.get(row, row)} | " + " | ".join(_ci(comparisons[m]["scores"][row], 2 if m == "rougeL" else 3) for m in metrics) + " |" for row in rows],
        "",
        "### Difference to the best baseline (paired; + better, − worse, ≈ CI includes 0)",
        "",
        "| method | " + " | ".join(f"{METRICS[m][0]} (vs `{comparisons[m]['best_baseline']}`)" for m in metrics) + " |",
        "|---" + "|---:" * len(metrics) + "|",
    ]
    for row in rows[2:]:
        cells = []
        for metric in metrics:
            entry = comparisons[metric]["differences"].get(row)
            if entry is None:
                cells.append("best baseline")
                continue
            cells.append(f"{_ci(entry, 2 if metric == 'rougeL' else 3)} {resolved(entry, METRICS[metric][1])}")
        lines.append(f"| {titles.get(row, row)} | " + " | ".join(cells) + " |")
    if evidence["components"]:
        lines += [
            "",
            "### What each MGSR component gives (paired difference `mgsr` − ablation; + means the component helps)",
            "",
            "| component (ablation) | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
            "|---" + "|---:" * len(metrics) + "|",
        ]
        for ablation, entries in evidence["components"].items():
            cells = [f"{_ci(entries[m], 2 if m == 'rougeL' else 3)} {resolved(entries[m], METRICS[m][1])}" for m in metrics]
            lines.append(f"| {COMPONENTS[ablation]} (`{ablation}`) | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Minimum detectable effect (two-sided 5% test, 80% power: {MDE_FACTOR:.2f} × the median SE of a difference): "
        + "; ".join(f"{METRICS[m][0]} {comparisons[m]['mde']:.3g}" for m in metrics if comparisons[m]["mde"] is not None)
        + ".",
        "",
        "Teacher vs student init (the gap the methods are to close, against 3x the median 95% CI half-width of a method's score): "
        + "; ".join(f"{METRICS[m][0]} gap {g['gap']:.3g} = {g['ratio']:.1f}x the half-width {g['half_width']:.3g} ({'met' if g['met'] else '**not met**'})" for m, g in evidence["teacher_gap"].items())
        + ".",
        "",
        *mechanism_markdown(evidence),
    ]
    return lines


def mechanism_markdown(evidence: dict) -> list[str]:
    lines = ["## Mechanism checks", ""]
    scrg = evidence["scrg"]
    if scrg:
        diff, distinct = scrg["teacher_nll_difference"], scrg["distinct"]
        lines += [
            f"- SCRG (`{evidence['scrg_recipe']}`'s settings {scrg['settings']}) on the student init's own Dolly samples "
            f"({scrg['sequences']} sequences, {scrg['changed']:.0%} changed): teacher NLL per token {scrg['teacher_nll']['original']:.3f} "
            f"original → {scrg['teacher_nll']['revised']:.3f} revised, paired difference {_ci(diff)} ({'lower under the teacher' if diff['high'] < 0 else 'not lower under the teacher' if diff['low'] > 0 else 'not resolved'}); "
            f"distinct-1 {distinct['original']['1']:.3f} → {distinct['revised']['1']:.3f}, distinct-2 {distinct['original']['2']:.3f} → {distinct['revised']['2']:.3f}.",
        ]
    bands = {label: terms for label, terms in evidence["logged_terms"].items() if "dac_band_mass" in terms}
    for label, terms in bands.items():
        mass, size = terms["dac_band_mass"], terms.get("dac_band_size")
        lines.append(
            f"- DAC-KL band, `{label}`: teacher mass in the band first {mass['first']:.3f}, min {mass['min']:.3f}, last {mass['last']:.3f}"
            + (f"; band size min {size['min']:.1f} tokens, last {size['last']:.1f}" if size else "")
            + (" (collapsed: band under 1 token)" if size and size["min"] < 1 else " (clear of collapse)" if size else "")
            + "."
        )
    lines += ["", "### Every logged term over training (mean, and [first → last])", "", "| run | term | mean | first → last |", "|---|---|---:|---|"]
    for label, terms in evidence["logged_terms"].items():
        lines += [f"| `{label}` | `{name}` | {v['mean']:.4g} | {v['first']:.4g} → {v['last']:.4g} |" for name, v in terms.items()]
    lines += ["", *term_share_markdown(evidence["term_shares"])]
    tuning = evidence["tuning"]
    lines += [
        "## Tuning budget",
        "",
        f"The same for every method: {tuning['hyperparameter_trials_per_method']} setting (trial) per method, {tuning['runs_per_method']} training run(s); "
        f"{tuning['settings']}; selection data: {tuning['selection_data']}.",
        "",
    ]
    return lines
