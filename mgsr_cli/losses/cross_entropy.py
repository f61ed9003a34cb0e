"""sft: the student's cross-entropy on the ground-truth next token (no teacher involved).

Not a teacher-student divergence, but built the same way: a closed-form autograd Function
that walks the rows in divergences.py's row blocks, so the [N, V] loss keeps no V-wide
intermediate between forward and backward, and a `from_log_probs` path for the fused pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import Rows, SharedLogProbs, TermOutput
from .divergences import compute_dtype, row_blocks

IGNORE_INDEX = -100


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
