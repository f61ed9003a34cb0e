"""Student-generated outputs (SGO) during training: which batch a step trains on, and making it.

Policies (method.md section 4): `none` (ground truth only), `on_policy` (fresh SGO every step),
`mixed:λ` (GKD: fresh SGO with probability λ), `adaptive_off_policy` (DistiLLM: probability θ
that grows when the validation loss rises, with a replay buffer), `static` (SGO read from
`generate`/`correct` outputs on disk), `once` (each example's SGO sampled the first time it is
met and reused afterwards, e.g. SeqKD's teacher outputs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from mgsr_cli.batches import Sequence, SpanSettings, make_sequence
from mgsr_cli.config import DistillConfig, ScrgOptions
from mgsr_cli.errors import UsageError
from mgsr_cli.sampling import TokenSpace, sample, token_budgets

Source = Literal["ground_truth", "fresh", "replay", "static", "once"]
POLICIES = ("none", "on_policy", "mixed", "adaptive_off_policy", "static", "once")


@dataclass(frozen=True)
class Policy:
    kind: str
    mix: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Policy":
        kind, _, parameter = text.partition(":")
        if kind not in POLICIES:
            raise UsageError(f"unknown sgo_policy '{text}': choose {', '.join(POLICIES)} (mixed as mixed:LAMBDA)")
        if kind == "mixed":
            try:
                mix = float(parameter)
            except ValueError:
                raise UsageError(f"sgo_policy '{text}': write mixed:LAMBDA with LAMBDA in [0, 1]") from None
            if not 0 <= mix <= 1:
                raise UsageError(f"sgo_policy '{text}': LAMBDA must lie in [0, 1]")
            return cls(kind, mix)
        if parameter:
            raise UsageError(f"sgo_policy '{kind}' takes no parameter")
        return cls(kind)

    @property
    def generates(self) -> bool:
        return self.kind in ("on_policy", "mixed", "adaptive_off_policy", "once")


@dataclass
class SgoState:
    """What the scheduler carries across steps (and checkpoints): θ, the last validation loss that
    moved it, the replay buffer, and the `once` memo (example id -> its SGO)."""

    theta: float
    previous_val_loss: float | None = None
    buffer: list[Sequence] = field(default_factory=list)
    memo: dict[str, Sequence] = field(default_factory=dict)
    sgo_steps: int = 0


def step_random(seed: int, step: int) -> random.Random:
    """The scheduler's randomness for one step: identical on every process, fixed by the step."""
    return random.Random(seed * 1_000_003 + step)


def choose_source(policy: Policy, state: SgoState, config: DistillConfig, step: int, total_steps: int) -> Source:
    """Which data this step's distillation terms see (method.md section 4's rule for adaptive)."""
    draw = step_random(config.seed, step).random()
    if policy.kind == "none":
        return "ground_truth"
    if policy.kind in ("on_policy", "static", "once"):
        return {"on_policy": "fresh", "static": "static", "once": "once"}[policy.kind]
    if policy.kind == "mixed":
        return "fresh" if draw < policy.mix else "ground_truth"
    decayed = state.theta * (1 - step / max(total_steps, 1))
    if draw < decayed or (draw < state.theta and len(state.buffer) < config.replay_capacity):
        return "fresh"
    if draw < state.theta and state.buffer:
        return "replay"
    return "ground_truth"


def update_theta(state: SgoState, val_loss: float, config: DistillConfig) -> None:
    """After a validation: raise θ when the loss rose by theta_threshold since the last raise."""
    if state.previous_val_loss is None:
        state.previous_val_loss = val_loss
    elif val_loss >= state.previous_val_loss + config.theta_threshold:
        state.theta = min(state.theta + config.theta_step, 1.0)
        state.previous_val_loss = val_loss


def remember(state: SgoState, sequences: list[Sequence], capacity: int) -> None:
    """Add to the replay buffer, dropping the oldest beyond capacity."""
    state.buffer.extend(sequences)
    del state.buffer[: max(len(state.buffer) - capacity, 0)]


def replay(state: SgoState, count: int, rng: random.Random) -> list[Sequence]:
    return [state.buffer[rng.randrange(len(state.buffer))] for _ in range(count)]


@dataclass
class SgoMaker:
    """Samples outputs for a batch's prompts and (optionally) revises them with SCRG."""

    config: DistillConfig
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    token_space: TokenSpace
    spans: SpanSettings | None

    @torch.no_grad()
    def make(self, prompts: list[Sequence], generator: torch.Generator) -> list[Sequence]:
        """One generated sequence per prompt (same example ids, responses replaced)."""
        samplers = self._samplers(len(prompts))
        was_training = self.student.training
        self.student.eval()
        try:
            responses = [None] * len(prompts)
            for model, indices in samplers:
                output = sample(
                    model,
                    [prompts[i].prompt_ids for i in indices],
                    self.config.sgo_sampling,
                    generator,
                    self.token_space,
                )
                for row, index in enumerate(indices):
                    responses[index] = output.row(row) or [self.token_space.eos_ids[0]]
            if self.config.scrg:
                responses = self._revise(prompts, responses, generator)
        finally:
            self.student.train(was_training)
        return [
            make_sequence(prompt.example_id, prompt.prompt_ids, response, self.tokenizer, self.spans, prompt.prompt_targets)
            for prompt, response in zip(prompts, responses)
        ]

    def _samplers(self, count: int) -> list[tuple[torch.nn.Module, list[int]]]:
        """Which model samples which rows: all student, all teacher, or half each (`both`)."""
        if self.config.sgo_model == "student":
            return [(self.student, list(range(count)))]
        if self.config.sgo_model == "teacher":
            return [(self.teacher, list(range(count)))]
        half = (count + 1) // 2
        return [(self.student, list(range(half))), (self.teacher, list(range(half, count)))]

    def _revise(self, prompts: list[Sequence], responses: list[list[int]], generator: torch.Generator) -> list[list[int]]:
        from mgsr_cli.scrg import correct_sequences

        options = ScrgOptions(
            divergence=self.config.scrg_divergence,
            teacher_token=self.config.scrg_teacher_token,
            rounds=self.config.scrg_rounds,
            sampling=self.config.sgo_sampling,
        )
        budgets = token_budgets([len(prompt.prompt_ids) for prompt in prompts], self.config.sgo_sampling)
        corrections = correct_sequences(
            self.teacher,
            self.student,
            [(prompt.prompt_ids, response) for prompt, response in zip(prompts, responses)],
            options,
            generator,
            self.token_space,
            budgets,
        )
        return [correction.response_ids for correction in corrections]
