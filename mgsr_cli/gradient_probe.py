"""Each loss term's share of the gradient, measured on logging steps (metrics.jsonl
`grad_norm/<term>`, `grad_share/<term>`; losses/gradient_share.py defines them).

On a logging step the training loop hands over the first micro-batch's parts. For each part
the student's first PROBE_ROWS scored rows are run again without grad and projected through
both output layers (a span pair is never cut), and each term is differentiated alone with
respect to those student logits. Other steps run nothing extra. The student is put in eval
mode for the probe, so a dropout draw never shifts the run's random stream. On several
processes each one probes its own rows, and the main process's values are logged.
"""

from __future__ import annotations

import torch
from torch import nn

from mgsr_cli.heads import hidden_states, project
from mgsr_cli.losses import Rows, pairs_within, plan_chunks
from mgsr_cli.losses.gradient_share import gradient_shares, term_gradient_norms

# Rows per part: enough for a stable share, a small fraction of a step's cost at V = 50k.
PROBE_ROWS = 128


def probe_gradient_shares(parts, student: nn.Module, teacher: nn.Module | None, vocab_size: int) -> dict[str, float]:
    """grad_norm/<term> and grad_share/<term> over the terms of `parts` (objects with batch,
    objective and teacher_hidden, as the training loop builds them)."""
    was_training = student.training
    student.eval()
    try:
        norms: dict[str, float] = {}
        for part in parts:
            rows = _probe_rows(part, student, teacher, vocab_size)
            if rows is not None:
                norms.update(term_gradient_norms(part.objective, rows))
    finally:
        student.train(was_training)
    return gradient_shares(norms)


@torch.no_grad()
def _probe_rows(part, student: nn.Module, teacher: nn.Module | None, vocab_size: int) -> Rows | None:
    batch = part.batch
    if batch.num_rows == 0:
        return None
    _, end = plan_chunks(batch.num_rows, PROBE_ROWS, batch.pairs)[0]
    positions = batch.rows[:end]
    hidden, _ = hidden_states(student, batch.input_ids, batch.attention_mask)
    student_logits = project(student, hidden[positions[:, 0], positions[:, 1]], vocab_size)
    if part.teacher_hidden is not None and teacher is not None:
        teacher_logits = project(teacher, part.teacher_hidden[:end], vocab_size)
    else:  # sft alone reads no teacher
        teacher_logits = torch.zeros_like(student_logits)
    return Rows(student_logits, teacher_logits, batch.targets[:end], pairs_within(batch.pairs, 0, end))
