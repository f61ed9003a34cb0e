"""The `correct` stage: SCRG (`scrg.correct_sequences`) over a generate or correct output
directory, one revised record per input record, in fixed seeded batches so a resumed run writes
the same records; a summary of what changed (share, error-position histogram, mean d_j)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from mgsr_cli.artifacts import StageWriter, describe_input, iter_records, read_manifest, read_stage
from mgsr_cli.config import CorrectConfig, SamplingConfig, ScrgOptions
from mgsr_cli.config_loading import from_dict, override, to_dict
from mgsr_cli.console import console, progress_bar
from mgsr_cli.errors import UsageError
from mgsr_cli.models import check_same_vocabulary, load_model, load_tokenizer, resolve_device, resolve_dtype
from mgsr_cli.preflight import preflight
from mgsr_cli.sampling import TokenSpace, batch_seed, make_generator
from mgsr_cli.scrg import Correction, correct_sequences

log = logging.getLogger(__name__)

INPUT_STAGES = ("generate", "correct")
HISTOGRAM_BINS = 10


def correct_config(input_dir: Path, teacher: str, student: str, changes: dict) -> CorrectConfig:
    """The stage config: the input's recorded generation config as the re-generation's default,
    then `changes` (the flags given) on top."""
    config = read_manifest(input_dir, INPUT_STAGES).get("config", {})
    recorded = config["scrg"].get("sampling", {}) if "scrg" in config else config.get("sampling", {})  # correct | generate
    sampling = from_dict(SamplingConfig, recorded, f"'{input_dir}' manifest: sampling")
    return override(CorrectConfig(teacher=teacher, student=student, scrg=ScrgOptions(sampling=sampling)), changes, "flag")


def run_correct(config: CorrectConfig, input_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write `out_dir` with one corrected record per input record; resumes an unfinished run."""
    if config.scrg.rounds < 1 or config.batch_size < 1:
        raise UsageError("--rounds and --batch-size must be at least 1")
    trust = config.loading.trust_remote_code
    tokenizer = load_tokenizer(config.student, trust)
    fingerprint = check_same_vocabulary(load_tokenizer(config.teacher, trust), tokenizer)
    manifest, records = read_stage(input_dir, INPUT_STAGES, tokenizer=fingerprint, vocab_size=len(tokenizer))
    device = resolve_device(config.loading.device)
    dtype = resolve_dtype(config.loading.dtype, device)
    teacher, student = (load_model(name, dtype, device, trust) for name in (config.teacher, config.student))
    preflight({"teacher": teacher, "student": student}, TokenSpace.of(student, tokenizer), scrg_student=student)
    inputs = {"input": describe_input(str(input_dir), Path(input_dir))}
    writer = StageWriter.open(
        out_dir,
        stage="correct",
        config=to_dict(config),
        inputs=inputs,
        models={"teacher": config.teacher, "student": config.student},
        tokenizer=fingerprint,
        overwrite=overwrite,
        prompts=manifest.get("prompts"),  # correct re-uses the input's prompt ids: rendered as they were
    )
    if writer.manifest["inputs"]["input"]["sha256"] != inputs["input"]["sha256"]:
        raise UsageError(f"output directory '{out_dir}' holds an unfinished 'correct' run of other input records; pass --overwrite")
    done = writer.done_ids()
    if done:
        log.info("resuming: %d of %d records already written", len(done), len(records))
    started, counts = time.perf_counter(), {"scored": 0, "regenerated": 0}
    for batch in _corrected_batches(teacher, student, tokenizer, records, config, done, counts):
        writer.append(batch)
    summary = summarize(list(iter_records(writer.records_path)), time.perf_counter() - started, counts)
    print_summary(summary)
    writer.complete(summary=summary)
    return out_dir


def _corrected_batches(
    teacher, student, tokenizer, records: list[dict], config: CorrectConfig, skip: set[str], counts: dict
) -> Iterator[list[dict]]:
    """Correct the records in fixed batches, each with its own seed (as `generate`), so a resumed
    run produces the same records; `counts` accumulates scored and re-generated tokens."""
    token_space = TokenSpace.of(student, tokenizer)
    device = next(student.parameters()).device
    with progress_bar() as progress:
        task = progress.add_task("correct", total=len(records), info="")
        started, changed, finished = time.perf_counter(), 0, 0
        for start in range(0, len(records), config.batch_size):
            batch = records[start : start + config.batch_size]
            if all(record["id"] in skip for record in batch):
                progress.advance(task, len(batch))
                continue
            corrections = correct_sequences(
                teacher, student, [(record["prompt_ids"], record["response_ids"]) for record in batch], config.scrg,
                make_generator(batch_seed(config.seed, start), device), token_space,
            )
            counts["scored"] += sum(len(record["response_ids"]) for record in batch)
            counts["regenerated"] += sum(_regenerated_tokens(correction) for correction in corrections)
            changed, finished = changed + sum(c.changed for c in corrections), finished + len(batch)
            rate = counts["scored"] / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=len(batch), info=f"{rate:,.0f} tok/s, {changed}/{finished} changed")
            yield [
                _record(record, correction, tokenizer, token_space.eos_ids)
                for record, correction in zip(batch, corrections)
                if record["id"] not in skip
            ]


def _regenerated_tokens(correction: Correction) -> int:
    return len(correction.response_ids) - correction.steps[0].position - 1 if correction.changed else 0


def _record(source: dict, correction: Correction, tokenizer, eos_ids: tuple[int, ...]) -> dict:
    """A drop-in `generate` record holding the revised response, plus what SCRG did."""
    first = correction.steps[0] if correction.changed else None
    ends_with_eos = bool(correction.response_ids) and correction.response_ids[-1] in eos_ids
    return {
        "id": source["id"],
        "example_id": source.get("example_id"),
        "sample_index": source.get("sample_index"),
        "prompt": source.get("prompt"),
        "prompt_ids": source["prompt_ids"],
        "response": tokenizer.decode(correction.response_ids, skip_special_tokens=True) if first else source["response"],
        "response_ids": correction.response_ids,
        "references": source.get("references", []),
        "finish_reason": ("eos" if ends_with_eos else "length") if first else source.get("finish_reason"),
        "original_response": source["response"],
        "original_response_ids": correction.original_ids,
        "changed": correction.changed,
        "error_position": first.position if first else None,
        "divergence": first.divergence if first else None,
        "student_token": first.student_token if first else None,
        "teacher_token": first.teacher_token if first else None,
        "corrections": [asdict(step) for step in correction.steps],
    }


def summarize(records: list[dict], seconds: float, counts: dict) -> dict:
    """Share changed, histogram of j / original length, mean d_j (over all records written);
    tokens/s: input response tokens scored per second by this run."""
    changed = [record for record in records if record["changed"]]
    histogram = [0] * HISTOGRAM_BINS
    for record in changed:
        relative = record["error_position"] / len(record["original_response_ids"])
        histogram[min(int(relative * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    return {
        "sequences": len(records),
        "changed": len(changed),
        "changed_share": len(changed) / max(len(records), 1),
        "mean_divergence": sum(record["divergence"] for record in changed) / len(changed) if changed else None,
        "relative_error_position_histogram": histogram,
        "scored_tokens": counts["scored"],
        "regenerated_tokens": counts["regenerated"],
        "seconds": round(seconds, 3),
        "tokens_per_second": counts["scored"] / max(seconds, 1e-9),
    }


def print_summary(summary: dict) -> None:
    """The summary on stderr: a line of totals and the error-position histogram as text bars."""
    mean = summary["mean_divergence"]
    console.print(
        f"correct: {summary['changed']}/{summary['sequences']} sequences changed ({summary['changed_share']:.0%}), "
        f"mean d_j {'n/a' if mean is None else f'{mean:.3g}'}, {summary['tokens_per_second']:,.0f} tok/s scored "
        f"in {summary['seconds']:.1f} s, {summary['regenerated_tokens']} tokens re-generated"
    )
    table = Table(title="error position j / response length", title_justify="left")
    table.add_column("j / length")
    table.add_column("sequences", justify="right")
    table.add_column("")
    largest = max(summary["relative_error_position_histogram"], default=0) or 1
    for index, count in enumerate(summary["relative_error_position_histogram"]):
        low, high = index / HISTOGRAM_BINS, (index + 1) / HISTOGRAM_BINS
        table.add_row(f"[{low:.1f}, {high:.1f})", str(count), "█" * round(20 * count / largest))
    console.print(table)
