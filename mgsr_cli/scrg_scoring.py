"""SCRG's scoring (method.md section 1): the divergence d_i between teacher and student at every
eligible response position, and j, the position with the largest d_i where the teacher's proposal
differs from the student's token.

One forward per model over the batch; the distributions are projected only at the window
positions, in chunks, never [B, W, V]; sampled proposals are drawn lazily, from the largest d_i
down (`first_disagreements`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mgsr_cli.heads import hidden_states, project
from mgsr_cli.kv_cache import reusable
from mgsr_cli.sampling import position_ids_from_mask

# Logit elements per scoring chunk (per model): 2^22 floats = 16 MiB, ~80 positions at V = 50k.
# Measured fastest on CPU: larger chunks fault in more fresh memory than they gain in the matmul.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class WindowScores:
    """divergence: [B, S] d_i at slot s = window position start + s (-inf past the window);
    columns: [B, S] the column of the hidden state that predicts each slot;
    teacher_hidden: [B, W, H]; student_cache: the student's cache over the same inputs, None where
    it is not `kv_cache.reusable` (re-generation then encodes the kept prefix again)."""

    divergence: Tensor
    columns: Tensor
    teacher_hidden: Tensor
    student_cache: object


def score_windows(
    teacher, student, input_ids: Tensor, attention_mask: Tensor, sizes: Tensor, divergence: str, vocab_size: int
) -> WindowScores:
    """One forward per model over left-padded inputs whose row b ends with the sizes[b] hidden
    states that predict its window (row = prompt + response[:end - 1]); d_i at those positions
    only, projected in chunks, never [B, W, V]."""
    device = input_ids.device
    teacher_device = next(teacher.parameters()).device
    position_ids = position_ids_from_mask(attention_mask)
    teacher_inputs = (tensor.to(teacher_device) for tensor in (input_ids, attention_mask, position_ids))
    teacher_hidden, _ = hidden_states(teacher, *teacher_inputs)
    student_hidden, cache = hidden_states(student, input_ids, attention_mask, position_ids, use_cache=True)
    in_window = torch.arange(int(sizes.max()), device=device) < sizes[:, None]
    columns = input_ids.shape[1] - sizes[:, None] + torch.arange(in_window.shape[1], device=device)
    rows, flat_columns = in_window.nonzero(as_tuple=True)[0], columns[in_window]
    chunk = min(max(1, CHUNK_ELEMENTS // vocab_size), len(rows))
    scratch = (torch.empty((chunk, vocab_size), device=device), torch.empty((chunk, vocab_size), device=device))
    values = []
    for begin in range(0, len(rows), chunk):
        row, column = rows[begin : begin + chunk], flat_columns[begin : begin + chunk]
        teacher_logits = project(teacher, teacher_hidden[row.to(teacher_device), column.to(teacher_device)], vocab_size).to(device)
        student_logits = project(student, student_hidden[row, column], vocab_size)
        values.append(token_divergence(divergence, teacher_logits, student_logits, scratch))
    scores = torch.full(in_window.shape, float("-inf"), device=device)
    scores[in_window] = torch.cat(values)
    return WindowScores(scores, columns.clamp(min=0), teacher_hidden, cache if reusable(cache) else None)


def token_divergence(kind: str, teacher_logits: Tensor, student_logits: Tensor, scratch: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """d_i [N] for [N, V] logits, in float32: fkl KL(p||q), rkl KL(q||p), js ½KL(p||m) + ½KL(q||m).

    The loss library's values (a test checks it), computed without autograd and in place: this
    runs on every response token. `scratch`: two float32 buffers of at least [N, V] to reuse
    over chunks; fresh V-wide allocations per chunk make the CPU allocator return memory and
    fault it in again, which costs more than the arithmetic. Logits must be finite.
    """
    rows = teacher_logits.shape[0]
    log_p_out, log_q_out = (buffer[:rows] for buffer in scratch) if scratch is not None else (None, None)
    log_p = torch.log_softmax(teacher_logits, -1, dtype=torch.float32, out=log_p_out)
    log_q = torch.log_softmax(student_logits, -1, dtype=torch.float32, out=log_q_out)
    if kind == "fkl":
        return _kl_in_place(log_p, log_q)
    if kind == "rkl":
        return _kl_in_place(log_q, log_p)
    log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
    return 0.5 * (_kl_in_place(log_p, log_m.clone()) + _kl_in_place(log_q, log_m))


def _kl_in_place(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_k a_k (log a_k - log b_k) per row; overwrites both arguments."""
    torch.sub(log_a, log_b, out=log_b)
    return torch.linalg.vecdot(log_a.exp_(), log_b)


def first_disagreements(
    divergence: Tensor, sizes: Tensor, student_tokens: Tensor, propose: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """j per row: the slot with the largest d among those where the teacher's proposal differs
    from the student's token. found [B] bool, slot [B], teacher token [B] (0 where not found).

    Proposals are drawn lazily: each row's slots are visited from the largest d down (ties: the
    earlier slot first) and `propose(rows, slots)` is asked only until a row has a disagreement.
    Since proposals at different positions are independent, this picks j with exactly the
    distribution of drawing every proposal first, at the cost of about one draw per row instead
    of one per token. Ranks are visited in blocks of 1, 2, 4, ... per row still searching.
    """
    rows_total, width = divergence.shape
    device = divergence.device
    order = divergence.argsort(dim=1, descending=True, stable=True)  # -inf (past the window) last
    found = torch.zeros(rows_total, dtype=torch.bool, device=device)
    slots = torch.zeros(rows_total, dtype=torch.long, device=device)
    tokens = torch.zeros(rows_total, dtype=torch.long, device=device)
    low, block = 0, 1
    while low < width:
        ranks = torch.arange(low, min(low + block, width), device=device)
        live = ~found[:, None] & (ranks < sizes[:, None])
        if not bool(live.any()):
            break
        rows, cells = live.nonzero(as_tuple=True)
        candidate_slots = order[rows, ranks[cells]]
        proposals = propose(rows, candidate_slots)
        hits = torch.zeros_like(live)
        hits[rows, cells] = proposals != student_tokens[rows, candidate_slots]
        drawn = torch.zeros(live.shape, dtype=torch.long, device=device)
        drawn[rows, cells] = proposals
        new = hits.any(dim=1)
        first = hits.long().argmax(dim=1)  # the first hit in rank order
        slots[new] = order[new, low + first[new]]
        tokens[new] = drawn[new, first[new]]
        found |= new
        low, block = low + block, block * 2
    return found, slots, tokens
