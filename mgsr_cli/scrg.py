"""SCRG, sequence correction and re-generation (method.md section 1): a library and the `correct` stage.

For each student response y^s: teacher-force prompt + y^s through teacher and student, take the
teacher's proposal y^t_i (sampled from p_i or its argmax) and the divergence d_i at every response
position, pick j = argmax d_i over the eligible positions (y^t_i != y^s_i), keep y^s_<j, put y^t_j
at j and let the student sample the rest.

Choices where method.md leaves room:
- Eligible positions are real response tokens up to and including the first EOS: the student's
  decision to stop is a decision the teacher may overrule. Tokens after the first EOS and padding
  never count, nor positions whose revision would not fit in the token budget.
- Budget: the revised response has at most as many tokens as the re-generation's sampling config
  allows for its prompt (`token_budgets`: max_new_tokens, capped by max_length), the budget of
  the generation that made y^s unless overridden. An unchanged response is kept as it is.
- Rounds: round r > 1 re-scores the revised sequence and only considers the positions after the
  previous round's j (the prefix has been judged already; the suffix is new). A sequence stops
  early when a round finds no eligible position. The record's `error_position`, `divergence`,
  `student_token` and `teacher_token` are the first round's, i.e. relative to the original
  response (`response_ids[:j] == original_response_ids[:j]`); `corrections` lists every round.
- Speed: one batched forward per model and round; the distributions are projected only at the
  window positions, in chunks; sampled teacher proposals are drawn lazily, from the largest d_i
  down, until one differs from the student's token (the same distribution of j and y^t_j as
  drawing all of them); the student's cache from its scoring forward is cut to each row's kept
  prefix and re-aligned to the right edge, so re-generation does not re-encode that prefix. Where
  that would not be exact (a sliding-window layer that has already dropped columns because the
  inputs are longer than its window), the kept prefix is encoded again instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor

from mgsr_cli.artifacts import StageWriter, describe_input, iter_records, read_manifest, read_stage
from mgsr_cli.config import CorrectConfig, SamplingConfig, ScrgOptions, from_dict, override, to_dict
from mgsr_cli.console import console, progress_bar
from mgsr_cli.errors import UsageError
from mgsr_cli.heads import hidden_states, project
from mgsr_cli.kv_cache import reusable, select_positions
from mgsr_cli.models import check_same_vocabulary, load_model, load_tokenizer, resolve_device, resolve_dtype
from mgsr_cli.preflight import preflight
from mgsr_cli.sampling import (
    Continuations,
    TokenSpace,
    batch_seed,
    continue_sampling,
    forward_step,
    left_pad,
    make_generator,
    position_ids_from_mask,
    select_next_tokens,
    token_budgets,
)

log = logging.getLogger(__name__)

INPUT_STAGES = ("generate", "correct")
# Logit elements per scoring chunk (per model): 2^22 floats = 16 MiB, ~80 positions at V = 50k.
# Measured fastest on CPU: larger chunks fault in more fresh memory than they gain in the matmul.
CHUNK_ELEMENTS = 1 << 22
HISTOGRAM_BINS = 10


@dataclass(frozen=True)
class CorrectionStep:
    """One correction: response position j (0 = first response token), d_j, y^s_j and y^t_j."""

    position: int
    divergence: float
    student_token: int
    teacher_token: int


@dataclass
class Correction:
    """One sequence's outcome: the revised response (the original one when unchanged) and the
    corrections applied to it, first round first."""

    original_ids: list[int]
    response_ids: list[int]
    steps: list[CorrectionStep] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.steps)


@dataclass
class _Window:
    """The response positions [start, end) a round may choose from, for one sequence."""

    row: int
    start: int
    end: int


@dataclass
class _Setup:
    """What every round needs besides the sequences (the arguments of `correct_sequences`)."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    options: ScrgOptions
    generator: torch.Generator | None
    token_space: TokenSpace

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def correct_sequences(
    teacher,
    student,
    sequences: list[tuple[list[int], list[int]]],
    options: ScrgOptions,
    generator: torch.Generator | None,
    token_space: TokenSpace,
    budgets: list[int] | None = None,
) -> list[Correction]:
    """SCRG on a batch of (prompt_ids, response_ids): one `Correction` per sequence, in order.

    Models should be in eval mode and share the first `token_space.vocab_size` output rows' meaning. The
    student re-generates with `options.sampling`; a revised response has at most budgets[b]
    tokens (default: what `options.sampling` allows for the prompt). `generator` (on the student's
    device) is the only source of randomness: teacher proposals are drawn first, then the
    re-generation, round by round, so a batch is reproducible from its seed.
    """
    setup = _Setup(teacher, student, options, generator, token_space)
    prompts = [list(prompt) for prompt, _ in sequences]
    budgets = budgets if budgets is not None else token_budgets([len(prompt) for prompt in prompts], options.sampling)
    corrections = [Correction(list(response), list(response)) for _, response in sequences]
    starts = [max(0, 1 - len(prompt)) for prompt in prompts]  # an empty prompt does not predict position 0
    pending = list(range(len(sequences)))
    for _ in range(options.rounds):
        windows = [_Window(row, starts[row], eligible_end(corrections[row].response_ids, budgets[row], token_space.eos_ids)) for row in pending]
        windows = [window for window in windows if window.start < window.end]
        if not windows:
            break
        revised = _correct_round(setup, prompts, [corrections[window.row].response_ids for window in windows], windows, budgets)
        for row, step, response in revised:
            corrections[row].steps.append(step)
            corrections[row].response_ids = response
            starts[row] = step.position + 1
        pending = [row for row, _, _ in revised]
    return corrections


def eligible_end(response: list[int], budget: int, eos_ids: tuple[int, ...]) -> int:
    """One past the last position SCRG may change: the first EOS included, nothing after it,
    and only positions whose revision (kept prefix + teacher token) fits in `budget` tokens."""
    eos = set(eos_ids)
    end = next((index + 1 for index, token in enumerate(response) if token in eos), len(response))
    return min(end, budget)


def _correct_round(
    setup: _Setup, prompts: list[list[int]], responses: list[list[int]], windows: list[_Window], budgets: list[int]
) -> list[tuple[int, CorrectionStep, list[int]]]:
    """Score every window, find j, re-generate: (sequence index, step, revised response) per changed window."""
    # the token at end - 1 is never needed as input: it predicts nothing inside the window
    inputs = [prompts[window.row] + response[: window.end - 1] for window, response in zip(windows, responses)]
    input_ids, attention_mask = left_pad(inputs, setup.token_space.pad_id, setup.device)
    sizes = torch.tensor([window.end - window.start for window in windows], device=setup.device)
    scores = score_windows(setup.teacher, setup.student, input_ids, attention_mask, sizes, setup.options.divergence, setup.token_space.vocab_size)
    student_tokens = torch.full(scores.divergence.shape, setup.token_space.pad_id, device=setup.device)
    in_window = torch.arange(student_tokens.shape[1], device=setup.device) < sizes[:, None]
    window_tokens = [token for window, response in zip(windows, responses) for token in response[window.start : window.end]]
    student_tokens[in_window] = torch.tensor(window_tokens, device=setup.device)
    errors = _find_errors(setup, scores, sizes, student_tokens, windows)
    revised = [responses[index][: step.position] + [step.teacher_token] for index, step in errors]
    rooms = [budgets[windows[index].row] - len(response) for (index, _), response in zip(errors, revised)]
    going_on = [k for k, (_, step) in enumerate(errors) if rooms[k] > 0 and step.teacher_token not in setup.token_space.eos_ids]
    if going_on:
        rows = [errors[k][0] for k in going_on]
        kept = [len(prompts[windows[row].row]) + errors[k][1].position for row, k in zip(rows, going_on)]  # prompt + y^s_<j
        continuation = regenerate(
            setup.student,
            scores.student_cache,
            input_ids,
            attention_mask.sum(dim=1),
            torch.tensor(rows, device=setup.device),
            torch.tensor(kept, device=setup.device),
            torch.tensor([errors[k][1].teacher_token for k in going_on], device=setup.device),
            [rooms[k] for k in going_on],
            setup.options.sampling,
            setup.generator,
            setup.token_space,
        )
        for slot, k in enumerate(going_on):
            revised[k] += continuation.row(slot)
    return [(windows[index].row, step, response) for (index, step), response in zip(errors, revised)]


def _find_errors(
    setup: _Setup, scores: WindowScores, sizes: Tensor, student_tokens: Tensor, windows: list[_Window]
) -> list[tuple[int, CorrectionStep]]:
    """(window index, step) for each window with an eligible position: j and the teacher's token there."""
    proposal = SamplingConfig(temperature=1.0 if setup.options.teacher_token == "sample" else 0.0)

    def propose(rows: Tensor, slots: Tensor) -> Tensor:
        logits = project(setup.teacher, scores.teacher_hidden[rows, scores.columns[rows, slots]], setup.token_space.vocab_size)
        return select_next_tokens(torch.log_softmax(logits, -1, dtype=torch.float32).to(setup.device), proposal, setup.generator)

    found, slots, teacher_tokens = first_disagreements(scores.divergence, sizes, student_tokens, propose)
    rows = found.nonzero().squeeze(1).tolist()
    return [
        (row, CorrectionStep(windows[row].start + slot, float(scores.divergence[row, slot]), int(student_tokens[row, slot]), token))
        for row, slot, token in zip(rows, slots[rows].tolist(), teacher_tokens[rows].tolist())
    ]


@dataclass
class WindowScores:
    """divergence: [B, S] d_i at slot s = window position start + s (-inf past the window);
    columns: [B, S] the column of the hidden state that predicts each slot;
    teacher_hidden: [B, W, H]; student_cache: the student's cache over the same inputs, None where
    it is not `kv_cache.reusable` (re-generation then encodes the kept prefix again)."""

    divergence: Tensor
    columns: Tensor
    teacher_hidden: Tensor
    student_cache: object


def score_windows(
    teacher, student, input_ids: Tensor, attention_mask: Tensor, sizes: Tensor, divergence: str, vocab_size: int
) -> WindowScores:
    """One forward per model over left-padded inputs whose row b ends with the sizes[b] hidden
    states that predict its window (row = prompt + response[:end - 1]); d_i at those positions
    only, projected in chunks, never [B, W, V]."""
    device = input_ids.device
    teacher_device = next(teacher.parameters()).device
    position_ids = position_ids_from_mask(attention_mask)
    teacher_inputs = (tensor.to(teacher_device) for tensor in (input_ids, attention_mask, position_ids))
    teacher_hidden, _ = hidden_states(teacher, *teacher_inputs)
    student_hidden, cache = hidden_states(student, input_ids, attention_mask, position_ids, use_cache=True)
    in_window = torch.arange(int(sizes.max()), device=device) < sizes[:, None]
    columns = input_ids.shape[1] - sizes[:, None] + torch.arange(in_window.shape[1], device=device)
    rows, flat_columns = in_window.nonzero(as_tuple=True)[0], columns[in_window]
    chunk = min(max(1, CHUNK_ELEMENTS // vocab_size), len(rows))
    scratch = (torch.empty((chunk, vocab_size), device=device), torch.empty((chunk, vocab_size), device=device))
    values = []
    for begin in range(0, len(rows), chunk):
        row, column = rows[begin : begin + chunk], flat_columns[begin : begin + chunk]
        teacher_logits = project(teacher, teacher_hidden[row.to(teacher_device), column.to(teacher_device)], vocab_size).to(device)
        student_logits = project(student, student_hidden[row, column], vocab_size)
        values.append(token_divergence(divergence, teacher_logits, student_logits, scratch))
    scores = torch.full(in_window.shape, float("-inf"), device=device)
    scores[in_window] = torch.cat(values)
    return WindowScores(scores, columns.clamp(min=0), teacher_hidden, cache if reusable(cache) else None)


def token_divergence(kind: str, teacher_logits: Tensor, student_logits: Tensor, scratch: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """d_i [N] for [N, V] logits, in float32: fkl KL(p||q), rkl KL(q||p), js ½KL(p||m) + ½KL(q||m).

    The loss library's values (a test checks it), computed without autograd and in place: this
    runs on every response token. `scratch`: two float32 buffers of at least [N, V] to reuse
    over chunks; fresh V-wide allocations per chunk make the CPU allocator return memory and
    fault it in again, which costs more than the arithmetic. Logits must be finite.
    """
    rows = teacher_logits.shape[0]
    log_p_out, log_q_out = (buffer[:rows] for buffer in scratch) if scratch is not None else (None, None)
    log_p = torch.log_softmax(teacher_logits, -1, dtype=torch.float32, out=log_p_out)
    log_q = torch.log_softmax(student_logits, -1, dtype=torch.float32, out=log_q_out)
    if kind == "fkl":
        return _kl_in_place(log_p, log_q)
    if kind == "rkl":
        return _kl_in_place(log_q, log_p)
    log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
    return 0.5 * (_kl_in_place(log_p, log_m.clone()) + _kl_in_place(log_q, log_m))


def _kl_in_place(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_k a_k (log a_k - log b_k) per row; overwrites both arguments."""
    torch.sub(log_a, log_b, out=log_b)
    return torch.linalg.vecdot(log_a.exp_(), log_b)


def first_disagreements(
    divergence: Tensor, sizes: Tensor, student_tokens: Tensor, propose: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """j per row: the slot with the largest d among those where the teacher's proposal differs
    from the student's token. found [B] bool, slot [B], teacher token [B] (0 where not found).

    Proposals are drawn lazily: each row's slots are visited from the largest d down (ties: the
    earlier slot first) and `propose(rows, slots)` is asked only until a row has a disagreement.
    Since proposals at different positions are independent, this picks j with exactly the
    distribution of drawing every proposal first, at the cost of about one draw per row instead
    of one per token. Ranks are visited in blocks of 1, 2, 4, ... per row still searching.
    """
    rows_total, width = divergence.shape
    device = divergence.device
    order = divergence.argsort(dim=1, descending=True, stable=True)  # -inf (past the window) last
    found = torch.zeros(rows_total, dtype=torch.bool, device=device)
    slots = torch.zeros(rows_total, dtype=torch.long, device=device)
    tokens = torch.zeros(rows_total, dtype=torch.long, device=device)
    low, block = 0, 1
    while low < width:
        ranks = torch.arange(low, min(low + block, width), device=device)
        live = ~found[:, None] & (ranks < sizes[:, None])
        if not bool(live.any()):
            break
        rows, cells = live.nonzero(as_tuple=True)
        candidate_slots = order[rows, ranks[cells]]
        proposals = propose(rows, candidate_slots)
        hits = torch.zeros_like(live)
        hits[rows, cells] = proposals != student_tokens[rows, candidate_slots]
        drawn = torch.zeros(live.shape, dtype=torch.long, device=device)
        drawn[rows, cells] = proposals
        new = hits.any(dim=1)
        first = hits.long().argmax(dim=1)  # the first hit in rank order
        slots[new] = order[new, low + first[new]]
        tokens[new] = drawn[new, first[new]]
        found |= new
        low, block = low + block, block * 2
    return found, slots, tokens


def regenerate(
    student,
    cache,
    input_ids: Tensor,
    lengths: Tensor,
    rows: Tensor,
    keep: Tensor,
    teacher_tokens: Tensor,
    budgets: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    token_space: TokenSpace,
) -> Continuations:
    """Let the student continue row rows[b] of a teacher-forced pass after its first keep[b] tokens
    and teacher_tokens[b], with up to budgets[b] new tokens (see `resume_after_prefix`). The
    result is what sampling after encoding prompt + prefix + teacher token would give, with the
    same generator state. The cache is consumed."""
    next_logits, cache, attention_mask = resume_after_prefix(student, cache, input_ids, lengths, rows, keep, teacher_tokens)
    return continue_sampling(
        student, next_logits, cache, attention_mask, keep + 1, budgets, sampling, generator, token_space
    )


def resume_after_prefix(
    student, cache, input_ids: Tensor, lengths: Tensor, rows: Tensor, keep: Tensor, teacher_tokens: Tensor
) -> tuple[Tensor, object, Tensor]:
    """(next-token logits [B', V'], cache, attention mask) after row rows[b]'s first keep[b] tokens
    and teacher_tokens[b], the kept prefixes moved to the right edge of max(keep) columns.

    input_ids / cache: the student's left-padded inputs and its cache over them (or None), row r
    holding lengths[r] real tokens at its right edge (position ids from 0 at the first real
    token). Where the cache holds every column (`kv_cache.reusable`), the prefix is not encoded
    again; otherwise (a sliding window shorter than the inputs, an unknown layer type) it is.
    """
    width, new_width = input_ids.shape[1], int(keep.max())
    columns = torch.arange(new_width, device=keep.device)
    first = width - lengths[rows] + keep - new_width  # source column of each row's new column 0
    source = (first[:, None] + columns).clamp(min=0)
    attention_mask = (columns >= new_width - keep[:, None]).long()
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
    if cache is not None and reusable(cache):
        select_positions(cache, rows, source)
        next_logits, cache = forward_step(student, teacher_tokens[:, None], attention_mask, keep[:, None], cache)
    else:
        prefix = torch.cat([input_ids[rows[:, None], source], teacher_tokens[:, None]], dim=1)
        next_logits, cache = forward_step(student, prefix, attention_mask, position_ids_from_mask(attention_mask))
    return next_logits, cache, attention_mask


# ----------------------------------------------------------------------------------------------
# The `correct` stage
# ----------------------------------------------------------------------------------------------


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
