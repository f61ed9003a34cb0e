"""The data `distill` trains on, and each step's batches.

A step's global batch of ground-truth sequences is fixed by (seed, step) alone; each process
takes its share, cut into grad_accum micro-batches. The SGO source decides which sequences the
distillation terms see; `StepBatches.plan_parts` pairs each batch with the objective scored on it
and the global token and pair counts its means divide by (all processes, all micro-batches).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mgsr_cli.artifacts import iter_records, read_manifest
from mgsr_cli.batches import Batch, Sequence, SpanSettings, collate, ground_truth_sequences, make_sequence
from mgsr_cli.chat import Rendering, recorded_renderings, resolve
from mgsr_cli.config import DistillConfig
from mgsr_cli.data import load_examples
from mgsr_cli.errors import UsageError
from mgsr_cli.heads import hidden_states
from mgsr_cli.models import tokenizer_fingerprint
from mgsr_cli.sgo import Policy, SgoMaker, SgoState, remember, replay
from mgsr_cli.train_setup import Objectives

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Training and dev sequences, the dev examples (for ROUGE-L), how prompts are rendered and,
    for the static policy, the stored outputs per example id."""

    train_sequences: list[Sequence]
    dev_examples: list
    dev_sequences: list[Sequence]
    rendering: Rendering
    static_pool: dict[str, list[Sequence]]


def load_training_data(config: DistillConfig, tokenizer, spans: SpanSettings | None, static: bool, teacher_template: str | None) -> TrainingData:
    examples = load_examples(config.data, config.data_format, config.limit)
    dev_examples = load_examples(config.dev_data, config.data_format, config.dev_limit) if config.dev_data else []
    rendering = resolve_rendering(config, tokenizer, examples, dev_examples, static, teacher_template)

    def sequences(rows):
        return ground_truth_sequences(rows, tokenizer, config.data_format.max_prompt_length, config.max_length, spans, rendering, config.chat_turns)

    train_sequences = sequences(examples)
    if not train_sequences:
        raise UsageError(f"training data '{config.data}' holds no example with a reference response")
    dev_sequences = sequences(dev_examples) if dev_examples else []
    static_pool = load_static_pool(config, tokenizer, spans, train_sequences) if static else {}
    return TrainingData(train_sequences, dev_examples, dev_sequences, rendering, static_pool)


def resolve_rendering(config: DistillConfig, tokenizer, examples: list, dev_examples: list, static: bool, teacher_template: str | None) -> Rendering:
    """One rendering for training, validation and SGO prompts (chat.py); the static SGO must share it.
    Prompts are rendered with the student's tokenizer; the teacher reads the same ids."""
    chat_row = next((example for example in examples if example.is_chat and not example.references), None)
    if chat_row is not None:
        raise UsageError(f"{chat_row.where}: a 'messages' training row needs a final assistant turn (the response to train on)")
    inputs = [config.data, config.dev_data, config.sgo_data if static else None]
    rendering = resolve(config.data_format.chat_template, tokenizer, examples + dev_examples, recorded_renderings(inputs), config.student)
    if config.chat_turns == "all" and not rendering.chat_template:
        raise UsageError(
            "--chat-turns all trains assistant turns, but these prompts use the papers' template "
            "(instruction rows under --chat-template auto); pass --chat-template on"
        )
    if rendering.chat_template and teacher_template != rendering.template_sha256:
        log.warning("the teacher's chat template differs from the student's; prompts are rendered with the student's")
    return rendering


def load_static_pool(config: DistillConfig, tokenizer, spans: SpanSettings | None, train_sequences: list[Sequence]) -> dict[str, list[Sequence]]:
    """A generate or correct output directory's records, by example id."""
    if not config.sgo_data:
        raise UsageError("sgo_policy static needs --sgo-data: a generate or correct output directory")
    path = Path(config.sgo_data)
    read_manifest(path, ("generate", "correct"), tokenizer_fingerprint(tokenizer))
    pool: dict[str, list[Sequence]] = {}
    ground_truth = {sequence.example_id: sequence for sequence in train_sequences}
    for record in iter_records(path / "records.jsonl"):
        same_prompt = ground_truth.get(record["example_id"])
        trained = same_prompt.prompt_targets if same_prompt and same_prompt.prompt_ids == record["prompt_ids"] else ()  # chat_turns all
        response = record["response_ids"] or [tokenizer.eos_token_id]
        sequence = make_sequence(record["example_id"], record["prompt_ids"], response, tokenizer, spans, trained)
        pool.setdefault(record["example_id"], []).append(sequence)
    covered = sum(1 for sequence in train_sequences if sequence.example_id in pool)
    if covered == 0:
        raise UsageError(f"sgo_data '{path}' holds no outputs for the training examples (ids do not match)")
    if covered < len(train_sequences):
        log.warning("sgo_data covers %d of %d training examples; the rest train on ground truth", covered, len(train_sequences))
    return pool


def global_batch(sequences: list[Sequence], batch_size: int, seed: int, step: int) -> list[Sequence]:
    """The step's ground-truth sequences: epoch-wise shuffles, fixed by (seed, step) alone."""
    count = len(sequences)
    per_epoch = math.ceil(count / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    positions = [(index * batch_size + offset) % count for offset in range(batch_size)]
    return [sequences[order[position]] for position in positions]


@dataclass
class Part:
    """One batch and the objective scored on it, with the global counts its means divide by."""

    batch: Batch
    objective: nn.Module
    teacher_hidden: Tensor | None
    token_count: int
    pair_count: int


class StepBatches:
    """This process's batches for each step and for validation, as parts ready to score."""

    def __init__(self, config: DistillConfig, accelerator, data: TrainingData, objectives: Objectives, tokenizer, teacher, sgo_maker: SgoMaker, policy: Policy):
        self.config, self.accelerator, self.data = config, accelerator, data
        self.objectives, self.combined = objectives, objectives.combined()
        self.pad_token_id, self.teacher = tokenizer.pad_token_id, teacher
        self.sgo_maker, self.policy = sgo_maker, policy
        self.device, self.world = accelerator.device, accelerator.num_processes

    def _check_batch_geometry(self) -> int:
        """Sequences per process per micro-batch; the global batch must split evenly."""
        share, remainder = divmod(self.config.batch_size, self.world * self.config.grad_accum)
        if remainder or share == 0:
            raise UsageError(
                f"batch_size {self.config.batch_size} does not split into {self.world} processes x {self.config.grad_accum} micro-batches"
            )
        return share

    def micro_batches(self, step: int) -> list[list[Sequence]]:
        """This process's share of the global batch, cut into grad_accum micro-batches."""
        share = self._check_batch_geometry()
        per_process = share * self.config.grad_accum
        rank = self.accelerator.process_index
        batch = global_batch(self.data.train_sequences, self.config.batch_size, self.config.seed, step)
        mine = batch[rank * per_process : (rank + 1) * per_process]
        return [mine[i * share : (i + 1) * share] for i in range(self.config.grad_accum)]

    def distill_sequences(self, source: str, micro: list[Sequence], state: SgoState, generator: torch.Generator, rng) -> list[Sequence]:
        """The sequences the distillation terms see for one micro-batch, by SGO source."""
        if source == "ground_truth":
            return micro
        if source == "fresh":
            made = self.sgo_maker.make(micro, generator)
            if self.policy.kind == "adaptive_off_policy":
                remember(state, made, self.config.replay_capacity)
            return made
        if source == "replay":
            return replay(state, len(micro), rng)
        if source == "static":
            pool = self.data.static_pool
            return [rng.choice(pool[seq.example_id]) if seq.example_id in pool else seq for seq in micro]
        missing = [seq for seq in micro if seq.example_id not in state.memo]
        for made in self.sgo_maker.make(missing, generator) if missing else []:
            state.memo[made.example_id] = made
        return [state.memo[seq.example_id] for seq in micro]

    def plan_parts(self, ground_truth: list[list[Sequence]], distill: list[list[Sequence]]) -> list[list[Part]]:
        """Per micro-batch, the (batch, objective) parts to score, each with its global counts.

        One part when every term reads the same batch (the scheduler chose the ground truth,
        sft_on_sgo, or the spec has only sft or only distillation terms); else `sft` on the
        ground truth and the distillation terms on the generated batch.
        """
        objectives = self.objectives
        same = all(d is g for d, g in zip(distill, ground_truth))
        if same or self.config.sft_on_sgo or objectives.sft is None or objectives.distill is None:
            reads_ground_truth = objectives.distill is None and not self.config.sft_on_sgo
            batches = self._collated(ground_truth if reads_ground_truth else distill)
            tokens, pairs = self._global_counts(batches)
            return [[self.part(batch, tokens, pairs)] for batch in batches]
        gt_batches, sgo_batches = self._collated(ground_truth), self._collated(distill)
        gt_tokens, _ = self._global_counts(gt_batches)
        tokens, pairs = self._global_counts(sgo_batches)
        return [
            [Part(gt, objectives.sft, None, gt_tokens, 0), Part(sgo, objectives.distill, self._teacher_rows(sgo), tokens, pairs)]
            for gt, sgo in zip(gt_batches, sgo_batches)
        ]

    def dev_batches(self) -> tuple[list[Batch], int, int]:
        """This process's share of the dev ground truth, with the global (token, pair) counts."""
        mine = self.data.dev_sequences[self.accelerator.process_index :: self.world]
        size = max(self.config.batch_size // self.world, 1)
        batches = self._collated([mine[i : i + size] for i in range(0, len(mine), size)])
        return (batches, *self._global_counts(batches))

    def part(self, batch: Batch, token_count: int, pair_count: int) -> Part:
        """`batch` under the whole objective."""
        return Part(batch, self.combined, self._teacher_rows(batch), token_count, pair_count)

    def _collated(self, lists: list[list[Sequence]]) -> list[Batch]:
        return [collate(sequences, self.pad_token_id).to(self.device) for sequences in lists]

    def _global_counts(self, batches: list[Batch]) -> tuple[int, int]:
        local = torch.tensor(
            [sum(batch.num_rows for batch in batches), sum(int(batch.pairs.shape[0]) for batch in batches)], device=self.device
        )
        total = self.accelerator.reduce(local, reduction="sum")
        return int(total[0]), int(total[1])

    @torch.no_grad()
    def _teacher_rows(self, batch: Batch) -> Tensor | None:
        """The teacher's final hidden states at the scored rows; None when no term reads the teacher."""
        if not self.objectives.needs_teacher:
            return None
        hidden, _ = hidden_states(self.teacher, batch.input_ids, batch.attention_mask)
        return hidden[batch.rows[:, 0], batch.rows[:, 1]]
