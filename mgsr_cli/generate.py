"""The `generate` stage: sample responses for a prompt set and store them with their token ids."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mgsr_cli.artifacts import StageWriter, describe_input
from mgsr_cli.chat import recorded_renderings, resolve
from mgsr_cli.config import GenerateConfig, SamplingConfig
from mgsr_cli.config_loading import to_dict
from mgsr_cli.console import progress_bar
from mgsr_cli.data import PromptTokens, load_examples, resolve_source, tokenize_prompts
from mgsr_cli.models import load_model_as, load_tokenizer, tokenizer_fingerprint
from mgsr_cli.sampling import TokenSpace, batch_seed, make_generator, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One response to sample: a prompt and which of its samples this is."""

    prompt: PromptTokens
    sample_index: int

    @property
    def record_id(self) -> str:
        return f"{self.prompt.example.id}#{self.sample_index}"


def sample_records(
    model,
    tokenizer,
    jobs: list[Job],
    sampling: SamplingConfig,
    seed: int,
    batch_size: int,
    skip: set[str] = frozenset(),
    description: str = "generate",
    id_prefix: str = "",
) -> Iterator[list[dict]]:
    """Sample every job in fixed batches and yield each batch's records.

    Batch k always holds jobs [k*batch_size, (k+1)*batch_size) and draws from its own seed,
    so a run resumed after a crash (skipping the ids in `skip`) produces the same records.
    """
    token_space = TokenSpace.of(model, tokenizer)
    device = next(model.parameters()).device
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(jobs), info="")
        produced, started = 0, time.perf_counter()
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            if all(id_prefix + job.record_id in skip for job in batch):
                progress.advance(task, len(batch))
                continue
            generator = make_generator(batch_seed(seed, start), device)
            output = sample(
                model,
                [list(job.prompt.prompt_ids) for job in batch],
                sampling,
                generator,
                token_space,
            )
            records = [
                _record(id_prefix + job.record_id, job, output.row(row), bool(output.ended_with_eos[row]), tokenizer)
                for row, job in enumerate(batch)
                if id_prefix + job.record_id not in skip
            ]
            produced += int(output.lengths.sum())
            rate = produced / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=len(batch), info=f"{rate:,.0f} tok/s")
            yield records


def _record(record_id: str, job: Job, response_ids: list[int], ended_with_eos: bool, tokenizer) -> dict:
    example = job.prompt.example
    return {
        "id": record_id,
        "example_id": example.id,
        "sample_index": job.sample_index,
        "prompt": job.prompt.text,
        "prompt_ids": list(job.prompt.prompt_ids),
        "response": tokenizer.decode(response_ids, skip_special_tokens=True),
        "response_ids": response_ids,
        "references": list(example.references),
        "finish_reason": "eos" if ended_with_eos else "length",
    }


def run_generate(config: GenerateConfig, out_dir: Path, overwrite: bool = False) -> Path:
    """Write `out_dir` with one record per (prompt, sample); resumes an unfinished run."""
    examples = load_examples(config.data, config.data_format, config.limit)
    tokenizer = load_tokenizer(config.model, config.loading.trust_remote_code)
    rendering = resolve(config.data_format.chat_template, tokenizer, examples, recorded_renderings([config.data]), config.model)
    prompts = tokenize_prompts(examples, tokenizer, config.data_format.max_prompt_length, rendering)
    model = load_model_as(config.model, config.loading)
    writer = StageWriter.open(
        out_dir,
        stage="generate",
        config=to_dict(config),
        inputs={"data": describe_input(config.data, resolve_source(config.data))},
        models={"model": config.model},
        tokenizer=tokenizer_fingerprint(tokenizer),
        overwrite=overwrite,
        prompts=rendering.describe(),
    )
    jobs = [Job(prompt, index) for prompt in prompts for index in range(config.num_samples)]
    done = writer.done_ids()
    if done:
        log.info("resuming: %d of %d records already written", len(done), len(jobs))
    for records in sample_records(model, tokenizer, jobs, config.sampling, config.seed, config.batch_size, done):
        writer.append(records)
    writer.complete(dropped_prompts=len(examples) - len(prompts))
    return out_dir
