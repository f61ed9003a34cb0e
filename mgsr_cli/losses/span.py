"""Span-level probability-correlation consistency, MGSR's span loss (method.md section 3).

Each pair (i, j) joins two response positions inside one phrase span. The batch builder
(mgsr_cli/spans.py) chooses the pairs. The term matches the relation between the two
teacher distributions p_i, p_j with the relation between the two student distributions
q_i, q_j. The relation is [reconstructed], and `span_relation` names the choice:
- "hadamard" (default): r = p_i * p_j and s = q_i * q_j, both [V], value ||r - s||^2.
- "cosine": r = cos(p_i, p_j) and s = cos(q_i, q_j), value (r - s)^2.
- "inner": r = <p_i, p_j> and s = <q_i, q_j>, value (r - s)^2.
The teacher is detached. Computation runs in float32, or in float64 when an input is
float64. Tokens masked with -inf logits get probability 0 and cause no NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rows, TermOutput

RELATIONS = ("hadamard", "cosine", "inner")


class SpanLoss:
    """The span term: one value per pair (unit "pair"), with no parameters."""

    name = "span"
    unit = "pair"

    def __init__(self, span_relation: str = "hadamard") -> None:
        if span_relation not in RELATIONS:
            raise ValueError(f"span_relation must be one of {', '.join(RELATIONS)}; got {span_relation!r}")
        self.relation = span_relation

    def __repr__(self) -> str:
        return f"SpanLoss(span_relation={self.relation!r})"

    def __call__(self, rows: Rows) -> TermOutput:
        """values [P] for rows.pairs [P, 2]. Without pairs, values is an empty [0] tensor
        that stays in the student's graph."""
        student_logits, teacher_logits = rows.student_logits, rows.teacher_logits.detach()
        dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
        pairs = rows.pairs
        if pairs is None:
            pairs = torch.zeros((0, 2), dtype=torch.long, device=student_logits.device)
        first, second = pairs[:, 0].long(), pairs[:, 1].long()
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            teacher_probs = torch.softmax(teacher_logits.to(dtype), dim=-1)
            student_probs = torch.softmax(student_logits.to(dtype), dim=-1)
            if self.relation == "hadamard":
                difference = teacher_probs[first] * teacher_probs[second] - student_probs[first] * student_probs[second]
                values = difference.square().sum(dim=-1)
            else:
                relation = _cosine if self.relation == "cosine" else _inner
                values = (
                    relation(teacher_probs[first], teacher_probs[second])
                    - relation(student_probs[first], student_probs[second])
                ).square()
        return TermOutput(values=values)


def _inner(left: Tensor, right: Tensor) -> Tensor:
    """[P] <left, right> row by row."""
    return (left * right).sum(dim=-1)


def _cosine(left: Tensor, right: Tensor) -> Tensor:
    """[P] cosine of the angle between rows; probability vectors have norm >= 1/sqrt(V) > 0."""
    return _inner(left, right) / (left.norm(dim=-1) * right.norm(dim=-1))
