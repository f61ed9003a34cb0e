"""SCRG's re-generation: the student continues after the kept prefix y^s_<j and the teacher's
token y^t_j, from the cache of its scoring forward where that is exact, else by encoding the
kept prefix again (a sliding-window layer that has already dropped columns)."""

from __future__ import annotations

import torch
from torch import Tensor

from mgsr_cli.config import SamplingConfig
from mgsr_cli.kv_cache import reusable, select_positions
from mgsr_cli.sampling import Continuations, TokenSpace, continue_sampling, forward_step, position_ids_from_mask


def regenerate(
    student,
    cache,
    input_ids: Tensor,
    lengths: Tensor,
    rows: Tensor,
    keep: Tensor,
    teacher_tokens: Tensor,
    budgets: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    token_space: TokenSpace,
) -> Continuations:
    """Let the student continue row rows[b] of a teacher-forced pass after its first keep[b] tokens
    and teacher_tokens[b], with up to budgets[b] new tokens (see `resume_after_prefix`). The
    result is what sampling after encoding prompt + prefix + teacher token would give, with the
    same generator state. The cache is consumed."""
    next_logits, cache, attention_mask = resume_after_prefix(student, cache, input_ids, lengths, rows, keep, teacher_tokens)
    return continue_sampling(
        student, next_logits, cache, attention_mask, keep + 1, budgets, sampling, generator, token_space
    )


def resume_after_prefix(
    student, cache, input_ids: Tensor, lengths: Tensor, rows: Tensor, keep: Tensor, teacher_tokens: Tensor
) -> tuple[Tensor, object, Tensor]:
    """(next-token logits [B', V'], cache, attention mask) after row rows[b]'s first keep[b] tokens
    and teacher_tokens[b], the kept prefixes moved to the right edge of max(keep) columns.

    input_ids / cache: the student's left-padded inputs and its cache over them (or None), row r
    holding lengths[r] real tokens at its right edge (position ids from 0 at the first real
    token). Where the cache holds every column (`kv_cache.reusable`), the prefix is not encoded
    again; otherwise (a sliding window shorter than the inputs, an unknown layer type) it is.
    """
    width, new_width = input_ids.shape[1], int(keep.max())
    columns = torch.arange(new_width, device=keep.device)
    first = width - lengths[rows] + keep - new_width  # source column of each row's new column 0
    source = (first[:, None] + columns).clamp(min=0)
    attention_mask = (columns >= new_width - keep[:, None]).long()
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
    if cache is not None and reusable(cache):
        select_positions(cache, rows, source)
        next_logits, cache = forward_step(student, teacher_tokens[:, None], attention_mask, keep[:, None], cache)
    else:
        prefix = torch.cat([input_ids[rows[:, None], source], teacher_tokens[:, None]], dim=1)
        next_logits, cache = forward_step(student, prefix, attention_mask, position_ids_from_mask(attention_mask))
    return next_logits, cache, attention_mask
