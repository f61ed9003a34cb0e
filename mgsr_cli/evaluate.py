"""The `evaluate` stage: the evaluation protocol of MiniLLM / DistiLLM / MGSR (method.md section 6).

For each model, data set and seed: sample one response per prompt (temperature 1, no top-k /
top-p, total length 512, prompts <= 256 tokens), score ROUGE-L F x100 against the references
(max over references, mean over examples), then report mean and std over seeds.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from rich.table import Table

from mgsr_cli.artifacts import StageWriter, atomic_write_json, atomic_write_text, describe_input, iter_records
from mgsr_cli.chat import recorded_renderings, resolve
from mgsr_cli.config import EvaluateConfig
from mgsr_cli.config_loading import to_dict
from mgsr_cli.console import console
from mgsr_cli.data import SHIPPED, load_examples, resolve_source, tokenize_prompts
from mgsr_cli.errors import UsageError
from mgsr_cli.generate import Job, sample_records
from mgsr_cli.metrics import mean_and_std, rouge_l_max
from mgsr_cli.models import load_model_as, load_tokenizer

log = logging.getLogger(__name__)


def labelled(specs: list[str], what: str) -> dict[str, str]:
    """{label: spec} for `NAME=PATH` or bare specs (labelled by their last path part)."""
    result: dict[str, str] = {}
    for spec in specs:
        label, _, target = spec.partition("=") if "=" in spec else ("", "", spec)
        label = label or (spec if spec in SHIPPED else Path(spec.rstrip("/")).name.split(".")[0] or spec)
        if label in result:
            raise UsageError(f"two {what}s are both labelled '{label}'; name them as LABEL=PATH")
        result[label] = target
    return result


def run_evaluate(config: EvaluateConfig, out_dir: Path, overwrite: bool = False) -> Path:
    """Sample, score and write records (one per prediction), report.json and report.md."""
    models = labelled(config.models, "model")
    data_sets = labelled(config.data, "data set")
    if not models or not data_sets:
        raise UsageError("evaluate needs at least one --model and one --data")
    examples = {label: load_examples(spec, config.data_format, config.limit) for label, spec in data_sets.items()}
    for label, rows in examples.items():
        missing = next((example for example in rows if not example.references), None)
        if missing is not None:
            what = "no final assistant turn" if missing.is_chat else "no reference output"
            raise UsageError(f"{missing.where or label}: example '{missing.id}' has {what}; ROUGE-L needs references")
    tokenizers = {label: load_tokenizer(name, config.loading.trust_remote_code) for label, name in models.items()}
    recorded = recorded_renderings(list(data_sets.values()))
    rows = [example for group in examples.values() for example in group]
    renderings = {  # each model's prompts by its own tokenizer, settled before any model loads
        label: resolve(config.data_format.chat_template, tokenizers[label], rows, recorded, models[label]) for label in models
    }
    writer = StageWriter.open(
        out_dir,
        stage="evaluate",
        config=to_dict(config),
        inputs={label: describe_input(spec, resolve_source(spec)) for label, spec in data_sets.items()},
        models=models,
        tokenizer=None,
        overwrite=overwrite,
        prompts={label: rendering.describe() for label, rendering in renderings.items()},
    )
    done = writer.done_ids()
    expected: dict[tuple[str, str], int] = {}
    for model_label, model_name in models.items():
        model, tokenizer = load_model_as(model_name, config.loading), tokenizers[model_label]
        for data_label, rows in examples.items():
            prompts = tokenize_prompts(rows, tokenizer, config.data_format.max_prompt_length, renderings[model_label])
            jobs = [Job(prompt, 0) for prompt in prompts]
            expected[(model_label, data_label)] = len(jobs)
            for seed in config.seeds:
                prefix = f"{model_label}|{data_label}|{seed}|"
                batches = sample_records(
                    model, tokenizer, jobs, config.sampling, seed, config.batch_size, done, f"{model_label} {data_label} s{seed}", prefix
                )
                for records in batches:
                    writer.append(_scored(record, model_label, data_label, seed) for record in records)
        del model
    report = build_report(list(iter_records(writer.records_path)), expected, models, data_sets, config)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    console.print(report_table(report))
    writer.complete()
    return out_dir


def _scored(record: dict, model_label: str, data_label: str, seed: int) -> dict:
    return {
        "id": record["id"],
        "model": model_label,
        "data": data_label,
        "seed": seed,
        "example_id": record["example_id"],
        "prompt": record["prompt"],
        "prediction": record["response"],
        "references": record["references"],
        "rougeL": 100.0 * rouge_l_max(record["response"], record["references"]),
    }


def build_report(
    records: list[dict], expected: dict[tuple[str, str], int], models: dict, data_sets: dict, config: EvaluateConfig
) -> dict:
    """Per model and data set: ROUGE-L per seed, mean and std over seeds; plus the average column.

    `expected` is the number of scored prompts per (model, data set): every seed must have
    exactly that many predictions, never fewer.
    """
    scores: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for record in records:
        scores[(record["model"], record["data"], record["seed"])].append(record["rougeL"])
    results: dict[str, dict] = {}
    for model in models:
        results[model] = {}
        for data in data_sets:
            counts = {seed: len(scores[(model, data, seed)]) for seed in config.seeds}
            if set(counts.values()) != {expected[(model, data)]}:
                raise UsageError(
                    f"{model} on {data}: predictions per seed {counts} do not match the {expected[(model, data)]} references"
                )
            per_seed = {seed: sum(scores[(model, data, seed)]) / counts[seed] for seed in config.seeds}
            mean, std = mean_and_std(list(per_seed.values()))
            results[model][data] = {"mean": mean, "std": std, "per_seed": per_seed, "examples": counts[config.seeds[0]]}
        means = [results[model][data]["mean"] for data in data_sets]
        results[model]["average"] = {"mean": sum(means) / len(means)}
    return {
        "metric": "ROUGE-L F x100 (rouge-score tokenizer, Porter stemming, max over references)",
        "seeds": list(config.seeds),
        "sampling": to_dict(config.sampling),
        "limit": config.limit,
        "models": models,
        "data": data_sets,
        "results": results,
    }


def _cell(entry: dict) -> str:
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}" if "std" in entry else f"{entry['mean']:.2f}"


def report_markdown(report: dict) -> str:
    data_sets = list(report["data"])
    lines = [
        f"# Evaluation: {report['metric']}",
        "",
        f"Seeds {', '.join(map(str, report['seeds']))}; mean ± std over seeds"
        + (f"; first {report['limit']} examples per set" if report["limit"] else "")
        + ".",
        "",
        "| model | " + " | ".join(data_sets) + " | average |",
        "|---" * (len(data_sets) + 2) + "|",
    ]
    for model, row in report["results"].items():
        lines.append(f"| {model} | " + " | ".join(_cell(row[data]) for data in data_sets) + f" | {_cell(row['average'])} |")
    return "\n".join(lines) + "\n"


def report_table(report: dict) -> Table:
    table = Table(title="ROUGE-L (mean ± std over seeds)")
    table.add_column("model")
    for data in [*report["data"], "average"]:
        table.add_column(data, justify="right")
    for model, row in report["results"].items():
        table.add_row(model, *(_cell(row[data]) for data in [*report["data"], "average"]))
    return table
