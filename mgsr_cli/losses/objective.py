"""`Objective`: the weighted sum of loss terms over a batch, and its chunked evaluation.

The objective scores rows ([N, V], see base.py): `score_rows` is the per-chunk entry
point of the training loop, and `forward` the [B, T, V] wrapper that masks the rows and
splits them into chunks (`plan_chunks`, which never splits a span pair). Each chunk's
`RowScore` is its share of the batch objective. Kept apart from registry.py, which turns
a spec into terms and hands them to `Objective`, so this module holds only the scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import LossOutput, Rows, Term, TermOutput
from .divergences import compute_dtype

UNITS = ("token", "pair")


@dataclass
class RowScore:
    """One chunk's share of the batch objective; shares of all chunks add up to it.

    loss: differentiable scalar, Σ_terms weight · sum(values) / global count of the unit.
    per_token: [n] detached, Σ_token-terms weight · value, plus each pair term's weighted
    value scaled by token_count / pair_count on the pair's first row, so that the mean of
    per_token over all tokens equals the loss.
    terms / stats: detached shares of each term's unweighted mean and of each stat's mean
    (sum over this chunk / global count).
    """

    loss: Tensor
    per_token: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


def plan_chunks(num_rows: int, chunk_size: int, pairs: Tensor | None) -> list[tuple[int, int]]:
    """[start, end) row ranges of about chunk_size rows that never split a pair.

    pairs: [P, 2] row indices, or None. A boundary that would separate the two rows of a
    pair is moved forward past that pair (and past any pair it then splits).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    reach = _pair_reach(num_rows, pairs)
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < num_rows:
        end = min(start + chunk_size, num_rows)
        while end < num_rows and reach[end - 1] >= end:
            end = reach[end - 1] + 1
        chunks.append((start, end))
        start = end
    return chunks


def _pair_reach(num_rows: int, pairs: Tensor | None) -> list[int]:
    """reach[i]: the furthest row joined by a pair to a row at or before i (at least i)."""
    furthest = torch.arange(num_rows)
    if pairs is not None and pairs.numel() > 0:
        pairs = pairs.cpu()
        furthest.scatter_reduce_(0, pairs.min(dim=1).values, pairs.max(dim=1).values, reduce="amax")
    return furthest.cummax(dim=0).values.tolist()


def pairs_within(pairs: Tensor | None, start: int, end: int) -> Tensor | None:
    """The pairs whose rows both lie in [start, end), re-indexed to the chunk (`plan_chunks` never splits one)."""
    if pairs is None:
        return None
    inside = (pairs.min(dim=1).values >= start) & (pairs.max(dim=1).values < end)
    return pairs[inside] - start


class Objective(nn.Module):
    """Σ weight · mean(term) over a batch. Holds the terms; nn.Module terms (DAC-KL) are
    registered as submodules so `parameters()` yields their learnable parameters.

    temperature divides both logits for the distillation terms; `sft` (any term with
    `uses_temperature = False`) sees the raw student logits, because the cross-entropy on
    the ground truth is not a distillation target. No T² factor is applied here;
    build_loss(temperature_squared=True) folds it into the weights. The teacher never
    receives gradient.

    fused (default): every term reads one shared teacher and student log-softmax per block
    of rows, with the gradient taken block by block (fused.py). fused=False scores term by
    term, each from the logits: the reference the fused pass is tested against.
    """

    def __init__(
        self,
        weighted_terms: Sequence[tuple[Term, float]],
        *,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        _check_terms(weighted_terms)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.weighted_terms = list(weighted_terms)
        self.term_modules = nn.ModuleDict({term.name: term for term, _ in weighted_terms if isinstance(term, nn.Module)})
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.fused = fused

    @property
    def uses_fused(self) -> bool:
        """The fused pass scores the rows: asked for, and at least two terms read its shared
        log-probabilities (`from_log_probs`); with fewer there is nothing to share."""
        return self.fused and sum(hasattr(term, "from_log_probs") for term, _ in self.weighted_terms) >= 2

    @property
    def has_pair_terms(self) -> bool:
        return any(term.unit == "pair" for term, _ in self.weighted_terms)

    def extra_repr(self) -> str:
        # module terms print themselves as submodules; name them only
        labels = [term.name if isinstance(term, nn.Module) else repr(term) for term, _ in self.weighted_terms]
        terms = ", ".join(f"{label}={weight:g}" for label, (_, weight) in zip(labels, self.weighted_terms))
        return f"{terms}, temperature={self.temperature:g}, chunk_size={self.chunk_size}"

    def score_rows(self, rows: Rows, token_count: int, pair_count: int) -> RowScore:
        """Score one chunk of rows against the GLOBAL counts of tokens and pairs.

        rows: [n, V] logits of any float dtype (raw: the temperature is applied here),
        targets [n] when `sft` is used, pairs [p, 2] within the chunk when a pair term is.
        Summing the returned shares over all chunks gives the batch loss and its gradient.
        """
        _check_vocab(rows.student_logits, rows.teacher_logits)
        if self.has_pair_terms and rows.pairs is None:
            raise ValueError("a pair term (span) needs rows.pairs; pass an empty [0, 2] tensor when there are none")
        if rows.num_rows == 0:
            return self._empty_score(rows, compute_dtype(rows.student_logits, rows.teacher_logits))
        if self.uses_fused:
            from .fused import fused_score  # fused.py builds on this module's RowScore and chunk plans

            return fused_score(self, rows, token_count, pair_count)
        raw_rows, scaled_rows = self._rows_for_terms(rows)
        outputs = [term(scaled_rows if getattr(term, "uses_temperature", True) else raw_rows) for term, _ in self.weighted_terms]
        return self.score_outputs(rows, outputs, token_count, pair_count)

    def score_outputs(self, rows: Rows, outputs: Sequence[TermOutput], token_count: int, pair_count: int) -> RowScore:
        """The RowScore of `rows` from each term's output on them (in `weighted_terms` order)."""
        dtype = compute_dtype(rows.student_logits, rows.teacher_logits)
        counts = {"token": max(token_count, 1), "pair": max(pair_count, 1)}
        per_token = torch.zeros(rows.num_rows, dtype=dtype, device=rows.student_logits.device)
        contributions, terms, stats = [], {}, {}
        for (term, weight), output in zip(self.weighted_terms, outputs):
            count = counts[term.unit]
            contributions.append(weight * output.values.sum() / count)
            values = output.values.detach()
            terms[term.name] = values.sum() / count
            stats.update({name: stat.detach().sum() / count for name, stat in output.stats.items()})
            if term.unit == "token":
                per_token += weight * values
            else:
                per_token.index_add_(0, rows.pairs[:, 0], weight * values * (token_count / counts["pair"]))
        return RowScore(loss=sum(contributions), per_token=per_token, terms=terms, stats=stats)

    def _empty_score(self, rows: Rows, dtype: torch.dtype) -> RowScore:
        """Zero loss that is still part of the student's graph, so backward gives zeros."""
        loss = rows.student_logits.sum().to(dtype)
        zero = torch.zeros((), dtype=dtype, device=loss.device)
        terms = {term.name: zero for term, _ in self.weighted_terms}
        return RowScore(loss=loss, per_token=torch.zeros(0, dtype=dtype, device=loss.device), terms=terms)

    def _rows_for_terms(self, rows: Rows) -> tuple[Rows, Rows]:
        """(raw rows, temperature-scaled rows); the teacher is detached in both."""
        teacher_logits = rows.teacher_logits.detach()
        raw_rows = Rows(rows.student_logits, teacher_logits, rows.targets, rows.pairs)
        if self.temperature == 1.0:
            return raw_rows, raw_rows
        scaled = Rows(rows.student_logits / self.temperature, teacher_logits / self.temperature, rows.targets, rows.pairs)
        return raw_rows, scaled

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor,
        labels: Tensor | None = None,
        span_pairs: Tensor | None = None,
    ) -> LossOutput:
        """The loss of a [B, T, V] batch over the positions where mask [B, T] is True.

        labels [B, T]: the token that the logits at each position predict (input ids
        shifted left), -100 to ignore; needed by `sft`. span_pairs [P, 3]: (b, t1, t2)
        logit positions, both masked; needed by pair terms (empty [0, 3] when none).
        With chunk_size set, the masked rows are scored in chunks under activation
        checkpointing, so only one chunk's V-wide intermediates live at a time; the
        value and gradients equal the unchunked ones. Chunking pays off for terms with
        autograd intermediates (DAC-KL, span, rank). The closed-form divergences already
        bound their temporaries by row blocks, so for them chunking only adds the forward
        recomputation and one extra [N, V] tensor while the chunk gradients are joined.
        """
        _check_batch(student_logits, teacher_logits, mask)
        mask = mask.bool()
        student_rows = student_logits[mask]
        teacher_rows = teacher_logits.detach()[mask]
        targets = labels[mask] if labels is not None else None
        pairs = self._pair_rows(span_pairs, mask)
        token_count = student_rows.shape[0]
        pair_count = 0 if pairs is None else pairs.shape[0]
        if token_count == 0:
            scores = [self.score_rows(Rows(student_rows, teacher_rows, targets, pairs), 0, pair_count)]
        else:
            scores = self._score_chunks(Rows(student_rows, teacher_rows, targets, pairs), pair_count)
        return _combine(scores, mask)

    def _score_chunks(self, rows: Rows, pair_count: int) -> list[RowScore]:
        token_count = rows.num_rows
        if self.chunk_size is None or self.chunk_size >= token_count:
            return [self.score_rows(rows, token_count, pair_count)]
        chunks = plan_chunks(token_count, self.chunk_size, rows.pairs)
        lengths = [end - start for start, end in chunks]
        # one split (not one slice per chunk) so backward assembles the row gradient once
        student_chunks = rows.student_logits.split(lengths)
        teacher_chunks = rows.teacher_logits.split(lengths)
        target_chunks = rows.targets.split(lengths) if rows.targets is not None else [None] * len(chunks)
        scores = []
        for (start, end), student, teacher, targets in zip(chunks, student_chunks, teacher_chunks, target_chunks):
            chunk = Rows(student, teacher, targets, pairs_within(rows.pairs, start, end))
            if self.uses_fused:  # keeps only gradients already (fused.py): checkpointing would recompute it
                scores.append(self.score_rows(chunk, token_count, pair_count))
            else:
                scores.append(checkpoint(self.score_rows, chunk, token_count, pair_count, use_reentrant=False))
        return scores

    def _pair_rows(self, span_pairs: Tensor | None, mask: Tensor) -> Tensor | None:
        """(b, t1, t2) positions -> [P, 2] indices into the masked rows (row-major order)."""
        if not self.has_pair_terms:
            return None
        if span_pairs is None:
            raise ValueError("a pair term (span) needs span_pairs; pass an empty [0, 3] tensor when there are none")
        row_of = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        row_of[mask] = torch.arange(int(mask.sum()), device=mask.device)
        span_pairs = span_pairs.long()
        first = row_of[span_pairs[:, 0], span_pairs[:, 1]]
        second = row_of[span_pairs[:, 0], span_pairs[:, 2]]
        if bool((first < 0).any() or (second < 0).any()):
            raise ValueError("every span pair must join two positions where the mask is True")
        return torch.stack([first, second], dim=1)


def _combine(scores: list[RowScore], mask: Tensor) -> LossOutput:
    per_row = torch.cat([score.per_token for score in scores])
    per_token = torch.zeros(mask.shape, dtype=per_row.dtype, device=per_row.device)
    per_token[mask] = per_row
    terms = {name: sum(score.terms[name] for score in scores) for name in scores[0].terms}
    stats = {name: float(sum(score.stats.get(name, 0.0) for score in scores)) for name in scores[0].stats}
    return LossOutput(loss=sum(score.loss for score in scores), per_token=per_token, terms=terms, stats=stats)


def _check_terms(weighted_terms: Sequence[tuple[Term, float]]) -> None:
    if not weighted_terms:
        raise ValueError("an objective needs at least one term")
    names = [term.name for term, _ in weighted_terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"loss spec repeats {', '.join(repeated)}; give each term once with its weight")
    for term, _ in weighted_terms:
        if term.unit not in UNITS:
            raise ValueError(f"term {term.name!r} has unit {term.unit!r}; expected one of {', '.join(UNITS)}")


def _check_vocab(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher and student vocabularies differ ({teacher_logits.shape[-1]} vs {student_logits.shape[-1]}); "
            "slice both logits to the tokenizer's vocabulary first"
        )


def _check_batch(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
    _check_vocab(student_logits, teacher_logits)
    if student_logits.dim() != 3 or teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"expected student and teacher logits [B, T, V] of the same B, T; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
