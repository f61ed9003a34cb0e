"""Loss library: token divergences, ranking, DAC-KL, span consistency and their objective.

`build_loss(spec, ...)` is the entry point; see registry.py for the spec grammar and
base.py for the row interface every term implements.
"""

from __future__ import annotations

from .base import LossOutput, Rows, Term, TermOutput
from .registry import LOSS_NAMES, Objective, RowScore, build_loss, pairs_within, parse_spec, plan_chunks

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
