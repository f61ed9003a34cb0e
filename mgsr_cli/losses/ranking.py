"""rank:k: RLKD's ranking loss (arXiv 2409.12545), L = 1 - Pearson(soft ranks of teacher, student).

The default follows the official code (github.com/Pty72/RLKD, `sft/kd_sft.py`,
`topk_spearman_loss`):
- candidates (`rank_union="slots"`): `torch.unique(cat(teacher top-k, student top-k), dim=-1)`
  over the whole [N, 2k] index matrix of a batch. That drops a column only when it repeats
  in every row, so with several rows each row keeps all 2k slots, and a token in both
  top-k lists counts twice (a tie). We keep every slot of every row. That equals the
  official set whenever no slot column repeats across the whole batch, which is any batch
  of real text beyond a few tokens. A one-row batch is the exception: there the official
  code keeps the per-row union. Keeping the slots keeps the loss a function of each row
  alone, so chunked and fused evaluation give the batch's value.
- ranks (`rank_method="l2"`): torchsort's `soft_rank` with l2 regularisation of strength
  `rank_temperature` (official: 1) over the gathered raw logits. We compute it here in
  plain torch (`soft_rank_l2`), with no compiled extension.
- value per row: 1 - Pearson correlation of the two rank vectors over the candidates; the
  official loss is the batch mean of that plus KL / 2 (recipes/rlkd.yaml: `rank:5,fkl=0.5`).
  Where the official code gets NaN (a row whose ranks are all tied, e.g. every logit
  within the regularisation of the others), it drops the rank term for the whole batch.
  Here only that row gets 0.

`rank_method="sigmoid", rank_union="row"` is this module's first variant. It uses pairwise
sigmoid ranks, and each row keeps its own union of the teacher's and the student's top-k
(a repeated index is masked, not repeated). At near-hard ranks (small rank_temperature),
with the per-row union, both methods give the same hard ranks and hence the same loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rows, TermOutput
from .divergences import compute_dtype

RANK_ON_CHOICES = ("logprobs", "probs", "logits")
RANK_METHODS = ("l2", "sigmoid")
RANK_UNIONS = ("slots", "row")


def soft_rank_l2(values: Tensor, strength: float = 1.0, valid: Tensor | None = None) -> Tensor:
    """Ascending l2 soft ranks (Blondel et al. 2020, torchsort's `soft_rank(values, "l2", strength)`).

    values [N, n] -> [N, n]: the Euclidean projection of values / strength onto the
    permutahedron of (1, ..., n): z = values / strength sorted descending, y = z - (n, ..., 1),
    v = the non-increasing isotonic regression of y, ranks = z - v, unsorted. As strength -> 0
    these tend to the hard ranks 1..n. They are invariant to a shift of a row (log-probs rank
    like logits). `_isotonic_nonincreasing` differentiates as PAV does (block averaging), so
    there is no custom backward.
    Invalid entries (valid [N, n] False) are ranked below every valid one without touching
    their ranks, so the valid entries get their ranks among themselves plus the number of
    invalid ones; the invalid entries' ranks mean nothing.
    """
    scaled = values / strength
    width = values.shape[-1]
    if valid is not None:
        # far enough below the row's smallest valid value that isotonic pooling never reaches it
        lowest = scaled.detach().masked_fill(~valid, torch.inf).amin(dim=-1, keepdim=True)
        scaled = torch.where(valid, scaled, lowest - (2 * width + 2))
    ordered, order = scaled.sort(dim=-1, descending=True)
    weights = torch.arange(width, 0, -1, dtype=ordered.dtype, device=ordered.device)
    ranks_in_order = ordered - _isotonic_nonincreasing(ordered - weights)
    return ranks_in_order.gather(-1, order.argsort(dim=-1))


def _isotonic_nonincreasing(y: Tensor) -> Tensor:
    """argmin over v_1 >= ... >= v_n of ||v - y||^2, per row of y [N, n], with its Jacobian.

    The solution is piecewise constant: v is the mean of y over each block of a partition
    into runs. The blocks are found without gradient by the min-max formula of isotonic
    regression (Barlow et al. 1972): v_i = min over a <= i of max over b >= i of
    mean(y_a..y_b). The interval means come from a cumulative sum, [N, n, n], which for the
    few candidates of a rank loss (n = 2k = 10) is cheaper than a sequential
    pool-adjacent-violators loop and needs no compiled code. A block is a run of equal
    values (within rounding), the partition torchsort's backward uses. v is then recomputed
    as the block means of y with autograd, so dv/dy is the block-averaging matrix, the
    Jacobian of PAV's solution.
    """
    width = y.shape[-1]
    with torch.no_grad():
        sums = torch.cat([torch.zeros_like(y[..., :1]), y.cumsum(dim=-1)], dim=-1)  # sums[a] = y_0 + ... + y_{a-1}
        index = torch.arange(width, device=y.device)
        start, end = index.view(-1, 1), index.view(1, -1)  # the interval [start, end]
        lengths = (end - start + 1).clamp_min(1).to(y.dtype)
        means = ((sums[..., None, 1:] - sums[..., :-1, None]) / lengths).masked_fill(end < start, -torch.inf)
        best_end = means.flip(-1).cummax(dim=-1).values.flip(-1)  # [a, i]: max over end >= i of means[a, end]
        solution = best_end.masked_fill(start > end, torch.inf).amin(dim=-2)
        tolerance = torch.finfo(y.dtype).eps * 64 * (1.0 + y.abs().amax(dim=-1, keepdim=True))
        new_block = (solution[..., 1:] - solution[..., :-1]).abs() > tolerance.clamp_min(1e-9)
        first = torch.zeros(*new_block.shape[:-1], 1, dtype=torch.long, device=y.device)
        block = torch.cat([first, new_block.long()], dim=-1).cumsum(dim=-1)
        same_block = (block.unsqueeze(-1) == block.unsqueeze(-2)).to(y.dtype)
        averaging = same_block / same_block.sum(dim=-1, keepdim=True)
    return (averaging @ y.unsqueeze(-1)).squeeze(-1)


def soft_rank_sigmoid(values: Tensor, valid: Tensor, temperature: float) -> Tensor:
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


def slot_top_k(teacher_logits: Tensor, student_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The official candidates: all 2k slots [teacher top-k, student top-k] of each row, all valid."""
    k = min(k, teacher_logits.shape[-1])
    indices = torch.cat([teacher_logits.topk(k, dim=-1).indices, student_logits.topk(k, dim=-1).indices], dim=-1)
    return indices, torch.ones_like(indices, dtype=torch.bool)


class RankLoss:
    """rank:k. Values [N]: 1 - Pearson correlation of teacher and student soft ranks.

    rank_method / rank_union: see the module docstring (official: "l2" / "slots").
    rank_on: which values are ranked. `logprobs` (default) and `logits` give exactly the
    same ranks under both methods: a per-row shift changes neither the sigmoid differences
    nor the l2 projection. Both are gathered logits, with no V-wide log-softmax. `probs`
    ranks probabilities, whose gaps shrink with the token's mass, so it needs a much smaller
    rank_temperature (about 0.01).
    rank_temperature (default 1.0, the official l2 strength): the l2 regularisation
    strength, or the sigmoid temperature in nats. Small values give near-hard ranks with
    sparse gradients. Entries whose teacher or student value is not finite (masked
    vocabulary) are skipped.
    """

    name = "rank"
    unit = "token"

    def __init__(
        self,
        k: int = 5,
        rank_on: str = "logprobs",
        rank_temperature: float = 1.0,
        rank_method: str = "l2",
        rank_union: str = "slots",
    ) -> None:
        if k < 1:
            raise ValueError(f"'rank' needs k >= 1, got {k}")
        for option, value, choices in (
            ("rank_on", rank_on, RANK_ON_CHOICES),
            ("rank_method", rank_method, RANK_METHODS),
            ("rank_union", rank_union, RANK_UNIONS),
        ):
            if value not in choices:
                raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
        if not rank_temperature > 0:
            raise ValueError(f"rank_temperature must be > 0, got {rank_temperature}")
        self.k = k
        self.rank_on = rank_on
        self.rank_temperature = rank_temperature
        self.rank_method = rank_method
        self.rank_union = rank_union

    def _ranked_values(self, logits: Tensor, indices: Tensor, dtype: torch.dtype) -> Tensor:
        gathered = logits.gather(-1, indices).to(dtype)
        if self.rank_on != "probs":
            return gathered
        return (gathered - torch.logsumexp(logits.to(dtype), dim=-1, keepdim=True)).exp()

    def _soft_rank(self, values: Tensor, valid: Tensor) -> Tensor:
        if self.rank_method == "l2":
            return soft_rank_l2(values, self.rank_temperature, valid)
        return soft_rank_sigmoid(values, valid, self.rank_temperature)

    def __call__(self, rows: Rows) -> TermOutput:
        teacher_logits = rows.teacher_logits.detach()
        student_logits = rows.student_logits
        dtype = compute_dtype(student_logits, teacher_logits)
        candidates = slot_top_k if self.rank_union == "slots" else union_top_k
        indices, valid = candidates(teacher_logits, student_logits.detach(), self.k)
        teacher_values = self._ranked_values(teacher_logits, indices, dtype)
        student_values = self._ranked_values(student_logits, indices, dtype)
        valid = valid & teacher_values.isfinite() & student_values.isfinite()
        teacher_ranks = self._soft_rank(teacher_values, valid)
        student_ranks = self._soft_rank(student_values, valid)
        return TermOutput(values=1.0 - masked_pearson(teacher_ranks, student_ranks, valid))

    def __repr__(self) -> str:
        return f"rank:{self.k}"
