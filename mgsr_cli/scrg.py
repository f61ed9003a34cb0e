"""SCRG, sequence correction and re-generation (method.md section 1), as a library: `correct_sequences`
drives the rounds; `scrg_scoring` finds j, `scrg_regenerate` lets the student continue after it, and
`correct.py` is the `correct` stage that runs it over a generate output.

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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mgsr_cli.config import SamplingConfig, ScrgOptions
from mgsr_cli.heads import project
from mgsr_cli.sampling import TokenSpace, left_pad, select_next_tokens, token_budgets
from mgsr_cli.scrg_regenerate import regenerate
from mgsr_cli.scrg_scoring import WindowScores, first_disagreements, score_windows


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
