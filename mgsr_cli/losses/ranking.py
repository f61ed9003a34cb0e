"""rank:k: RLKD's ranking loss (arXiv 2409.12545), L = 1 - Spearman(teacher, student).

Per row, the candidate tokens are the union of the teacher's and the student's top-k
indices. The union is built per row, never across rows: each row keeps its own 2k slots
(teacher top-k, then student top-k), and a student index already in the teacher's top-k
is marked invalid instead of being removed, so rows stay rectangular ([N, 2k] + mask).

The soft rank is written here (pairwise sigmoids) rather than taken from a package:
torchsort, the usual choice, needs a compiled C++/CUDA extension, and a [N, 2k, 2k]
pairwise form is cheap for k of a few tokens and differentiable everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rows, TermOutput
from .divergences import compute_dtype

RANK_ON_CHOICES = ("logprobs", "probs", "logits")


def soft_rank(values: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """Differentiable ascending ranks (1 = smallest) among the valid entries of each row.

    values, valid: [N, M]. rank_i = 1 + Σ_{j valid, j != i} σ((v_i - v_j) / temperature);
    as temperature -> 0 this tends to the hard rank 1 + #{j : v_j < v_i}. Invalid entries
    get rank 0 and influence nothing.
    """
    safe_values = values.masked_fill(~valid, 0.0)
    differences = safe_values.unsqueeze(-1) - safe_values.unsqueeze(-2)
    others = valid.unsqueeze(-2) & ~torch.eye(values.shape[-1], dtype=torch.bool, device=values.device)
    comparisons = torch.sigmoid(differences / temperature).masked_fill(~others, 0.0)
    return (1.0 + comparisons.sum(dim=-1)).masked_fill(~valid, 0.0)


def masked_pearson(first: Tensor, second: Tensor, valid: Tensor) -> Tensor:
    """Pearson correlation per row over the valid entries: [N, M] -> [N].

    A row where either side has no spread above rounding level (one valid entry, or all
    tied) has no ranking signal to match and gets correlation 1 (loss 0, zero gradient).
    """
    weights = valid.to(first.dtype)
    count = weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    first_centered = (first - (first * weights).sum(dim=-1, keepdim=True) / count) * weights
    second_centered = (second - (second * weights).sum(dim=-1, keepdim=True) / count) * weights
    first_spread = first_centered.square().sum(dim=-1)
    second_spread = second_centered.square().sum(dim=-1)
    rounding_level = count.squeeze(-1) * torch.finfo(first.dtype).eps
    has_spread = (first_spread > rounding_level) & (second_spread > rounding_level)
    safe_product = torch.where(has_spread, first_spread * second_spread, 1.0)
    covariance = (first_centered * second_centered).sum(dim=-1)
    return torch.where(has_spread, covariance / safe_product.sqrt(), 1.0)


def union_top_k(teacher_logits: Tensor, student_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row candidate indices [N, 2k] (teacher top-k, then student top-k) and validity.

    A slot is invalid when its index already occurs earlier in the same row.
    """
    k = min(k, teacher_logits.shape[-1])
    indices = torch.cat([teacher_logits.topk(k, dim=-1).indices, student_logits.topk(k, dim=-1).indices], dim=-1)
    same_index = indices.unsqueeze(-1) == indices.unsqueeze(-2)
    earlier = torch.ones(2 * k, 2 * k, dtype=torch.bool, device=indices.device).tril(diagonal=-1)
    return indices, ~(same_index & earlier).any(dim=-1)


class RankLoss:
    """rank:k. Values [N]: 1 - Spearman correlation of teacher and student soft ranks.

    rank_on: which values are ranked. `logprobs` (default) ranks in nats, where a fixed
    temperature means the same thing for every row; `logits` gives exactly the same ranks,
    since log-probs differ from logits by a per-row constant that pairwise differences
    cancel (both are computed from gathered logits, no V-wide log-softmax); `probs` ranks
    probabilities, whose gaps shrink with the token's mass, so it needs a much smaller
    rank_temperature (about 0.01). rank_temperature (default 1.0 nat): small values give
    near-hard ranks with sparse gradients; large values make the loss tend to 1 - Pearson
    correlation of the raw values.
    Entries whose teacher or student value is not finite (masked vocabulary) are skipped.
    """

    name = "rank"
    unit = "token"

    def __init__(self, k: int = 5, rank_on: str = "logprobs", rank_temperature: float = 1.0) -> None:
        if k < 1:
            raise ValueError(f"'rank' needs k >= 1, got {k}")
        if rank_on not in RANK_ON_CHOICES:
            raise ValueError(f"rank_on must be one of {', '.join(RANK_ON_CHOICES)}, got {rank_on!r}")
        if not rank_temperature > 0:
            raise ValueError(f"rank_temperature must be > 0, got {rank_temperature}")
        self.k = k
        self.rank_on = rank_on
        self.rank_temperature = rank_temperature

    def _ranked_values(self, logits: Tensor, indices: Tensor, dtype: torch.dtype) -> Tensor:
        gathered = logits.gather(-1, indices).to(dtype)
        if self.rank_on != "probs":
            return gathered
        return (gathered - torch.logsumexp(logits.to(dtype), dim=-1, keepdim=True)).exp()

    def __call__(self, rows: Rows) -> TermOutput:
        teacher_logits = rows.teacher_logits.detach()
        student_logits = rows.student_logits
        dtype = compute_dtype(student_logits, teacher_logits)
        indices, valid = union_top_k(teacher_logits, student_logits.detach(), self.k)
        teacher_values = self._ranked_values(teacher_logits, indices, dtype)
        student_values = self._ranked_values(student_logits, indices, dtype)
        valid = valid & teacher_values.isfinite() & student_values.isfinite()
        teacher_ranks = soft_rank(teacher_values, valid, self.rank_temperature)
        student_ranks = soft_rank(student_values, valid, self.rank_temperature)
        return TermOutput(values=1.0 - masked_pearson(teacher_ranks, student_ranks, valid))

    def __repr__(self) -> str:
        return f"rank:{self.k}"
