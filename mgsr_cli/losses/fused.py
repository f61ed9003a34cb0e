"""The fused pass: any weighted sum of terms from one shared log-softmax per block of rows.

Scored term by term, a spec such as `sft,dac_kl,span` made each term take its own
log-softmax of the same rows, forward and again backward, and keep its own V-wide
intermediates. Here the rows of a chunk are cut into blocks of about BLOCK_ENTRIES
logits (never splitting a span pair); per block, the teacher's and the student's floored
log-softmax are computed once (`SharedLogProbs`) and every term reads them through its
`from_log_probs` (sft gathers its target, the divergences and DAC-KL's band sums use them
directly, span exponentiates only its pairs' rows). Their gradients with respect to the
shared student log-probabilities add up, and the log-softmax's backward runs once
(`FlooredLogSoftmax`). A term without `from_log_probs` (rank) is called on the block's
logits as before.

The block's gradient is taken at once, in the forward (`_EagerGradient`), so only one
block's V-wide intermediates are ever alive, and backward only scales the kept gradient:
the memory of a chunk is its logits, their gradient and one block of temporaries.
Values and gradients equal the per-term path (`Objective(fused=False)`), which stays the
reference: tests/losses/test_fused.py compares them in float64. Floored log 0 is the one
difference: a student entry with teacher probability 0 but q > 0 gives rkl-style terms
q (log q - LOG_FLOOR) instead of +inf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import Rows, SharedLogProbs, TermOutput
from .dac_band import floored_log_probs, floored_log_softmax
from .divergences import compute_dtype

# Logits per block: 4 MiB of float32 per [rows, V] temporary, as the divergences' row blocks. Against
# 16 MiB blocks, the mgsr recipe's bench step kept its time (1.39 and 1.26 s against 1.42 and 1.30 s)
# at a lower peak (965 and 940 MiB against 1,039 and 966). Span pairs are never split, so rows
# chained by adjacent pairs form one block whatever this is.
BLOCK_ENTRIES = 1 << 20


@dataclass
class BlockScores:
    """What the blocks of one chunk report besides the loss, detached; see objective.RowScore."""

    per_token: list[Tensor] = field(default_factory=list)
    terms: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)

    def add(self, score) -> None:
        self.per_token.append(score.per_token.detach())
        for name, value in score.terms.items():
            self.terms[name] = self.terms.get(name, 0) + value
        for name, value in score.stats.items():
            self.stats[name] = self.stats.get(name, 0) + value


def row_blocks_of(rows: Rows) -> list[tuple[int, int]]:
    """[start, end) blocks of about BLOCK_ENTRIES logits over `rows`, never splitting a span pair."""
    from .objective import plan_chunks

    return plan_chunks(rows.num_rows, max(1, BLOCK_ENTRIES // max(rows.student_logits.shape[-1], 1)), rows.pairs)


def fused_score(objective, rows: Rows, token_count: int, pair_count: int):
    """objective.RowScore of one chunk of rows, every term fed from shared log-probabilities.

    Differentiable in rows.student_logits and the objective's parameters (DAC-KL's f_sub)
    when grad mode is on; their gradients are computed block by block right here.
    """
    from .objective import RowScore, pairs_within

    blocks = row_blocks_of(rows)
    reports = BlockScores()

    def score_block(start: int, end: int, student_logits: Tensor):
        block = Rows(
            student_logits,
            rows.teacher_logits[start:end].detach(),
            rows.targets[start:end] if rows.targets is not None else None,
            pairs_within(rows.pairs, start, end),
        )
        score = objective.score_outputs(block, term_outputs(objective, block), token_count, pair_count)
        reports.add(score)
        return score.loss

    parameters = [parameter for parameter in objective.parameters() if parameter.requires_grad]
    if torch.is_grad_enabled() and (rows.student_logits.requires_grad or parameters):
        loss = _EagerGradient.apply(score_block, blocks, rows.student_logits, *parameters)
    else:
        with torch.no_grad():
            loss = sum(score_block(start, end, rows.student_logits[start:end]) for start, end in blocks)
    return RowScore(loss=loss, per_token=torch.cat(reports.per_token), terms=reports.terms, stats=reports.stats)


def term_outputs(objective, block: Rows) -> list[TermOutput]:
    """Each term's output on one block, from one shared log-softmax per view of the logits."""
    terms = [term for term, _ in objective.weighted_terms]
    temperature = objective.temperature
    student_logits = block.student_logits
    dtype = compute_dtype(student_logits, block.teacher_logits)
    uses_raw = any(not getattr(term, "uses_temperature", True) for term in terms)
    uses_scaled = any(getattr(term, "uses_temperature", True) for term in terms)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        raw_student = teacher = None
        if uses_raw or (uses_scaled and temperature == 1.0):
            raw_student = floored_log_softmax(student_logits, dtype)
        scaled_student = raw_student
        if uses_scaled and temperature != 1.0:
            scaled_student = floored_log_softmax(student_logits / temperature, dtype)
        if any(getattr(term, "uses_teacher", True) for term in terms):
            teacher = floored_log_probs(block.teacher_logits / temperature, dtype)
        shared = SharedLogProbs(scaled_student, teacher, raw_student, block.targets, block.pairs)
        return [_output(term, shared, block, temperature) for term in terms]


def _output(term, shared: SharedLogProbs, block: Rows, temperature: float) -> TermOutput:
    if hasattr(term, "from_log_probs"):
        return term.from_log_probs(shared)
    if getattr(term, "uses_temperature", True) and temperature != 1.0:
        block = Rows(block.student_logits / temperature, block.teacher_logits / temperature, block.targets, block.pairs)
    return term(block)


class _EagerGradient(torch.autograd.Function):
    """The chunk's loss, its gradient taken block by block in forward; backward scales it.

    score_block(start, end, student_logits_block) -> the block's share of the loss.
    """

    @staticmethod
    def forward(
        ctx,
        score_block: Callable[[int, int, Tensor], Tensor],
        blocks: list[tuple[int, int]],
        student_logits: Tensor,
        *parameters: Tensor,
    ) -> Tensor:
        wants_logits = ctx.needs_input_grad[2]
        grad_logits = torch.zeros_like(student_logits) if wants_logits else None
        grad_parameters = [torch.zeros_like(parameter) for parameter in parameters]
        total = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
        with torch.enable_grad():
            for start, end in blocks:
                block_logits = student_logits[start:end].detach().requires_grad_(wants_logits)
                loss = score_block(start, end, block_logits)
                leaves = ([block_logits] if wants_logits else []) + list(parameters)
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                    if wants_logits:
                        grad_logits[start:end] = grads[0]
                        grads = grads[1:]
                    for kept, grad in zip(grad_parameters, grads):
                        if grad is not None:
                            kept += grad
                total += loss.detach().to(total.dtype)
        ctx.wants_logits = wants_logits
        ctx.save_for_backward(grad_logits if wants_logits else torch.empty(0), *grad_parameters)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_logits, *grad_parameters = ctx.saved_tensors
        scale = lambda grad: grad * grad_output.to(grad.dtype)  # noqa: E731
        return (
            None,
            None,
            scale(grad_logits) if ctx.wants_logits else None,
            *(scale(grad) for grad in grad_parameters),
        )
