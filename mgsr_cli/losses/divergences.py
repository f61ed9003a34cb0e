"""Token-level divergences between the teacher p and the student q (method.md section 5).

Every term maps `Rows` ([N, V] logits) to one value per row. All of them compute in log
space in float32 (float64 stays float64), build mixtures with logaddexp of log-probs, and
use 0·log 0 = 0, so vocabulary entries masked with -inf logits (probability 0) give no
NaN or inf.

Each divergence is a `torch.autograd.Function` with a closed-form gradient with respect to
the student logits. The function saves only its two inputs (which the caller holds anyway)
and recomputes the log-probs in backward, so a [N, V] loss keeps no V-wide intermediate
alive between forward and backward; plain autograd would keep two or three of them per
term. Forward and backward also walk the rows in blocks of about 4M entries, so their
temporaries stay small whatever N is (an [N, V] gradient is the only full-size output).
The teacher is a constant target: it is detached and gets no gradient.

For a row loss L(q), q = softmax(z), the chain rule through the softmax gives
dL/dz_j = q_j (g_j - Σ_k q_k g_k) with g = dL/dq; each class below writes the result of
that formula for its own L, simplified so that no 0 · inf appears.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import Rows, SharedLogProbs, TermOutput

IGNORE_INDEX = -100
# Entries per row block inside the closed-form functions: 16 MiB float32 temporaries.
BLOCK_ENTRIES = 1 << 22


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64 (exact tests), else float32 (bf16/fp16 inputs too)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_probs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.log_softmax(logits, dim=-1, dtype=dtype)


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_k a_k (log a_k - log b_k) per row, with entries where a_k = 0 contributing 0."""
    a = log_a.exp()
    terms = (log_a - log_b).mul_(a)
    return terms.masked_fill_(a == 0, 0.0).sum(dim=-1)


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
        block_values, block_aux = [], []
        for rows in row_blocks(*student_logits.shape):
            values, row_aux = divergence.values(
                _log_probs(teacher_logits[rows], dtype), _log_probs(student_logits[rows], dtype)
            )
            block_values.append(values)
            block_aux.append(row_aux)
        ctx.divergence = divergence
        ctx.save_for_backward(student_logits, teacher_logits, *(torch.cat(parts) for parts in zip(*block_aux)))
        return torch.cat(block_values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None, None]:
        student_logits, teacher_logits, *row_aux = ctx.saved_tensors
        dtype = compute_dtype(student_logits, teacher_logits)
        grad = torch.empty_like(student_logits)
        for rows in row_blocks(*student_logits.shape):
            block_grad = ctx.divergence.student_logit_grad(
                _log_probs(teacher_logits[rows], dtype),
                _log_probs(student_logits[rows], dtype),
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
        return _kl_rows(log_p, log_q), ()

    def log_prob_grad(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return log_p.exp().neg_()

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return log_q.exp_().sub_(log_p.exp_())


class ReverseKL(Divergence):
    """rkl: KL(q || p). Gradient q_j (log q_j - log p_j - KL)."""

    name = "rkl"

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        kl = _kl_rows(log_q, log_p)
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
        return _kl_rows(log_p, _log_mixture(log_p, log_q, self.alpha)), ()

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
        return _kl_rows(log_q, _log_mixture(log_q, log_p, self.alpha)), ()

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
        values = self.beta * _kl_rows(log_p, log_m) + (1.0 - self.beta) * _kl_rows(log_q, log_m)
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


HEAD_CANDIDATES = 256


def teacher_head_mask(p: Tensor, head_mass: float) -> Tensor:
    """[N, V] bool: the top teacher tokens whose cumulative mass is <= head_mass (AKL's head).

    The top-1 token is always in the head. Tokens tied in probability are ordered as
    torch.topk / torch.sort order them. The head is read from the top HEAD_CANDIDATES
    tokens; only rows whose head reaches past them (flat distributions) are fully sorted.
    """
    candidates = min(HEAD_CANDIDATES, p.shape[-1])
    top_p, top_index = p.topk(candidates, dim=-1)
    head = _head_from_sorted(top_p, top_index, head_mass, p.shape[-1])
    unresolved = top_p.sum(dim=-1) <= head_mass if candidates < p.shape[-1] else torch.zeros_like(head[:, 0])
    if bool(unresolved.any()):
        sorted_p, order = p[unresolved].sort(dim=-1, descending=True)
        head[unresolved] = _head_from_sorted(sorted_p, order, head_mass, p.shape[-1])
    return head


def _head_from_sorted(sorted_p: Tensor, order: Tensor, head_mass: float, vocab: int) -> Tensor:
    """Scatter 'cumulative mass <= head_mass, top-1 always' from sorted order to [n, vocab]."""
    in_head = sorted_p.cumsum(dim=-1) <= head_mass
    in_head[:, 0] = True
    return torch.zeros(sorted_p.shape[0], vocab, dtype=torch.bool, device=sorted_p.device).scatter_(-1, order, in_head)


class AdaptiveKL(Divergence):
    """akl:μ (AKL): w_h·FKL + w_t·RKL with detached weights from the head/tail gap.

    Head H = teacher tokens with cumulative teacher mass <= μ (top-1 always in),
    g_h = Σ_H |p - q|, g_t = Σ_not-H |p - q|, w_h = g_h / (g_h + g_t), w_t = 1 - w_h.
    When g_h + g_t = 0 (p = q) both KLs are 0 and the weights are set to ½ each.
    The gradient treats w_h, w_t as constants, as the method prescribes.
    """

    name = "akl"

    def __init__(self, mu: float = 0.5) -> None:
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"'{self.name}' needs a parameter in [0, 1], got {mu}")
        self.mu = mu

    def head_weight(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """w_h per row [N], detached by construction (no autograd inside a Function)."""
        p = log_p.exp()
        gap = (p - log_q.exp()).abs_()
        head = teacher_head_mask(p, self.mu)
        head_gap = torch.where(head, gap, 0.0).sum(dim=-1)
        tail_gap = gap.masked_fill_(head, 0.0).sum(dim=-1)
        total_gap = head_gap + tail_gap
        return torch.where(total_gap > 0, head_gap / total_gap.clamp_min(torch.finfo(gap.dtype).tiny), 0.5)

    def values(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        head_weight = self.head_weight(log_p, log_q)
        reverse = _kl_rows(log_q, log_p)
        values = head_weight * _kl_rows(log_p, log_q) + (1.0 - head_weight) * reverse
        return values, (head_weight, reverse)

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor, head_weight: Tensor, reverse: Tensor) -> Tensor:
        head_weight = head_weight.unsqueeze(-1)
        reverse_grad = ReverseKL().student_logit_grad(log_p, log_q, reverse)
        forward_grad = log_q.exp_().sub_(log_p.exp_())
        return forward_grad.mul_(head_weight).add_(reverse_grad.mul_(1.0 - head_weight))

    def __repr__(self) -> str:
        return f"akl:{self.mu:g}"


class _CrossEntropyFunction(torch.autograd.Function):
    """values[N] = -log softmax(z)[target], 0 where target == -100; gradient softmax - onehot."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        dtype = compute_dtype(logits)
        ignored = targets == IGNORE_INDEX
        safe_targets = targets.long().masked_fill(ignored, 0).unsqueeze(-1)
        log_normalizer = torch.cat(
            [torch.logsumexp(logits[rows].to(dtype), dim=-1) for rows in row_blocks(*logits.shape)]
        )
        target_logits = logits.gather(-1, safe_targets).squeeze(-1).to(dtype)
        ctx.save_for_backward(logits, safe_targets, ignored)
        return torch.where(ignored, 0.0, log_normalizer - target_logits)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None]:
        logits, safe_targets, ignored = ctx.saved_tensors
        dtype = compute_dtype(logits)
        row_scale = grad_values.to(dtype).masked_fill(ignored, 0.0).unsqueeze(-1)
        grad = torch.empty_like(logits)
        for rows in row_blocks(*logits.shape):
            block_grad = torch.softmax(logits[rows], dim=-1, dtype=dtype)
            block_grad.scatter_add_(-1, safe_targets[rows], torch.full_like(safe_targets[rows], -1, dtype=dtype))
            grad[rows] = block_grad.mul_(row_scale[rows])
        return grad, None


class CrossEntropy:
    """sft: the student's cross-entropy on the ground-truth next token (rows.targets).

    Rows whose target is -100 give 0 and still count in the token mean, so the caller's
    mask should cover exactly the labelled positions. `uses_temperature = False`: the
    objective passes raw student logits, since the temperature is a distillation setting.
    """

    name = "sft"
    unit = "token"
    uses_temperature = False
    uses_teacher = False

    def __call__(self, rows: Rows) -> TermOutput:
        if rows.targets is None:
            raise ValueError("'sft' needs targets (labels) for the scored positions")
        return TermOutput(values=_CrossEntropyFunction.apply(rows.student_logits, rows.targets))

    def from_log_probs(self, shared: SharedLogProbs) -> TermOutput:
        """-log q[target] read from the shared log-softmax (gradient: its backward's softmax - onehot)."""
        if shared.targets is None:
            raise ValueError("'sft' needs targets (labels) for the scored positions")
        ignored = shared.targets == IGNORE_INDEX
        safe_targets = shared.targets.long().masked_fill(ignored, 0).unsqueeze(-1)
        target_log_probs = shared.raw_student.gather(-1, safe_targets).squeeze(-1)
        return TermOutput(values=torch.where(ignored, 0.0, -target_log_probs))

    def __repr__(self) -> str:
        return self.name
