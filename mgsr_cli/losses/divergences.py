"""Token-level divergences between the teacher p and the student q (method.md section 5).

Every term maps `Rows` ([N, V] logits) to one value per row. All of them compute in log
space in float32 (float64 stays float64), build mixtures with logaddexp of log-probs, and
use 0·log 0 = 0, so vocabulary entries masked with -inf logits (probability 0) give no
NaN or inf.

Each divergence is a `torch.autograd.Function` with a closed-form gradient with respect to
the student logits. The function saves only its two inputs (which the caller holds anyway)
and each row's logsumexp, and rebuilds the log-probs from them in backward (a subtraction,
not a second log-softmax), so a [N, V] loss keeps no V-wide intermediate alive between
forward and backward; plain autograd would keep two or three of them per term. Forward and
backward also walk the rows in blocks of about 1M entries, so their temporaries stay small
whatever N is (an [N, V] gradient is the only full-size output).
The teacher is a constant target: it is detached and gets no gradient.

For a row loss L(q), q = softmax(z), the chain rule through the softmax gives
dL/dz_j = q_j (g_j - Σ_k q_k g_k) with g = dL/dq; each class below writes the result of
that formula for its own L, simplified so that no 0 · inf appears.

AKL, which also needs each row's teacher head, is in adaptive_kl.py; sft, the ground-truth
cross-entropy built on the same row blocks, in cross_entropy.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import Rows, SharedLogProbs, TermOutput

# Entries per row block inside the closed-form functions: 4 MiB float32 temporaries (20 rows at
# V = 50257), which stay in cache between the block's passes. On 2 AMD EPYC cores, fkl forward +
# backward on 512 rows took 0.13-0.15 s this way against 0.17-0.22 s with 16 MiB blocks; sft 10% less.
BLOCK_ENTRIES = 1 << 20


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64 (exact tests), else float32 (bf16/fp16 inputs too)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_probs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.log_softmax(logits, dim=-1, dtype=dtype)


def _log_normalizer(logits: Tensor, log_probs: Tensor) -> Tensor:
    """[n] logsumexp of each row, read back from its log-softmax: the largest log-probability
    is max - logsumexp, so two maxima stand in for another pass with an exp (to rounding)."""
    return logits.amax(dim=-1).to(log_probs.dtype) - log_probs.amax(dim=-1)


def kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_k a_k (log a_k - log b_k) per row, with entries where a_k = 0 contributing 0.

    Only an infinite log a_k - log b_k makes 0 · (log a_k - log b_k) a NaN, so the zeros are
    masked only when either input holds a -inf: two reductions, where the mask costs two V-wide
    passes."""
    a = log_a.exp()
    terms = torch.sub(log_a, log_b).mul_(a)
    if bool(log_a.amin() == -math.inf) or bool(log_b.amin() == -math.inf):
        terms.masked_fill_(a == 0, 0.0)
    return terms.sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 - w)·b) for 0 < w < 1, computed stably in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _where_student_positive(q: Tensor, values: Tensor) -> Tensor:
    """values where q > 0, else 0: the derivative terms q·log q vanish where q = 0."""
    return torch.where(q > 0, values, 0.0)


def row_blocks(num_rows: int, vocab: int) -> list[slice]:
    """Consecutive row slices of about BLOCK_ENTRIES entries; one (empty) slice when N = 0."""
    block_rows = max(1, BLOCK_ENTRIES // max(vocab, 1))
    return [slice(start, start + block_rows) for start in range(0, max(num_rows, 1), block_rows)]


class _ClosedFormDivergence(torch.autograd.Function):
    """values[N] = divergence(teacher, student) per row; backward uses the closed form."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor, divergence: Divergence) -> Tensor:
        dtype = compute_dtype(student_logits, teacher_logits)
        block_values, block_aux, normalizers = [], [], []
        for rows in row_blocks(*student_logits.shape):
            log_p = _log_probs(teacher_logits[rows], dtype)
            log_q = _log_probs(student_logits[rows], dtype)
            normalizers.append(
                (_log_normalizer(teacher_logits[rows], log_p), _log_normalizer(student_logits[rows], log_q))
            )
            values, row_aux = divergence.values(log_p, log_q)
            block_values.append(values)
            block_aux.append(row_aux)
        ctx.divergence = divergence
        teacher_normalizer, student_normalizer = (torch.cat(parts) for parts in zip(*normalizers))
        row_aux = (torch.cat(parts) for parts in zip(*block_aux))
        ctx.save_for_backward(student_logits, teacher_logits, teacher_normalizer, student_normalizer, *row_aux)
        return torch.cat(block_values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None, None]:
        student_logits, teacher_logits, teacher_normalizer, student_normalizer, *row_aux = ctx.saved_tensors
        dtype = compute_dtype(student_logits, teacher_logits)
        grad = torch.empty_like(student_logits)
        for rows in row_blocks(*student_logits.shape):
            block_grad = ctx.divergence.student_logit_grad(
                torch.sub(teacher_logits[rows].to(dtype), teacher_normalizer[rows, None]),
                torch.sub(student_logits[rows].to(dtype), student_normalizer[rows, None]),
                *(aux[rows] for aux in row_aux),
            )
            grad[rows] = block_grad.mul_(grad_values[rows].to(dtype).unsqueeze(-1))
        return grad, None, None


class Divergence:
    """A token term D(p_i || q_i) with a closed-form gradient; subclasses define the math.

    `values(log_p, log_q)` returns the [N] values and row-wise tensors ([N], small) that
    backward needs; `student_logit_grad(log_p, log_q, *row_aux)` returns dD/dz [N, V] and
    may overwrite its log_p / log_q arguments (backward computes them afresh for it).
    """

    name: str
    unit = "token"

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor, *row_aux: Tensor) -> Tensor:
        raise NotImplementedError

    def log_prob_grad(self, log_p: Tensor, log_q: Tensor, *row_aux: Tensor) -> Tensor:
        """A gradient with respect to log q that the log-softmax turns into dD/dz. dD/dz itself
        is one (it sums to 0 over the row, so the softmax's Jacobian leaves it unchanged);
        a subclass may return a cheaper one."""
        return self.student_logit_grad(log_p.clone(), log_q.clone(), *row_aux)

    def __call__(self, rows: Rows) -> TermOutput:
        values = _ClosedFormDivergence.apply(rows.student_logits, rows.teacher_logits.detach(), self)
        return TermOutput(values=values)

    def from_log_probs(self, shared: SharedLogProbs) -> TermOutput:
        return TermOutput(values=_LogProbDivergence.apply(shared.student, shared.teacher, self))

    def __repr__(self) -> str:
        return self.name


class _LogProbDivergence(torch.autograd.Function):
    """values[n] = divergence(p, q) from shared log-probabilities; backward: `log_prob_grad`."""

    @staticmethod
    def forward(ctx, log_q: Tensor, log_p: Tensor, divergence: Divergence) -> Tensor:
        values, row_aux = divergence.values(log_p, log_q)
        ctx.divergence = divergence
        ctx.save_for_backward(log_q, log_p, *row_aux)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None, None]:
        log_q, log_p, *row_aux = ctx.saved_tensors
        return ctx.divergence.log_prob_grad(log_p, log_q, *row_aux).mul_(grad_values.unsqueeze(-1)), None, None


class ForwardKL(Divergence):
    """fkl / kd: KL(p || q). Gradient q - p; with respect to log q, -p."""

    name = "fkl"

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return kl_rows(log_p, log_q), ()

    def log_prob_grad(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return log_p.exp().neg_()

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return log_q.exp_().sub_(log_p.exp_())


class ReverseKL(Divergence):
    """rkl: KL(q || p). Gradient q_j (log q_j - log p_j - KL)."""

    name = "rkl"

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        kl = kl_rows(log_q, log_p)
        return kl, (kl,)

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor, kl: Tensor) -> Tensor:
        q = log_q.exp()
        return _where_student_positive(q, q * (log_q - log_p - kl.unsqueeze(-1)))


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"'{name}' needs a parameter in (0, 1), got {value}")


class SkewForwardKL(Divergence):
    """skl:α (DistiLLM): KL(p || αp + (1-α)q), α in (0, 1), default 0.1.

    Gradient (1-α) q_j (Σ_k q_k r_k - r_j) with r = p / m, which is bounded by 1/α.
    """

    name = "skl"

    def __init__(self, alpha: float = 0.1) -> None:
        _check_open_unit(self.name, alpha)
        self.alpha = alpha

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return kl_rows(log_p, _log_mixture(log_p, log_q, self.alpha)), ()

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        log_m = _log_mixture(log_p, log_q, self.alpha)
        ratio = torch.where(log_p.isneginf(), 0.0, (log_p - log_m).exp_())
        q = log_q.exp_()
        expected_ratio = (q * ratio).sum(dim=-1, keepdim=True)
        return q.mul_(expected_ratio - ratio).mul_(1.0 - self.alpha)

    def __repr__(self) -> str:
        return f"skl:{self.alpha:g}"


class SkewReverseKL(Divergence):
    """srkl:α (DistiLLM): KL(q || (1-α)p + αq), α in (0, 1), default 0.1.

    With m = (1-α)p + αq and u = log q - log m - α q/m, the gradient is q_j (u_j - Σ q u).
    """

    name = "srkl"

    def __init__(self, alpha: float = 0.1) -> None:
        _check_open_unit(self.name, alpha)
        self.alpha = alpha

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return kl_rows(log_q, _log_mixture(log_q, log_p, self.alpha)), ()

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        log_ratio = log_q - _log_mixture(log_q, log_p, self.alpha)
        q = log_q.exp()
        u = _where_student_positive(q, log_ratio - self.alpha * log_ratio.exp())
        return q * (u - (q * u).sum(dim=-1, keepdim=True))

    def __repr__(self) -> str:
        return f"srkl:{self.alpha:g}"


class GeneralizedJSD(Divergence):
    """gjsd:β (GKD): β·KL(p || m) + (1-β)·KL(q || m), m = βp + (1-β)q, β in [0, 1].

    The endpoints follow TRL's GKD convention: β = 0 is exactly fkl and β = 1 exactly rkl.
    The formula itself degenerates there (m becomes q or p, and both weighted KLs are 0),
    so the endpoints are defined by that convention, not by continuity.
    Inside (0, 1) the gradient is (1-β) q_j (d_j - Σ q d) with d = log q - log m.
    """

    name = "gjsd"

    def __init__(self, beta: float = 0.5) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"'{self.name}' needs a parameter in [0, 1], got {beta}")
        self.beta = beta
        self._endpoint: Divergence | None = {0.0: ForwardKL(), 1.0: ReverseKL()}.get(beta)

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        if self._endpoint is not None:
            return self._endpoint.values(log_p, log_q)
        log_m = _log_mixture(log_p, log_q, self.beta)
        values = self.beta * kl_rows(log_p, log_m) + (1.0 - self.beta) * kl_rows(log_q, log_m)
        return values, ()

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor, *row_aux: Tensor) -> Tensor:
        if self._endpoint is not None:
            return self._endpoint.student_logit_grad(log_p, log_q, *row_aux)
        q = log_q.exp()
        log_ratio = _where_student_positive(q, log_q - _log_mixture(log_p, log_q, self.beta))
        kl_student_mixture = (q * log_ratio).sum(dim=-1, keepdim=True)
        return q.mul_(log_ratio.sub_(kl_student_mixture)).mul_(1.0 - self.beta)

    def __repr__(self) -> str:
        return f"{self.name}:{self.beta:g}"


class JensenShannon(GeneralizedJSD):
    """js: ½KL(p || m) + ½KL(q || m), m = ½(p + q); gjsd at β = ½. Symmetric.

    f-DISTILL's code defaults to this mixture, but its shipped runs use β = 0.85, which is our
    gjsd:0.15 (recipes/js.yaml). DistiLLM's use λ = 0.9, our gjsd:0.1 (recipes/gkd_distillm.yaml).
    """

    name = "js"

    def __init__(self) -> None:
        super().__init__(beta=0.5)

    def __repr__(self) -> str:
        return self.name


class TotalVariation(Divergence):
    """tvd: ½ Σ_k |p_k - q_k|. Gradient ½ q_j (s_j - Σ q s), s = sign(q - p) (0 at ties)."""

    name = "tvd"

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return 0.5 * (log_p.exp() - log_q.exp()).abs_().sum(dim=-1), ()

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        q = log_q.exp()
        sign = (q - log_p.exp_()).sign_()
        return q.mul_(sign - (q * sign).sum(dim=-1, keepdim=True)).mul_(0.5)
