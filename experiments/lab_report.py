"""The lab's outputs, computed from its run directories only: lab.json, lab.md (Table-1 layout), lab.png.

Student rows: each run's ROUGE-L is its mean over the evaluation seeds; the cell is mean ± sample
std of that over the training seeds. Teacher and init rows are single models: mean ± std over the
evaluation seeds. The average column averages a run's five set means, then goes over seeds the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from mgsr_cli.artifacts import atomic_write_json, atomic_write_text
from mgsr_cli.losses import parse_spec
from mgsr_cli.metrics import mean_and_std

SET_TITLES = {"dolly": "Dolly", "self_inst": "SelfInst", "vicuna": "Vicuna", "sinst": "S-NI", "uinst": "UnNI†"}
METHOD_TITLES = {
    "sft": "SFT w/o KD",
    "kd": "KD (forward KL)",
    "seqkd": "SeqKD",
    "rkl": "f-DISTILL RKL",
    "js": "f-DISTILL JS",
    "tvd": "f-DISTILL TVD",
    "gkd": "GKD",
    "distillm": "DistiLLM",
    "akl": "AKL",
    "rlkd": "RLKD",
    "mgsr": "MGSR",
    "mgsr_no_scrg": "MGSR w/o SCRG",
    "mgsr_fkl": "MGSR, FKL instead of DAC-KL",
    "mgsr_no_span": "MGSR w/o span loss",
}
PAPER_PARAMETERS = {"teacher": 1.56e9, "student": 124e6}  # GPT-2 XL and GPT-2 base, the paper's GPT-2 pair
TABLE_HEADER = "| Method | " + " | ".join(SET_TITLES.values()) + " | Avg. |"
README_MARKERS = ("<!-- lab table: copied from experiments/results/lab.md -->", "<!-- end of lab table -->")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _cell(values: list[float]) -> dict:
    mean, std = mean_and_std(values)
    return {"mean": mean, "std": std, "values": values}


def model_row(report: dict, label: str) -> dict:
    """A single model's row: mean ± std over evaluation seeds per set, and its average."""
    results = report["results"][label]
    cells = {name: _cell(list(results[name]["per_seed"].values())) for name in SET_TITLES}
    per_seed_average = [sum(values) / len(values) for values in zip(*(cells[name]["values"] for name in SET_TITLES))]
    return {"cells": cells, "average": _cell(per_seed_average), "std_over": "evaluation seeds"}


def method_row(reports: list[dict], labels: list[str]) -> dict:
    """A recipe's row: per run the mean over evaluation seeds, then mean ± std over training seeds."""
    cells = {name: _cell([report["results"][label][name]["mean"] for report, label in zip(reports, labels)]) for name in SET_TITLES}
    averages = [sum(cells[name]["values"][index] for name in SET_TITLES) / len(SET_TITLES) for index in range(len(labels))]
    return {"cells": cells, "average": _cell(averages), "std_over": "training seeds"}


def collect(scale, runs: Path, timings) -> dict:
    """Everything lab.md reports, read from the runs' manifests, reports and timings."""
    from transformers import AutoModelForCausalLM

    from experiments.lab_models import describe, tokens_per_word
    from mgsr_cli.config import DataConfig
    from mgsr_cli.data import load_examples

    evaluate = runs / "evaluate"
    rows = {
        "teacher": {"title": "Teacher (SFT)", **model_row(_json(evaluate / "teacher" / "report.json"), "teacher")},
        "student-init": {"title": "Student init (SFT, before distillation)", **model_row(_json(evaluate / "student-init" / "report.json"), "student-init")},
    }
    run_details = {}
    for recipe in scale.recipes:
        labels = [f"{recipe}-s{seed}" for seed in scale.train_seeds]
        reports = [_json(evaluate / label / "report.json") for label in labels]
        rows[recipe] = {"title": METHOD_TITLES[recipe], "recipe": recipe, **method_row(reports, labels)}
        for label in labels:
            run_details[label] = _run_details(runs / "distill" / label, timings.units.get(label))
    teacher_report = _json(evaluate / "teacher" / "report.json")
    from experiments.lab_evidence import collect_evidence
    from mgsr_cli.config import DistillConfig
    from mgsr_cli.config_loading import from_dict

    configs = {}
    for recipe in scale.recipes:
        run = runs / "distill" / f"{recipe}-s{scale.train_seeds[0]}"
        configs[recipe] = from_dict(DistillConfig, _json(run / "manifest.json")["config"], str(run))
    student = AutoModelForCausalLM.from_pretrained(str(runs / "student-init" / "student"))
    dolly_references = [example.references[0] for example in load_examples("dolly", DataConfig(), 200)]
    overrides = scale.distill_overrides(seed=scale.train_seeds[0])
    del overrides["seed"]
    models = {"teacher": describe(runs / "teacher-sft" / "student"), "student": describe(runs / "student-init" / "student")}
    return {
        "scale": dataclasses.asdict(scale),
        "distill_overrides": overrides,
        "tokenizer": {
            "vocab_size": models["teacher"]["vocab_size"],
            "tokens_per_word_dolly_test": tokens_per_word(runs / "models" / "tokenizer", dolly_references),
        },
        "models": models,
        "sft": {name: _run_details(runs / name, timings.units.get(name)) for name in ("teacher-sft", "student-init")},
        "examples_per_set": {name: teacher_report["results"]["teacher"][name]["examples"] for name in SET_TITLES},
        "recipes": {recipe: _recipe_settings(runs / "distill" / f"{recipe}-s{scale.train_seeds[0]}", student) for recipe in scale.recipes},
        "rows": rows,
        "evidence": collect_evidence(scale, runs, configs),
        "runs": run_details,
        "timings": {"phases": timings.phases, "units": timings.units, "invocations": timings.invocations, "commits": timings.commits},
    }


def _run_details(run: Path, seconds: float | None) -> dict:
    manifest = _json(run / "manifest.json")
    final = manifest.get("final", {})
    return {
        "steps": manifest["steps"],
        "sgo_share": manifest["sgo_steps"] / max(manifest["steps"], 1),
        "theta": manifest["theta"],
        "final_loss": final.get("loss"),
        "final_val_loss": _last_val_loss(run / "metrics.jsonl"),
        "final_terms": {term.name: final[term.name] for term in parse_spec(manifest["config"]["loss"]) if term.name in final},
        "seconds": seconds,
    }


def _last_val_loss(metrics: Path) -> float | None:
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    values = [row["val_loss"] for row in rows if "val_loss" in row]
    return values[-1] if values else None


def _recipe_settings(run: Path, student) -> dict:
    """The method-defining settings of a recipe's run, and the learning rate the run resolved."""
    from mgsr_cli.config import DistillConfig
    from mgsr_cli.config_loading import from_dict
    from mgsr_cli.train_setup import resolve_schedule

    config = _json(run / "manifest.json")["config"]
    lr, _ = resolve_schedule(from_dict(DistillConfig, config, str(run)), student, 1)
    return {**{key: config[key] for key in ("loss", "sgo_policy", "sgo_model", "scrg", "sft_on_sgo")}, "lr": lr}


# ---------------------------------------------------------------- markdown


def _format(cell: dict) -> str:
    """mean ± std; the mean alone when there is a single value (no spread to report)."""
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}" if len(cell["values"]) > 1 else f"{cell['mean']:.2f}"


def table(rows: dict) -> str:
    lines = [TABLE_HEADER, "|---" + "|---:" * (len(SET_TITLES) + 1) + "|"]
    for key, row in rows.items():
        title = row["title"] + (f" (`{row['recipe']}`)" if "recipe" in row else "")
        lines.append(f"| {title} | " + " | ".join(_format(row["cells"][name]) for name in SET_TITLES) + f" | {_format(row['average'])} |")
    return "\n".join(lines)


def anomalies(data: dict) -> list[str]:
    """Rows with cells at zero or not finite, and runs whose loss or validation loss is not finite."""
    found = []
    for key, row in data["rows"].items():
        bad = [name for name, cell in [*row["cells"].items(), ("average", row["average"])] if not all(math.isfinite(v) and v > 0 for v in cell["values"])]
        if bad:
            found.append(f"{key}: zero or non-finite on {', '.join(bad)}")
    for label, run in data["runs"].items():
        for metric in ("final_loss", "final_val_loss"):
            if run[metric] is not None and not math.isfinite(run[metric]):
                found.append(f"{label}: {metric} is {run[metric]}")
    return found


def findings(data: dict) -> list[str]:
    """Plain statements computed from the table and the paired comparison (a CI that includes 0 is not resolved)."""
    from experiments.lab_fidelity import METRICS
    from experiments.lab_stats import resolved

    rows, comparisons = data["rows"], data["evidence"]["comparisons"]
    methods = {key: row for key, row in rows.items() if "recipe" in row}
    average = {key: row["average"]["mean"] for key, row in methods.items()}
    ranked = sorted(average, key=average.get, reverse=True)
    teacher, init = rows["teacher"]["average"]["mean"], rows["student-init"]["average"]["mean"]
    lines = [
        f"Teacher average {teacher:.2f}, student before distillation {init:.2f} (gap {teacher - init:+.2f}).",
        f"Method averages range from {average[ranked[-1]]:.2f} ({ranked[-1]}) to {average[ranked[0]]:.2f} ({ranked[0]}), "
        f"a spread of {average[ranked[0]] - average[ranked[-1]]:.2f}.",
        "Order by average: " + " > ".join(ranked) + ".",
    ]
    for metric, comparison in comparisons.items():
        signs = {}
        for key, entry in comparison["differences"].items():
            signs.setdefault(resolved(entry, comparison["higher_is_better"]), []).append(key)
        lines.append(
            f"{METRICS[metric][0]}, against the best baseline `{comparison['best_baseline']}`: resolved better: {', '.join(signs.get('+', [])) or 'none'}; "
            f"resolved worse: {', '.join(signs.get('−', [])) or 'none'}; not resolved: {', '.join(signs.get('≈', [])) or 'none'}."
        )
    return lines


def markdown(data: dict) -> str:
    scale, models, tokenizer = data["scale"], data["models"], data["tokenizer"]
    teacher, student = models["teacher"], models["student"]
    seeds, eval_seeds = scale["train_seeds"], scale["eval_seeds"]
    examples = ", ".join(f"{SET_TITLES[name]} {count}" for name, count in data["examples_per_set"].items())
    lr = sorted({settings["lr"] for settings in data["recipes"].values()}, key=str)
    odd = anomalies(data)
    quick = scale["name"] == "quick"
    phases = data["timings"]["phases"]
    from experiments.lab_scale import GPU
    from experiments.lab_evidence import markdown as evidence_markdown

    lines = [
        "# Lab study: every recipe distilling one tiny GPT-2 teacher on a CPU" + (" (--quick: pipeline check only)" if quick else ""),
        "",
        "Produced by `python experiments/lab.py" + (" --quick" if quick else "") + "`; every number below comes from that run's "
        "artifacts (`runs/`), nothing is typed in. The teacher is SFT-trained on Dolly, the student starts from its own SFT "
        f"\"init\" checkpoint, then each of the {len(data['recipes'])} recipes distills it with {len(seeds)} training seed(s).",
        "",
        "## Result (layout of the paper's Table 1): ROUGE-L F ×100",
        "",
        table(data["rows"]),
        "",
        f"Student rows: mean ± sample std over the training seeds {', '.join(map(str, seeds))} of each run's mean over the "
        f"evaluation seeds {', '.join(map(str, eval_seeds))}. Teacher and init rows (one model each): mean ± std over the evaluation seeds. "
        "Avg. is the mean of the five columns, UnNI† included.",
        "",
        "† UnNI here is the shipped short-answer bucket of Unnatural Instructions (1-2 word references), not MiniLLM's UnNI set: "
        "**not comparable with the paper's UnNI column**.",
        "",
        "![Average ROUGE-L per method, error bars: std over training seeds](lab.png)",
        "",
        *evidence_markdown(data["evidence"], {key: row["title"] for key, row in data["rows"].items()}),
        "## What this shows and what it does not",
        "",
        *[f"- {line}" for line in findings(data)],
        "- Checks: " + ("no zero or non-finite cell, loss or validation loss." if not odd else "**" + "; ".join(odd) + "**"),
        "",
        f"It shows that every recipe runs end to end through the same pipeline (tokenizer, SFT, distill, evaluate) and how they "
        f"compare when a {teacher['parameters'] / 1e6:.2f}M-parameter teacher distills a {student['parameters'] / 1e6:.2f}M-parameter "
        f"student for {scale['distill_steps']} steps of {scale['batch_size']} sequences. It does not reproduce the paper: the teacher is "
        f"{PAPER_PARAMETERS['teacher'] / teacher['parameters']:,.0f}x smaller than GPT-2 XL and the student "
        f"{PAPER_PARAMETERS['student'] / student['parameters']:,.0f}x smaller than GPT-2 base, "
        "training is a fraction of an epoch instead of 20 epochs, responses are cut "
        f"at {scale['response_tokens']} tokens, no checkpoint is selected by validation ROUGE-L, and each cell rests on the first "
        f"{scale['eval_examples']} examples of a set. Differences whose paired CI includes 0 are not resolved; the ranking at this scale "
        "says nothing about the ranking at the paper's scale.",
        "",
        "## Setup",
        "",
        f"- Tokenizer: byte-level BPE (`tokenizers`) trained on Dolly train "
        f"({'all examples' if scale['tokenizer_examples'] is None else 'first ' + str(scale['tokenizer_examples']) + ' examples'}, prompt and "
        f"response), vocabulary {tokenizer['vocab_size']} with `<|endoftext|>` as EOS, BOS and pad; "
        f"{tokenizer['tokens_per_word_dolly_test']:.2f} tokens per word on Dolly test references.",
        f"- Teacher: GPT-2, {teacher['n_layer']} layers × {teacher['n_embd']} (heads {teacher['n_head']}), "
        f"{teacher['parameters']:,} parameters; student: {student['n_layer']} layers × {student['n_embd']} (heads {student['n_head']}), "
        f"{student['parameters']:,} parameters; {teacher['n_positions']} positions; random init.",
        f"- SFT (`sft` recipe) on the first {scale['sft_examples']} Dolly train examples, batch {scale['batch_size']}, lr {scale['sft_lr']}: "
        f"teacher {scale['teacher_sft_steps']} steps (final dev loss {_fmt(data['sft']['teacher-sft']['final_val_loss'])}), "
        f"student init {scale['student_sft_steps']} steps (final dev loss {_fmt(data['sft']['student-init']['final_val_loss'])}).",
        f"- Distillation: each recipe's YAML as shipped, with these scale overrides for every recipe (plus `seed` = the training seed): "
        f"`{json.dumps(data['distill_overrides'])}`. Learning rate: the recipes' default, resolved to {', '.join(map(str, lr))} "
        "(method.md §7 for < 1B parameters); the last step is kept. "
        "`theta_init` 0.5 (the shipped `tiny-gpt2` recipe does the same): with θ = 0 the adaptive off-policy recipes (distillm, mgsr*) "
        "never see a student output in a run this short (θ only rises after the validation loss rises), and mgsr would equal mgsr_no_scrg.",
        f"- Evaluation (method.md §6): sampling at temperature 1, no top-k / top-p, prompts ≤ 256 tokens; deviations: "
        f"responses cut at {scale['response_tokens']} new tokens (paper: up to length 512), evaluation seeds {', '.join(map(str, eval_seeds))} "
        f"(paper: 10-50), the first {scale['eval_examples']} examples of each set (paper: all). Examples kept after the prompt limit: {examples}.",
        f"- Profile `{scale['name']}`."
        + (
            ""
            if scale["name"] == "gpu"
            else f" The `--scale gpu` profile (teacher {GPU.teacher.n_layer}×{GPU.teacher.n_embd}, student {GPU.student.n_layer}×{GPU.student.n_embd}, "
            f"{len(GPU.train_seeds)} training seeds, {GPU.distill_steps} distillation steps, {GPU.eval_examples} examples per set; sized for about "
            "8 minutes on one H100-class GPU, an estimate) needs a CUDA GPU: it is not part of this report, and no GPU was available to run it."
        ),
        "",
        "## Per recipe: settings and training",
        "",
        "| recipe | loss | SGO policy | SGO by | SCRG | steps on SGO | last step: loss (terms) | final dev loss | s / run |",
        "|---|---|---|---|---|---:|---|---:|---:|",
    ]
    for recipe, settings in data["recipes"].items():
        runs = [data["runs"][f"{recipe}-s{seed}"] for seed in seeds]
        sampler, revised = ("—", "—") if settings["sgo_policy"] == "none" else (settings["sgo_model"], "yes" if settings["scrg"] else "no")
        lines.append(
            f"| `{recipe}` | `{settings['loss']}` | {settings['sgo_policy']} | {sampler} | {revised} | "
            f"{_mean(run['sgo_share'] for run in runs):.0%} | {_fmt(_mean(run['final_loss'] for run in runs))}{_terms(runs)} | "
            f"{_fmt(_mean(run['final_val_loss'] for run in runs))} | {_fmt(_mean(run['seconds'] for run in runs), 1)} |"
        )
    lines += [
        "",
        "Means over the training seeds; the last step's loss is for that step's batch (ground truth or SGO). Losses are each "
        "recipe's own objective, so they are not comparable across recipes; "
        "the SGO policy `none` never generates, `once` samples each example's teacher response once (SeqKD).",
        "",
        "## Wall time",
        "",
        "| phase | wall time |",
        "|---|---:|",
        *[f"| {name} | {seconds / 60:.1f} min |" for name, seconds in phases.items()],
        f"| total | {sum(phases.values()) / 60:.1f} min |",
        "",
        f"Summed over {data['timings']['invocations']} invocation(s) of the script (code: {', '.join(f'`{c}`' for c in data['timings']['commits']) or 'not recorded'}; "
        f"'+dirty': with uncommitted changes); units ran {data['parallelism']}.",
        "",
    ]
    return "\n".join(lines)


def _mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def _terms(runs: list[dict]) -> str:
    """The loss terms of a multi-term objective, mean over seeds, e.g. ' (sft 6.9, dac_kl 0.07, span 8e-12)'."""
    names = list(runs[0]["final_terms"])
    if len(names) < 2:
        return ""
    return " (" + ", ".join(f"{name} {_mean(run['final_terms'][name] for run in runs):.3g}" for name in names) + ")"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------- figure


def plot(data: dict, target: Path) -> None:
    """Bar chart of the averages; error bars are the rows' std (training seeds; evaluation seeds for single models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    names = list(rows)
    means = [rows[name]["average"]["mean"] for name in names]
    errors = [rows[name]["average"]["std"] for name in names]
    colours = ["tab:gray" if "recipe" not in rows[name] else ("tab:red" if name.startswith("mgsr") else "tab:blue") for name in names]
    figure, axis = plt.subplots(figsize=(11, 4.5))
    axis.bar(range(len(names)), means, yerr=errors, color=colours, capsize=3)
    axis.set_xticks(range(len(names)), names, rotation=40, ha="right")
    axis.set_ylabel("average ROUGE-L (5 sets)")
    axis.set_title("Lab study: average ROUGE-L, mean ± std (grey: teacher and student init)")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)


def write_report(out: Path, scale, runs: Path, timings, parallelism: str) -> Path:
    """Write out/lab.json, out/lab.md and out/lab.png; returns the path of lab.md."""
    data = {**collect(scale, runs, timings), "parallelism": parallelism}
    atomic_write_json(out / "lab.json", data)
    plot(data, out / "lab.png")
    atomic_write_text(out / "lab.md", markdown(data))
    return out / "lab.md"


def copy_table_into(readme: Path, lab_md: Path) -> None:
    """Replace the README's table between `README_MARKERS` with lab.md's, so it is never typed in."""
    lines = lab_md.read_text(encoding="utf-8").splitlines()
    start = lines.index(TABLE_HEADER)
    end = next((index for index in range(start, len(lines)) if not lines[index].startswith("|")), len(lines))
    text = readme.read_text(encoding="utf-8")
    begin, finish = README_MARKERS
    if begin not in text or finish not in text:
        raise SystemExit(f"error: {readme} has no lab table markers ({begin} ... {finish})")
    head, rest = text.split(begin, 1)
    tail = rest.split(finish, 1)[1]
    atomic_write_text(readme, head + begin + "\n" + "\n".join(lines[start:end]) + "\n" + finish + tail)
