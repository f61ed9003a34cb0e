"""Span-level probability-correlation consistency, MGSR's span loss (method.md section 3).

Each pair (i, j) joins two response positions inside one phrase span; the batch builder
(mgsr_cli/spans.py) chooses the pairs. The term matches how the teacher's distributions
at i and j relate with how the student's do. The relation is [reconstructed], and
`span_relation` names the choice:
- "pearson" (default): r = corr(p_i, p_j), the Pearson correlation of the two probability
  vectors over the vocabulary, s = corr(q_i, q_j); value (r - s)^2, in [0, 4].
- "pearson_logprobs": the same over log-probabilities (= over the logits, since Pearson
  ignores a per-row shift), on the entries finite in all four rows.
- "hadamard_cosine": 1 - cos(p_i * p_j, q_i * q_j), the Hadamard relation compared by a
  normalised correlation instead of a squared distance; in [0, 1].
- "hadamard" (the first reading): ||p_i * p_j - q_i * q_j||^2.
- "cosine": (cos(p_i, p_j) - cos(q_i, q_j))^2.  "inner": (<p_i, p_j> - <q_i, q_j>)^2.

Why "pearson" is the default: MGSR weights its three terms 1 : 1 : 1 and reports a gain
from the span term, so the term must be of the same order as the others. A product of two
probability vectors is tiny: "hadamard" logs 3e-10 on the lab's quick pair (V = 512) and 1e-15
on the embedded pair (V = 50257), next to sft ~ 6-11 and dac_kl ~ 1. A correlation is
scale-free: "pearson" logs 0.12 and 0.05 there and raises the step's grad norm from 1.00 to
1.33 on the lab pair (README, "Span loss"). A correlation needs spread, so a row whose vector
is constant counts as correlation 0.

The teacher is detached. Computation runs in float32, or in float64 when an input is
float64. Tokens masked with -inf logits get probability 0 and cause no NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import Rows, SharedLogProbs, TermOutput
from .divergences import compute_dtype

RELATIONS = ("pearson", "pearson_logprobs", "hadamard_cosine", "hadamard", "cosine", "inner")


def span_values(student_log_probs: Tensor, teacher_log_probs: Tensor, pairs: Tensor, relation: str = "pearson") -> Tensor:
    """[P] values for pairs [P, 2] of row indices into log-probs [N, V] (one dtype).

    A pure function of shared buffers, so a fused pass can hand in the log-softmax it
    already computed. Gradients flow into whichever input requires them.
    """
    if relation == "pearson":
        return _PearsonGap.apply(student_log_probs, teacher_log_probs.detach(), pairs.long())
    first, second = pairs[:, 0].long(), pairs[:, 1].long()
    if relation == "pearson_logprobs":
        return _logprob_pearson_gap(student_log_probs, teacher_log_probs, first, second)
    p_i, p_j = teacher_log_probs[first].exp(), teacher_log_probs[second].exp()
    q_i, q_j = student_log_probs[first].exp(), student_log_probs[second].exp()
    if relation == "hadamard":
        return (p_i * p_j - q_i * q_j).square().sum(dim=-1)
    if relation == "hadamard_cosine":
        return 1.0 - _cosine(p_i * p_j, q_i * q_j)
    measure = {"pearson": _pearson, "cosine": _cosine, "inner": _inner}[relation]
    return (measure(p_i, p_j) - measure(q_i, q_j)).square()


class SpanLoss:
    """The span term: one value per pair (unit "pair"), with no parameters."""

    name = "span"
    unit = "pair"

    def __init__(self, span_relation: str = "pearson") -> None:
        if span_relation not in RELATIONS:
            raise ValueError(f"span_relation must be one of {', '.join(RELATIONS)}; got {span_relation!r}")
        self.relation = span_relation

    def __repr__(self) -> str:
        return f"SpanLoss(span_relation={self.relation!r})"

    def __call__(self, rows: Rows) -> TermOutput:
        """values [P] for rows.pairs [P, 2]. Without pairs, values is an empty [0] tensor
        that stays in the student's graph."""
        student_logits, teacher_logits = rows.student_logits, rows.teacher_logits.detach()
        dtype = compute_dtype(student_logits, teacher_logits)
        pairs = rows.pairs
        if pairs is None:
            pairs = torch.zeros((0, 2), dtype=torch.long, device=student_logits.device)
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            values = span_values(
                torch.log_softmax(student_logits, dim=-1, dtype=dtype),
                torch.log_softmax(teacher_logits, dim=-1, dtype=dtype),
                pairs,
                self.relation,
            )
        return TermOutput(values=values)

    def from_log_probs(self, shared: SharedLogProbs) -> TermOutput:
        """`__call__` from the fused objective's shared log-probabilities (log 0 floored, so
        "pearson_logprobs" counts masked entries as finite there)."""
        pairs = shared.pairs if shared.pairs is not None else shared.student.new_zeros((0, 2), dtype=torch.long)
        return TermOutput(values=span_values(shared.student, shared.teacher, pairs, self.relation))


def _inner(left: Tensor, right: Tensor) -> Tensor:
    """[P] <left, right> row by row."""
    return (left * right).sum(dim=-1)


def _pearson(left: Tensor, right: Tensor, valid: Tensor | None = None) -> Tensor:
    """[P] Pearson correlation of the rows (over the entries where valid [P, V] is True).

    A row constant up to rounding (spread below V * (4 eps max|x|)^2) counts as correlation 0.
    """
    if valid is None:
        valid = torch.ones_like(left, dtype=torch.bool)
    weights = valid.to(left.dtype)
    count = weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    left, right = left.masked_fill(~valid, 0.0), right.masked_fill(~valid, 0.0)
    left_centred = (left - left.sum(dim=-1, keepdim=True) / count) * weights
    right_centred = (right - right.sum(dim=-1, keepdim=True) / count) * weights
    eps = 4 * torch.finfo(left.dtype).eps
    rounding = [count.squeeze(-1) * (eps * row.detach().abs().amax(dim=-1)).square() for row in (left, right)]
    return _cosine(left_centred, right_centred, *rounding)


def _cosine(left: Tensor, right: Tensor, left_floor: Tensor | float = 0.0, right_floor: Tensor | float = 0.0) -> Tensor:
    """[P] <l, r> / (|l| |r|); 0, with zero gradient, where a row's squared norm is not above its floor."""
    left_square, right_square = left.square().sum(dim=-1), right.square().sum(dim=-1)
    spread = (left_square > left_floor) & (right_square > right_floor)
    norms = torch.where(spread, left_square, 1.0).sqrt() * torch.where(spread, right_square, 1.0).sqrt()
    return torch.where(spread, _inner(left, right) / norms, 0.0)


def _logprob_pearson_gap(student_log_probs: Tensor, teacher_log_probs: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """(corr(log p_i, log p_j) - corr(log q_i, log q_j))^2 on the entries finite in all four rows."""
    rows = (teacher_log_probs[first], teacher_log_probs[second], student_log_probs[first], student_log_probs[second])
    valid = rows[0].isfinite() & rows[1].isfinite() & rows[2].isfinite() & rows[3].isfinite()
    teacher_correlation = _pearson(rows[0], rows[1], valid)
    student_correlation = _pearson(rows[2], rows[3], valid)
    return (teacher_correlation - student_correlation).square()


def _centred_probs(log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [m, V] -> (centred probabilities, squared norms [m], `_pearson`'s spread floors [m])."""
    probs = log_probs.exp()
    floors = probs.shape[-1] * (4 * torch.finfo(probs.dtype).eps * probs.amax(dim=-1)).square()
    centred = probs.sub_(probs.mean(dim=-1, keepdim=True))
    return centred, torch.linalg.vector_norm(centred, dim=-1).square(), floors


class _PairLayout:
    """Where a pair's rows sit among the rows the span term computes on.

    The rows are those of the pairs (`torch.unique`), or every row of the block when the
    pairs touch at least half of them: then no V-wide gather or scatter is needed. When
    every pair joins neighbouring rows of that selection (span_pairs "adjacent"), the pair
    products are taken from two offset views, centred[:-1] * centred[1:], not from gathers.
    """

    def __init__(self, pairs: Tensor, num_rows: int) -> None:
        rows, local = torch.unique(pairs, return_inverse=True)
        self.dense = 2 * rows.numel() >= num_rows
        self.rows = rows
        local = pairs if self.dense else local
        self.first, self.second = local[:, 0], local[:, 1]
        self.adjacent = local.numel() > 0 and bool((self.second == self.first + 1).all())

    def take(self, full: Tensor) -> Tensor:
        """The computed rows of a [N, V] tensor (the tensor itself when dense)."""
        return full if self.dense else full[self.rows]

    def place(self, computed: Tensor, like: Tensor) -> Tensor:
        """`take`'s inverse: computed rows back in a [N, V] tensor of zeros."""
        if self.dense:
            return computed
        full = torch.zeros_like(like)
        full[self.rows] = computed
        return full

    def dots(self, centred: Tensor) -> Tensor:
        """[P] <c_i, c_j> of every pair."""
        if self.adjacent:
            return (centred[:-1] * centred[1:]).sum(dim=-1)[self.first]
        return (centred[self.first] * centred[self.second]).sum(dim=-1)

    def add_partners(self, grad_rows: Tensor, centred: Tensor, weights: Tensor) -> None:
        """grad_rows[i] += weights_p c_j and grad_rows[j] += weights_p c_i for every pair p = (i, j)."""
        if self.adjacent:
            per_neighbour = weights.new_zeros(centred.shape[0] - 1).index_add_(0, self.first, weights)[:, None]
            grad_rows[:-1].addcmul_(centred[1:], per_neighbour)
            grad_rows[1:].addcmul_(centred[:-1], per_neighbour)
            return
        grad_rows.index_add_(0, self.first, centred[self.second] * weights[:, None])
        grad_rows.index_add_(0, self.second, centred[self.first] * weights[:, None])


def _correlations(centred: Tensor, norms: Tensor, floors: Tensor, layout: _PairLayout) -> tuple[Tensor, Tensor]:
    """([P] Pearson correlations of the row pairs, 0 without spread; [P] bool: with spread)."""
    first, second = layout.first, layout.second
    spread = (norms[first] > floors[first]) & (norms[second] > floors[second])
    scale = torch.where(spread, norms[first], 1.0).sqrt() * torch.where(spread, norms[second], 1.0).sqrt()
    return torch.where(spread, layout.dots(centred) / scale, 0.0), spread


class _PearsonGap(torch.autograd.Function):
    """"pearson" values (corr(p_i, p_j) - corr(q_i, q_j))^2 with a closed-form backward.

    Each row in a pair is exponentiated and centred once (autograd through `_pearson` kept
    about a dozen [P, V] temporaries per pair, and the span term cost more than DAC-KL).
    With c the centred student rows and r = corr(q_i, q_j):
    d r / d q_i = c_j / (|c_i| |c_j|) - r c_i / |c_i|^2 (already of zero mean, so the centring
    passes it unchanged), and d / d log q = q * d / d q. No gradient where a row has no spread.
    """

    @staticmethod
    def forward(ctx, student_log_probs: Tensor, teacher_log_probs: Tensor, pairs: Tensor) -> Tensor:
        layout = _PairLayout(pairs, student_log_probs.shape[0])
        teacher_correlation, _ = _correlations(*_centred_probs(layout.take(teacher_log_probs)), layout)
        centred, norms, floors = _centred_probs(layout.take(student_log_probs))
        student_correlation, spread = _correlations(centred, norms, floors, layout)
        ctx.layout = layout
        ctx.save_for_backward(student_log_probs, centred, norms, student_correlation, teacher_correlation, spread)
        return (teacher_correlation - student_correlation).square()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor):
        student_log_probs, centred, norms, correlation, teacher_correlation, spread = ctx.saved_tensors
        layout = ctx.layout
        first, second = layout.first, layout.second
        grad_correlation = torch.where(spread, -2.0 * (teacher_correlation - correlation) * grad_values, 0.0)
        safe_norms = torch.where(norms > 0, norms, 1.0)
        cross = grad_correlation / (safe_norms[first] * safe_norms[second]).sqrt()  # times the other row
        own = grad_correlation * correlation  # times the row itself, over its squared norm
        own_share = torch.zeros_like(norms).index_add_(0, first, own).index_add_(0, second, own) / safe_norms
        grad_rows = centred * -own_share[:, None]
        layout.add_partners(grad_rows, centred, cross)
        grad_rows.mul_(layout.take(student_log_probs).exp())  # d / d log q = q * d / d q
        return layout.place(grad_rows, student_log_probs), None, None
