"""Loss library: token divergences, ranking, DAC-KL, span consistency and their objective.

`build_loss(spec, ...)` is the entry point; see registry.py for the spec grammar,
objective.py for how the terms are scored and base.py for the row interface every
term implements.
"""

from __future__ import annotations

from .base import LossOutput, Rows, Term, TermOutput
from .objective import Objective, RowScore, pairs_within, plan_chunks
from .registry import LOSS_NAMES, build_loss, parse_spec

__all__ = [
    "LOSS_NAMES",
    "LossOutput",
    "Objective",
    "RowScore",
    "Rows",
    "Term",
    "TermOutput",
    "build_loss",
    "pairs_within",
    "parse_spec",
    "plan_chunks",
]
