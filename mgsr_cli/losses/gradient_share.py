"""Each term's share of the gradient: how much every term of an objective moves the student.

Logged values say how large a term is; they do not say whether it moves training (the
first span relation logged 1e-10 and had a gradient 1e-9 of sft's). Here each term's
weighted mean is differentiated on its own with respect to the student logits of a sample
of rows, the tensor every term shares. norm_t = ||d(w_t * mean_t) / d logits|| and
share_t = norm_t / sum_u norm_u. The training loop measures this on logging steps only,
on a few rows, so other steps pay nothing.
"""

from __future__ import annotations

import math

import torch

from . import fused
from .base import Rows
from .objective import Objective, pairs_within


def term_gradient_norms(objective: Objective, rows: Rows) -> dict[str, float]:
    """{term name: norm of its weighted gradient w.r.t. rows.student_logits}, each term's
    mean taken over the sample's own tokens (or pairs). The sample is detached from any graph.

    Row blocks of fused.BLOCK_ENTRIES logits (a span pair never cut) are differentiated one at
    a time and their squared norms added: every term's value is a sum over rows (or pairs
    inside a block), so the blocks' gradients are disjoint parts of the whole one. Scored at
    once, the per-term path's V-wide intermediates over all the probe's rows made a logging
    step the peak of a DAC-KL run's memory.
    """
    student = rows.student_logits.detach()
    teacher = rows.teacher_logits.detach()
    counts = {"token": max(rows.num_rows, 1), "pair": max(0 if rows.pairs is None else rows.pairs.shape[0], 1)}
    squares = {term.name: 0.0 for term, _ in objective.weighted_terms}
    with torch.enable_grad():
        for start, end in fused.row_blocks_of(rows):
            block = student[start:end].clone().requires_grad_(True)
            targets = rows.targets[start:end] if rows.targets is not None else None
            sample = Rows(block, teacher[start:end], targets, pairs_within(rows.pairs, start, end))
            raw_rows, scaled_rows = objective._rows_for_terms(sample)
            for term, weight in objective.weighted_terms:
                output = term(scaled_rows if getattr(term, "uses_temperature", True) else raw_rows)
                value = weight * output.values.sum() / counts[term.unit]
                (gradient,) = torch.autograd.grad(value, block, retain_graph=True, allow_unused=True)
                if gradient is not None:
                    squares[term.name] += float(gradient.square().sum())
    return {name: math.sqrt(square) for name, square in squares.items()}


def gradient_shares(norms: dict[str, float]) -> dict[str, float]:
    """`grad_norm/<term>` and `grad_share/<term>` (norm over the sum of norms; 0 when all are 0)."""
    total = sum(norms.values())
    metrics = {f"grad_norm/{name}": norm for name, norm in norms.items()}
    metrics.update({f"grad_share/{name}": norm / total if total > 0 else 0.0 for name, norm in norms.items()})
    return metrics
