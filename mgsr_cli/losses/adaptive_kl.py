"""akl:μ (AKL, Wu et al.): adaptive FKL/RKL mix weighted by the teacher's head/tail gap.

The one divergence that needs more than the two log-probs elementwise: it picks each
row's teacher head (the top tokens up to mass μ, `teacher_head_mask`) to weigh FKL
against RKL. It plugs into divergences.py's closed-form machinery as any `Divergence`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .divergences import Divergence, ReverseKL, kl_rows

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
        reverse = kl_rows(log_q, log_p)
        values = head_weight * kl_rows(log_p, log_q) + (1.0 - head_weight) * reverse
        return values, (head_weight, reverse)

    def student_logit_grad(self, log_p: Tensor, log_q: Tensor, head_weight: Tensor, reverse: Tensor) -> Tensor:
        head_weight = head_weight.unsqueeze(-1)
        reverse_grad = ReverseKL().student_logit_grad(log_p, log_q, reverse)
        forward_grad = log_q.exp_().sub_(log_p.exp_())
        return forward_grad.mul_(head_weight).add_(reverse_grad.mul_(1.0 - head_weight))

    def __repr__(self) -> str:
        return f"akl:{self.mu:g}"
