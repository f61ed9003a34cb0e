"""Loss specs -> terms -> `Objective` (objective.py): the names, options and parsing.

A spec names one term (`fkl`, `skl:0.1`, `rank:5`) or a comma-separated weighted sum
(`sft=1,dac_kl=1,span=1`; `=w` defaults to 1, so `sft,fkl` works too). Each term's mean
is taken over its own unit (response tokens, or span pairs) for the whole batch, then
weighted and summed. This module owns the registry of loss names, their parameters and
options, and `build_loss`; how the objective scores rows lives in objective.py.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass

from .adaptive_kl import AdaptiveKL
from .base import Term
from .cross_entropy import CrossEntropy
from .divergences import (
    ForwardKL,
    GeneralizedJSD,
    JensenShannon,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
)
from .objective import Objective
from .ranking import RankLoss

LOSS_NAMES = ("sft", "fkl", "kd", "rkl", "skl", "srkl", "gjsd", "js", "tvd", "akl", "rank", "dac_kl", "span")
PARAM_DEFAULTS: dict[str, float | int] = {"skl": 0.1, "srkl": 0.1, "gjsd": 0.5, "akl": 0.5, "rank": 5}
# DacKL's constructor options (method.md's and the reconstructed ones); see term_options
DAC_OPTIONS = (
    "dac_input",
    "dac_hidden",
    "dac_top",
    "dac_quantile_space",
    "dac_mode",
    "dac_components",
    "dac_fixed_quantiles",
    "dac_normalize",
    "dac_kappa",
    "dac_l_min",
    "dac_l_max",
    "dac_coverage_rho",
    "dac_coverage_weight",
    "dac_target",
)
# Read when batches are built (mgsr_cli/spans.py), not by the loss; accepted and ignored here.
BATCH_OPTIONS = ("span_prior", "span_pairs")


@dataclass(frozen=True)
class TermSpec:
    """One parsed spec item: `name[:param][=weight]`."""

    name: str
    param: str | None
    weight: float


def parse_spec(spec: str) -> list[TermSpec]:
    """Parse `name[:param][=weight],...`; raises ValueError naming the valid losses."""
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise ValueError(f"empty item in loss spec {spec!r}; write e.g. 'fkl' or 'sft=1,dac_kl=1,span=1'")
    return [_parse_item(item, spec) for item in items]


def _parse_item(item: str, spec: str) -> TermSpec:
    term_text, has_weight, weight_text = item.partition("=")
    name, has_param, param = (part.strip() for part in term_text.partition(":"))
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r} in spec {spec!r}; valid: {', '.join(LOSS_NAMES)}")
    if has_param and name not in PARAM_DEFAULTS:
        raise ValueError(f"loss {name!r} takes no ':param'; losses with one: skl:α, srkl:α, gjsd:β, akl:μ, rank:k")
    return TermSpec(name, param if has_param else None, _parse_weight(weight_text, item) if has_weight else 1.0)


def _parse_weight(text: str, item: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"weight of {item!r} is not a number; write e.g. 'fkl=1' or 'rank:5=2'") from None
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight of {item!r} must be a finite number >= 0")
    return weight


def _parse_param(name: str, text: str | None) -> float | int:
    if text is None:
        return PARAM_DEFAULTS[name]
    kind = int if name == "rank" else float
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"parameter of '{name}:{text}' is not {'an integer' if kind is int else 'a number'}") from None


def term_options() -> dict[str, tuple[str, ...]]:
    """The option names each configurable term accepts.

    DAC-KL's and span's are their constructors' keyword names, read when their modules
    exist (they are written in parallel), else the method.md names.
    """
    return {
        "dac_kl": _constructor_options("dac_kl", "DacKL", DAC_OPTIONS),
        "span": _constructor_options("span", "SpanLoss", ("span_relation",)),
        "rank": ("rank_on", "rank_temperature", "rank_method", "rank_union"),
    }


def _constructor_options(module_name: str, class_name: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    qualified_name = f"{__package__}.{module_name}"
    try:
        module = importlib.import_module(qualified_name)
    except ModuleNotFoundError as error:
        if error.name != qualified_name:
            raise
        return fallback
    return tuple(inspect.signature(getattr(module, class_name)).parameters)


def _term_options(name: str, options: dict[str, object]) -> dict[str, object]:
    """The options that belong to `name`; None means 'the term's default'."""
    accepted = term_options().get(name, ())
    return {key: value for key, value in options.items() if key in accepted and value is not None}


def _build_term(spec: TermSpec, options: dict[str, object]) -> Term:
    param = _parse_param(spec.name, spec.param) if spec.name in PARAM_DEFAULTS else None
    own_options = _term_options(spec.name, options)
    match spec.name:
        case "sft":
            return CrossEntropy()
        case "fkl" | "kd":
            return ForwardKL()
        case "rkl":
            return ReverseKL()
        case "skl":
            return SkewForwardKL(param)
        case "srkl":
            return SkewReverseKL(param)
        case "gjsd":
            return GeneralizedJSD(param)
        case "js":
            return JensenShannon()
        case "tvd":
            return TotalVariation()
        case "akl":
            return AdaptiveKL(param)
        case "rank":
            return RankLoss(param, **own_options)
        case "dac_kl":
            from .dac_kl import DacKL  # written in parallel; imported only when asked for

            return DacKL(**own_options)
        case "span":
            from .span import SpanLoss

            return SpanLoss(**own_options)
    raise AssertionError(f"no builder for {spec.name}")  # LOSS_NAMES and the match must agree


def _check_options(options: dict[str, object]) -> None:
    known = {key for keys in term_options().values() for key in keys} | set(BATCH_OPTIONS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown loss option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")


def build_loss(
    spec: str,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    fused: bool = True,
    temperature_squared: bool = False,
    **options: object,
) -> Objective:
    """Build the objective for `spec` (e.g. 'skl:0.1', 'rank:5,fkl=0.5', 'sft,dac_kl,span').

    options: the method.md option names (dac_*, span_relation, rank_on, rank_temperature;
    span_prior / span_pairs are batch-building options and ignored here). Options of terms
    absent from the spec are ignored, so a recipe can carry all of them; a name unknown to
    every term is a ValueError.
    temperature_squared (a loss option, default off): multiply the weight of every term
    that sees temperature-scaled logits by T², as Hinton et al. and f-DISTILL's word-level
    KD (MANGA-UOFA/fdistill, dart/distillation.py) do, so the gradient keeps its size as T
    grows. Logged term values stay unweighted.
    """
    if not isinstance(temperature_squared, bool):
        raise ValueError(f"temperature_squared must be true or false, got {temperature_squared!r}")
    _check_options(options)
    factor = temperature**2 if temperature_squared else 1.0
    weighted_terms = []
    for term_spec in parse_spec(spec):
        term = _build_term(term_spec, options)
        scaled = getattr(term, "uses_temperature", True)
        weighted_terms.append((term, term_spec.weight * factor if scaled else term_spec.weight))
    return Objective(weighted_terms, temperature=temperature, chunk_size=chunk_size, fused=fused)
