"""Each term's share of the gradient: how much every term of an objective moves the student.

Logged values say how large a term is; they do not say whether it moves training (the
first span relation logged 1e-10 and had a gradient 1e-9 of sft's). Here each term's
weighted mean is differentiated on its own with respect to the student logits of a sample
of rows, the tensor every term shares. norm_t = ||d(w_t * mean_t) / d logits|| and
share_t = norm_t / sum_u norm_u. The training loop measures this on logging steps only,
on a few rows, so other steps pay nothing.
"""

from __future__ import annotations

import torch

from .base import Rows
from .objective import Objective


def term_gradient_norms(objective: Objective, rows: Rows) -> dict[str, float]:
    """{term name: norm of its weighted gradient w.r.t. rows.student_logits}, each term's
    mean taken over the sample's own tokens (or pairs). The sample is detached from any graph."""
    student = rows.student_logits.detach().requires_grad_(True)
    sample = Rows(student, rows.teacher_logits.detach(), rows.targets, rows.pairs)
    raw_rows, scaled_rows = objective._rows_for_terms(sample)
    counts = {"token": max(sample.num_rows, 1), "pair": max(0 if rows.pairs is None else rows.pairs.shape[0], 1)}
    norms = {}
    with torch.enable_grad():
        for term, weight in objective.weighted_terms:
            output = term(scaled_rows if getattr(term, "uses_temperature", True) else raw_rows)
            value = weight * output.values.sum() / counts[term.unit]
            (gradient,) = torch.autograd.grad(value, student, retain_graph=True, allow_unused=True)
            norms[term.name] = 0.0 if gradient is None else float(gradient.norm())
    return norms


def gradient_shares(norms: dict[str, float]) -> dict[str, float]:
    """`grad_norm/<term>` and `grad_share/<term>` (norm over the sum of norms; 0 when all are 0)."""
    total = sum(norms.values())
    metrics = {f"grad_norm/{name}": norm for name, norm in norms.items()}
    metrics.update({f"grad_share/{name}": norm / total if total > 0 else 0.0 for name, norm in norms.items()})
    return metrics
