"""DAC-KL's vocabulary-wide kernels: the teacher band's thresholds and the band sums.

The term itself (f_sub, the options, the clipped KL built from these sums) is in dac_kl.py;
this module holds what walks [N, V]: quantile thresholds from a partial selection (topk) of
the leading ranks, and `BandSumsFunction`, the band sums with a closed-form backward. Both
work on log-probabilities, so the fused objective (fused.py) feeds them the log-softmax it
shares with every other term, and the per-term path computes its own with `floored_log_softmax`.

Numerics: float32 (float64 when an input is), log space, log 0 represented by LOG_FLOOR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Stands in for log 0: finite, so 0 * log 0 and (-inf) - (-inf) never occur; exp() of it is 0.
LOG_FLOOR = -1.0e4

@dataclass
class Band:
    """The teacher band of N rows.

    lower_complement / upper_complement: [N], 1 - l and 1 - u.
    log_lower / log_upper: [N], log tau_l and log tau_u.
    teacher_log_probs: [N, V], the rows the band was found for; kappa: the mask temperature.
    """

    lower_complement: Tensor
    upper_complement: Tensor
    log_lower: Tensor
    log_upper: Tensor
    teacher_log_probs: Tensor
    kappa: float

    @property
    def log_mask(self) -> Tensor:
        """[N, V], detached: log of the soft membership m (-inf outside the teacher's support).

        For inspection; the loss builds the mask inside `BandSumsFunction`, which differentiates it.
        """
        with torch.no_grad():
            buffers = (torch.empty_like(self.teacher_log_probs), torch.empty_like(self.teacher_log_probs))
            return _soft_log_mask(self.teacher_log_probs, self.log_lower, self.log_upper, self.kappa, *buffers)



def floored_log_probs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """log_softmax in `dtype`, with -inf (masked tokens) replaced by LOG_FLOOR. In place, so
    for logits that need no gradient (the teacher), or inside `FlooredLogSoftmax`."""
    return F.log_softmax(logits, dim=-1, dtype=dtype).clamp_(min=LOG_FLOOR)


def support_size(teacher_log_probs: Tensor) -> Tensor:
    """[N] long: the number of tokens with p > 0. Counted only in rows with a floored token;
    counting a row costs about ten times finding its minimum."""
    floored = teacher_log_probs.amin(dim=-1) <= LOG_FLOOR
    support_size = torch.full_like(floored, teacher_log_probs.shape[-1], dtype=torch.long)
    if bool(floored.any()):
        support_size[floored] = (teacher_log_probs[floored] > LOG_FLOOR).sum(dim=-1)
    return support_size


def _leading_ranks(teacher_log_probs: Tensor, leading: Tensor, count: int) -> Tensor:
    """[N, >= count] (all V when count exceeds V): the largest log-probabilities, descending."""
    count = min(count, teacher_log_probs.shape[-1])
    return leading if leading.shape[-1] >= count else teacher_log_probs.topk(count, dim=-1).values


def _interpolate(ranked: Tensor, index: Tensor, fraction: Tensor) -> Tensor:
    """[N]: log-linear interpolation between descending ranks index and index + 1."""
    last = ranked.shape[-1] - 1
    current = ranked.gather(-1, index[:, None].clamp(max=last)).squeeze(-1)
    following = ranked.gather(-1, (index[:, None] + 1).clamp(max=last)).squeeze(-1)
    return current + fraction * (following - current)


def value_thresholds(
    teacher_log_probs: Tensor, leading: Tensor, lower_complement: Tensor, upper_complement: Tensor, support_size: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) logs of the (1 - complement)-quantiles of the S nonzero teacher probabilities.

    Descending rank position complement * (S - 1), interpolated, so each threshold is
    piecewise linear (differentiable) in its quantile level. The ranks are selected down to
    the deepest position any row needs.
    """
    brackets = []
    for complement in (lower_complement, upper_complement):
        position = complement * (support_size - 1).clamp(min=0).to(complement.dtype)
        index = position.detach().floor().long().clamp(min=0)
        index = torch.minimum(index, (support_size - 2).clamp(min=0))
        brackets.append((index, (position - index.to(position.dtype)).clamp(0.0, 1.0)))
    deepest = max((int(index.max()) for index, _ in brackets if index.numel()), default=0)
    ranked = _leading_ranks(teacher_log_probs, leading, deepest + 2)
    lower, upper = (_interpolate(ranked, index, fraction) for index, fraction in brackets)
    return lower, upper


def cumulative_thresholds(
    teacher_log_probs: Tensor, leading: Tensor, lower_complement: Tensor, upper_complement: Tensor, support_size: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) logs of the mass-weighted (1 - complement)-quantiles of the teacher probabilities.

    Knots at x_r (the teacher mass ranked above rank r); the level 1 - complement sits at
    x = complement, interpolated between the ranks r and r + 1 that bracket it. The
    selected ranks double until every row's mass above its last rank exceeds its larger
    complement (1 - l, as u >= l), so that r + 1 is among them.
    """
    deepest = torch.maximum(lower_complement, upper_complement).detach()
    ranked = leading
    while True:
        probs = ranked.exp()
        mass_above = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0), value=0.0)
        if ranked.shape[-1] == teacher_log_probs.shape[-1] or bool((mass_above[:, -1] > deepest).all()):
            break
        ranked = _leading_ranks(teacher_log_probs, ranked, 2 * ranked.shape[-1])
    lower, upper = (
        _cumulative_threshold(ranked, probs, mass_above, complement, support_size)
        for complement in (lower_complement, upper_complement)
    )
    return lower, upper


def _cumulative_threshold(
    ranked: Tensor, probs: Tensor, mass_above: Tensor, complement: Tensor, support_size: Tensor
) -> Tensor:
    """[N] one mass-weighted threshold; ranked, probs, mass_above: [N, R] of the leading ranks."""
    index = torch.searchsorted(mass_above, complement.detach()[:, None].contiguous(), right=True).squeeze(-1) - 1
    index = torch.minimum(index.clamp(min=0), (support_size - 1).clamp(min=0))
    knot = mass_above.gather(-1, index[:, None]).squeeze(-1)
    width = probs.gather(-1, index[:, None]).squeeze(-1).clamp(min=torch.finfo(probs.dtype).tiny)
    fraction = ((complement - knot) / width).clamp(0.0, 1.0)
    return _interpolate(ranked, index, fraction)


def _soft_log_mask(
    teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor, kappa: float, upper_term: Tensor, scratch: Tensor
) -> Tensor:
    """[N, V] log m = log sigmoid((log p - log tau_l) / kappa) + log sigmoid((log tau_u - log p) / kappa),
    -inf outside the support. In place: one new [N, V] tensor and two [N, V] work buffers
    (overwritten), where F.logsigmoid would allocate six. No autograd (see `BandSumsFunction`)."""
    # x / kappa - tau / kappa in one pass each (a sub and a div are two)
    log_mask = torch.add((log_lower / -kappa)[:, None], teacher_log_probs, alpha=1.0 / kappa)
    torch.add((log_upper / kappa)[:, None], teacher_log_probs, alpha=-1.0 / kappa, out=upper_term)
    log_mask = _log_sigmoid_(log_mask, scratch).add_(_log_sigmoid_(upper_term, scratch))
    return _fill_where_floored_(log_mask, teacher_log_probs, -math.inf)


def _fill_where_floored_(values: Tensor, log_probs: Tensor, fill: float) -> Tensor:
    """In place: `fill` where log_probs <= LOG_FLOOR. Usually no entry is floored, and one
    minimum over the tensor is cheaper than building the [N, V] mask."""
    if bool(log_probs.amin() <= LOG_FLOOR):
        values.masked_fill_(log_probs <= LOG_FLOOR, fill)
    return values


def _log_sigmoid_(values: Tensor, scratch: Tensor) -> Tensor:
    """In place: log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), with exp's argument floored
    (see `exp_floor`; that changes the result by less than 1e-37). log(1 + t) rather than
    log1p(t): half the time on the CPU, off by at most one rounding of 1 + t (6e-8 in float32)."""
    tail = torch.abs(values, out=scratch).neg_().clamp_(min=exp_floor(values.dtype)).exp_().add_(1.0).log_()
    return values.clamp_(max=0.0).sub_(tail)


def exp_floor(dtype: torch.dtype) -> float:
    """An exponent just above where exp underflows below the smallest normal float. CPU exp
    kernels take a slow path (about 10x) for arguments below it, and V-wide exps of far-away
    tokens are mostly such arguments; their results there (below 1e-37, or 1e-307 in float64)
    do not count next to the terms that matter."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def negligible_share(dtype: torch.dtype) -> float:
    """Shares below this fraction of a row's largest are set to exactly 0: their sum is below
    V * 1e-24 of the row (float32), and a zero keeps the products built from them (the
    backward's shares * gradients) out of the denormal range, where the CPU is 10x slower."""
    info = torch.finfo(dtype)
    return info.tiny / info.eps**2


def _normalize_(log_values: Tensor) -> tuple[Tensor, Tensor]:
    """In place: [N, V] log values -> (their softmax, [N] their logsumexp); negligible shares are 0."""
    peak = log_values.amax(dim=-1, keepdim=True)
    shares = log_values.sub_(peak).clamp_(min=exp_floor(log_values.dtype)).exp_()
    F.threshold_(shares, negligible_share(shares.dtype), 0.0)
    total = shares.sum(dim=-1, keepdim=True)
    return shares.div_(total), (peak + total.log()).squeeze(-1)


@dataclass
class BandSums:
    """The vocabulary sums of N rows that DAC-KL is built from, each [N].

    With w the weights (the mask, or the winsorizing factor) and m the soft mask:
    log_teacher_band = log sum(w p); log_student_band = log sum(w q);
    expected_log_ratio = sum(w p (log p - log q)) / sum(w p); log_band_mass = log sum(m p);
    student_target = log q_c; band_size = sum(m), detached.
    """

    log_teacher_band: Tensor
    log_student_band: Tensor
    expected_log_ratio: Tensor
    log_band_mass: Tensor
    student_target: Tensor
    band_size: Tensor


class BandSumsFunction(torch.autograd.Function):
    """`BandSums` from the student's floored log-probabilities, with a closed-form backward,
    differentiable in those log-probabilities and both thresholds.

    Why: autograd through the same formulas allocated a new [N, V] tensor for almost every
    op, forward and backward, and at V = 50257 those allocations and passes were most of
    DAC-KL's time. Here the forward allocates three (the mask, two work buffers that become
    the band shares) and the backward two.
    Gradients, with pi = w p / sum(w p), rho = w q / sum(w q), mu = m p / sum(m p), D = log p - log q
    and X = expected_log_ratio:
    d/d log w_k = pi_k (g_teacher + g_ratio (D_k - X)) + rho_k g_student, d/d log m_k = mu_k g_mass,
    d/d log q_k = rho_k g_student - pi_k g_ratio (+ g_target at c); per token,
    d log m / d log tau_l = -sigmoid(-x1) / kappa and d log m / d log tau_u = sigmoid(-x2) / kappa;
    the winsorizing clamp's as torch.maximum and torch.minimum define them (ties count half).
    The floor and the log-softmax are `FlooredLogSoftmax`'s, so the fused objective applies
    them once for every term.
    """

    @staticmethod
    def forward(ctx, student_log_probs, log_lower, log_upper, teacher_log_probs, target, kappa, winsorize):
        scratch, log_ratio = torch.empty_like(teacher_log_probs), torch.empty_like(teacher_log_probs)
        log_mask = _soft_log_mask(teacher_log_probs, log_lower, log_upper, kappa, log_ratio, scratch)
        band_size = torch.clamp(log_mask, min=exp_floor(log_mask.dtype), out=scratch).exp_().sum(dim=-1)
        mass_shares = log_band_mass = None
        if winsorize:
            log_weights = _winsorized_log_weights(teacher_log_probs, log_lower, log_upper)
            mass_shares, log_band_mass = _normalize_(log_mask.add_(teacher_log_probs))
        else:
            log_weights = log_mask
        teacher_shares, log_teacher_band = _normalize_(torch.add(log_weights, teacher_log_probs, out=scratch))
        student_shares, log_student_band = _normalize_(log_weights.add_(student_log_probs))
        if not winsorize:
            mass_shares, log_band_mass = teacher_shares, log_teacher_band
        log_ratio = torch.sub(teacher_log_probs, student_log_probs, out=log_ratio)
        expected_log_ratio = log_ratio.mul_(teacher_shares).sum(dim=-1)
        student_target = student_log_probs.gather(-1, target[:, None]).squeeze(-1)
        ctx.kappa, ctx.winsorize = kappa, winsorize
        ctx.save_for_backward(
            student_log_probs, teacher_log_probs, log_lower, log_upper, target, teacher_shares, student_shares,
            mass_shares, expected_log_ratio,
        )  # fmt: skip
        ctx.mark_non_differentiable(band_size)
        return log_teacher_band, log_student_band, expected_log_ratio, log_band_mass, student_target, band_size

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_teacher_band, grad_student_band, grad_ratio, grad_mass, grad_target, _grad_band_size):
        (
            student_log_probs, teacher_log_probs, log_lower, log_upper, target, teacher_shares, student_shares,
            mass_shares, expected_log_ratio,
        ) = ctx.saved_tensors  # fmt: skip
        grad_log_probs = grad_lower = grad_upper = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            scratch = torch.empty_like(student_log_probs)
            share_grad = grad_teacher_band if ctx.winsorize else grad_teacher_band + grad_mass
            # (D - X) g_ratio + share_grad = D g_ratio + (share_grad - X g_ratio), one pass fewer
            row_term = share_grad - expected_log_ratio * grad_ratio
            weight_grad = torch.sub(teacher_log_probs, student_log_probs).mul_(grad_ratio[:, None])
            weight_grad.add_(row_term[:, None]).mul_(teacher_shares)
            weight_grad.addcmul_(student_shares, grad_student_band[:, None])  # d loss / d log w
            mask_grad = weight_grad
            if ctx.winsorize:
                grad_lower, grad_upper = _winsorized_threshold_grads(
                    weight_grad, teacher_log_probs, log_lower, log_upper, scratch
                )
                mask_grad = torch.mul(mass_shares, grad_mass[:, None], out=weight_grad)
            mask_lower, mask_upper = _mask_threshold_grads(
                mask_grad, teacher_log_probs, log_lower, log_upper, ctx.kappa, scratch
            )
            grad_lower = mask_lower if grad_lower is None else grad_lower + mask_lower
            grad_upper = mask_upper if grad_upper is None else grad_upper + mask_upper
        if ctx.needs_input_grad[0]:
            grad_log_probs = torch.mul(student_shares, grad_student_band[:, None])
            grad_log_probs.addcmul_(teacher_shares, -grad_ratio[:, None])
            grad_log_probs.scatter_add_(-1, target[:, None], grad_target[:, None])
        return grad_log_probs, grad_lower, grad_upper, None, None, None, None


class FlooredLogSoftmax(torch.autograd.Function):
    """log_softmax(logits) in `dtype` with -inf (masked tokens) floored to LOG_FLOOR, and the
    closed-form backward grad - softmax * sum(grad), with no gradient through the floor
    (clamp's own backward would pass it at exactly LOG_FLOOR). Saves only its output."""

    @staticmethod
    def forward(ctx, logits: Tensor, dtype: torch.dtype) -> Tensor:
        log_probs = floored_log_probs(logits, dtype)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(log_probs)
        return log_probs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_probs: Tensor):
        (log_probs,) = ctx.saved_tensors
        grad = grad_log_probs
        if bool(log_probs.amin() <= LOG_FLOOR):
            grad = grad.masked_fill(log_probs <= LOG_FLOOR, 0.0)
        probs = torch.clamp(log_probs, min=exp_floor(log_probs.dtype)).exp_()
        return probs.mul_(-grad.sum(dim=-1, keepdim=True)).add_(grad).to(ctx.logits_dtype), None


def floored_log_softmax(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """Differentiable `floored_log_probs` (see `FlooredLogSoftmax`)."""
    return FlooredLogSoftmax.apply(logits, dtype)


def _winsorized_log_weights(teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor) -> Tensor:
    """[N, V] log of clamp(p, tau_l, tau_u) / p; -inf outside the support."""
    clamped = torch.minimum(torch.maximum(teacher_log_probs, log_lower[:, None]), log_upper[:, None])
    return _fill_where_floored_(clamped.sub_(teacher_log_probs), teacher_log_probs, -math.inf)


def _mask_threshold_grads(
    mask_grad: Tensor, teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor, kappa: float, scratch: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) gradients of the thresholds, given mask_grad = d loss / d log m [N, V]."""
    bound = -exp_floor(mask_grad.dtype)  # keeps sigmoid's exp in range (see exp_floor)
    torch.add((log_lower / kappa)[:, None], teacher_log_probs, alpha=-1.0 / kappa, out=scratch)
    scratch.clamp_(-bound, bound).sigmoid_()
    grad_lower = scratch.mul_(mask_grad).sum(dim=-1).div_(-kappa)  # scratch was sigmoid(-x1)
    torch.add((log_upper / -kappa)[:, None], teacher_log_probs, alpha=1.0 / kappa, out=scratch)
    scratch.clamp_(-bound, bound).sigmoid_()
    return grad_lower, scratch.mul_(mask_grad).sum(dim=-1).div_(kappa)  # scratch was sigmoid(-x2)


def _winsorized_threshold_grads(
    weight_grad: Tensor, teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor, scratch: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) gradients of the thresholds through min(max(log p, log tau_l), log tau_u),
    given weight_grad = d loss / d log w [N, V]."""
    half = teacher_log_probs.new_tensor(0.5)
    raised = torch.maximum(teacher_log_probs, log_lower[:, None])
    torch.heaviside(log_lower[:, None] - teacher_log_probs, half, out=scratch)
    grad_lower = scratch.mul_(torch.heaviside(log_upper[:, None] - raised, half)).mul_(weight_grad).sum(dim=-1)
    torch.heaviside(raised.sub_(log_upper[:, None]), half, out=scratch)
    return grad_lower, scratch.mul_(weight_grad).sum(dim=-1)


