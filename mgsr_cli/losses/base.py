"""The shared vocabulary of the loss library: what a loss term sees and returns.

Every loss works on *rows*: the response positions of a batch gathered into a flat
[N, V] tensor. Working on rows (not [B, T, V]) is what lets the training loop score only
response positions and process them in token chunks; the [B, T, V] public API
(`build_loss(...)(student_logits, teacher_logits, mask)`) is a thin wrapper that gathers
the masked rows and scatters the per-token values back.

A term returns one value per row (`unit == "token"`) or one per span pair
(`unit == "pair"`). The objective sums them per chunk and divides by the global count of
that unit, so chunked and unchunked evaluation give the same mean and the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from torch import Tensor

Unit = Literal["token", "pair"]


@dataclass
class Rows:
    """The scored positions of a batch, flattened.

    student_logits / teacher_logits: [N, V] for the same N positions (any float dtype;
    terms compute in float32 or better). targets: [N] long, the ground-truth next token
    at each position (needed by `sft`, DAC-KL's target class falls back to the teacher
    argmax). pairs: [P, 2] long indices into the N rows, the (i, i+1)-style span pairs
    used by the span term; every pair lies inside one chunk.
    """

    student_logits: Tensor
    teacher_logits: Tensor
    targets: Tensor | None = None
    pairs: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.student_logits.shape[0]


@dataclass
class SharedLogProbs:
    """What the fused objective (fused.py) computes once per block of rows for every term.

    student: [n, V] floored log-softmax of the temperature-scaled student logits,
    differentiable; teacher: [n, V] the same for the teacher, detached. raw_student: [n, V]
    of the unscaled student logits, for terms with `uses_temperature = False` (the same
    tensor when the temperature is 1). targets [n] and pairs [p, 2] as in `Rows`. Log 0
    is the finite floor of dac_band.LOG_FLOOR, so no term sees -inf.
    """

    student: Tensor
    teacher: Tensor
    raw_student: Tensor
    targets: Tensor | None = None
    pairs: Tensor | None = None


@dataclass
class TermOutput:
    """values: [N] (token unit) or [P] (pair unit), float32 or float64, differentiable.

    stats: per-row (or per-pair) detached tensors to average for logging, e.g. DAC-KL's
    `dac_l`, `dac_u`, `dac_band_size`, `dac_band_mass`.
    """

    values: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class Term(Protocol):
    """One named loss term. Modules (DAC-KL) and plain callables both qualify.

    A term may also define `from_log_probs(shared: SharedLogProbs) -> TermOutput`, the same
    values from the shared log-probabilities; the fused objective uses it where it exists
    and calls the term on the block's logits otherwise.
    """

    name: str
    unit: Unit

    def __call__(self, rows: Rows) -> TermOutput: ...


@dataclass
class LossOutput:
    """The result of a loss on a [B, T, V] batch or on a set of row chunks.

    loss: scalar, the weighted sum of each term's mean over its unit.
    per_token: [B, T] (0 where the mask is False) for the public API, [N] for rows; a
    pair-unit term attributes each pair's value to the pair's first token.
    terms: each term's unweighted mean, detached, for logging.
    stats: averaged diagnostics (floats), for logging.
    """

    loss: Tensor
    per_token: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

