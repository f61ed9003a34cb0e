"""DAC-KL: distribution-adaptive clipping KL, MGSR's token-level loss (method.md section 2).

Per response position i, a small network f_sub reads the teacher distribution p_i and
predicts quantile levels l_i <= u_i. The teacher probabilities between the l- and
u-quantiles form a soft band m_i; teacher and student are compared on the band plus the
teacher's target class c_i:

    P_i = [m_i * p_i, p_ic],  Q_i = [m_i * q_i, q_ic]   (V + 1 entries)
    value_i = KL(P_i / sum P_i || Q_i / sum Q_i) + lambda_cov * max(0, rho - band mass)^2

The band depends on the teacher and f_sub only, so the student is compared on the same
entries as the teacher, and gradients reach both the student logits and f_sub.

Provenance: MGSR's method text is not available. Everything beyond that summary is
[reconstructed], and each reconstructed choice is a named constructor option:
- `dac_input`: f_sub's features, "sorted_probs" (top `dac_top` teacher probabilities in
  descending order, plus the teacher entropy) or "sorted_logprobs" (the same with
  log-probabilities, floored at -30).
- f_sub's initialisation: its output layer starts at zero weights, with biases such that
  l = 0.95 and u = l + (1 - l) * 0.9999 for every input (u so close to 1 that even a
  50257-token vocabulary keeps its head), while the hidden layer has PyTorch's default
  initialisation.
- `dac_quantile_space`: "value" takes the thresholds as quantiles of the teacher
  probability values. We interpolate between order statistics in log space, which is the
  same as the linear-interpolated quantile of log p. With descending ranks
  r = 0..S-1 over the S tokens of nonzero probability, the band is about the tokens with
  (1 - u)(S - 1) < r <= (1 - l)(S - 1). "cumulative" takes mass-weighted quantiles
  instead: with x_r the teacher mass ranked above rank r, the band is the tokens with
  1 - u < x_r <= 1 - l. In that space the band holds about u - l of the teacher mass, so
  the default initial l = 0.95 starts from a band of only the most likely tokens, and the
  coverage guard then widens it.
- Soft mask in log space, with temperature `dac_kappa`.
- `dac_mode`: "mask" multiplies p and q by the mask m. "winsorize" keeps every token of
  the teacher's support and clamps each teacher probability into [tau_l, tau_u]. The
  student's entry is scaled by the same factor clamp(p_k)/p_k, so the two stay
  comparable entry by entry and the factor still depends on the teacher alone.
- `dac_target`: the target class is the teacher argmax ("teacher_argmax", as in
  method.md), or "label", which uses rows.targets and falls back to the teacher argmax
  where a target is missing or negative.
- `dac_components`: "both" uses the V + 1 vector above, and "band" drops the target entry.
  "target" keeps only the target class, as the binary distribution
  [p_c, 1 - p_c] vs [q_c, 1 - q_c]. Renormalising the single entry alone would give
  1 vs 1 and a constant zero. Under "target", f_sub learns from the coverage guard alone.
- `dac_normalize`: when False, the loss is the generalised KL
  sum(a log(a / b) - a + b) over the unnormalised vectors.
- `dac_fixed_quantiles`: fixed [l, u] replaces f_sub. Then the module has no parameters
  and no coverage guard, because there is no band left to keep from collapsing.
- The coverage guard (`dac_coverage_rho`, `dac_coverage_weight`) is ours. It uses the
  soft band mass sum(m * p) in both modes. Its default weight is 10, not method.md's 0.1,
  which did not stop the band collapsing when DAC-KL was minimised over f_sub alone (Adam,
  student fixed, rho 0.5). Lowest band mass over 200 steps, 16 rows, V = 64, lr 0.05, 3 seeds,
  from 0.56: 0.18-0.30 unguarded, 0.22-0.32 at weight 0.1, 0.41-0.47 at 1, 0.50-0.56 at 10.
  Over 300 steps, 16 rows, V = 50257 (teacher logits randn * 3, student + randn * 1.5),
  lr 1e-3, from 0.83: 0.41 unguarded and at 1, 0.43 at 3, 0.48 at 10 (then 0.50), 0.51 at 30.
  The band mass does not depend on the student, so the guard's weight changes only what
  f_sub learns, never the student's gradient.

Numerics: every computation runs in float32, or in float64 when an input is float64, and
in log space, with log 0 represented by a finite floor. Tokens masked out with -inf logits
therefore produce no NaN or inf. They lie outside the teacher's support, are never in the
band and do not count towards the quantiles.

Speed (V = 50257 made DAC-KL most of a training step): the thresholds come from a partial
selection (topk) of the leading ranks instead of a full sort, and the vocabulary-wide sums
are one autograd Function with a closed-form backward (`_BandSums`) instead of autograd
over a dozen [N, V] temporaries. Values and gradients are those of the plain formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .base import Rows, TermOutput

# Stands in for log 0: finite, so 0 * log 0 and (-inf) - (-inf) never occur; exp() of it is 0.
LOG_FLOOR = -1.0e4
# Floor of the log-probability features: far below any probability that matters, small enough
# in magnitude to be a sane network input.
FEATURE_LOG_FLOOR = -30.0
INITIAL_LOWER_QUANTILE = 0.95
# sigmoid(b) at initialisation: 1 - u = (1 - l) * 1e-4 = 5e-6, below one rank in 50257 tokens.
INITIAL_UPPER_SHARE = 0.9999

INPUTS = ("sorted_probs", "sorted_logprobs")
QUANTILE_SPACES = ("value", "cumulative")
MODES = ("mask", "winsorize")
COMPONENTS = ("band", "target", "both")
TARGETS = ("teacher_argmax", "label")


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}; got {value!r}")


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


class QuantileNetwork(nn.Module):
    """f_sub: features [N, F] -> the complements (1 - l, 1 - u), each [N].

    Heads: l = l_min + (l_max - l_min) * sigmoid(a) and u = l + (1 - l) * sigmoid(b).
    Returning complements keeps 1 - u exact in float32 when u is within 1e-6 of 1.
    """

    def __init__(self, num_features: int, hidden: int, l_min: float, l_max: float) -> None:
        super().__init__()
        if not 0.0 <= l_min < l_max <= 1.0:
            raise ValueError(f"dac_l_min and dac_l_max need 0 <= l_min < l_max <= 1; got {l_min}, {l_max}")
        self.l_min = l_min
        self.l_max = l_max
        self.layers = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, 2))
        self._initialise_heads()

    def _initialise_heads(self) -> None:
        """Zero output weights and biases chosen so that l = 0.95 and u ~ 1 for every input."""
        output = self.layers[-1]
        lower_share = (INITIAL_LOWER_QUANTILE - self.l_min) / (self.l_max - self.l_min)
        lower_share = min(max(lower_share, 0.01), 0.99)  # l_max below 0.95 (or l_min above): start inside the range
        with torch.no_grad():
            output.weight.zero_()
            output.bias.copy_(torch.tensor([_logit(lower_share), _logit(INITIAL_UPPER_SHARE)]))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        lower_logit, upper_logit = self.layers(features).unbind(dim=-1)
        lower_complement = (1.0 - self.l_min) - (self.l_max - self.l_min) * torch.sigmoid(lower_logit)
        upper_complement = lower_complement * torch.sigmoid(-upper_logit)
        return lower_complement, upper_complement


@dataclass
class Band:
    """The teacher band of N rows.

    lower_complement / upper_complement: [N], 1 - l and 1 - u.
    log_lower / log_upper: [N], log tau_l and log tau_u.
    teacher_log_probs: [N, V], the rows the band was found for; kappa: the mask temperature.
    """

    lower_complement: Tensor
    upper_complement: Tensor
    log_lower: Tensor
    log_upper: Tensor
    teacher_log_probs: Tensor
    kappa: float

    @property
    def log_mask(self) -> Tensor:
        """[N, V], detached: log of the soft membership m (-inf outside the teacher's support).

        For inspection; the loss builds the mask inside `_BandSums`, which differentiates it.
        """
        with torch.no_grad():
            buffers = (torch.empty_like(self.teacher_log_probs), torch.empty_like(self.teacher_log_probs))
            return _soft_log_mask(self.teacher_log_probs, self.log_lower, self.log_upper, self.kappa, *buffers)


class DacKL(nn.Module):
    """The DAC-KL term: one value per row, differentiable in the student logits and f_sub."""

    name = "dac_kl"
    unit = "token"

    def __init__(
        self,
        dac_input: str = "sorted_probs",
        dac_hidden: int = 256,
        dac_top: int = 256,
        dac_quantile_space: str = "value",
        dac_mode: str = "mask",
        dac_components: str = "both",
        dac_fixed_quantiles: tuple[float, float] | list[float] | None = None,
        dac_normalize: bool = True,
        dac_kappa: float = 0.1,
        dac_l_min: float = 0.5,
        dac_l_max: float = 0.999,
        dac_coverage_rho: float = 0.5,
        dac_coverage_weight: float = 10.0,
        dac_target: str = "teacher_argmax",
    ) -> None:
        super().__init__()
        _check_choice("dac_input", dac_input, INPUTS)
        _check_choice("dac_quantile_space", dac_quantile_space, QUANTILE_SPACES)
        _check_choice("dac_mode", dac_mode, MODES)
        _check_choice("dac_components", dac_components, COMPONENTS)
        _check_choice("dac_target", dac_target, TARGETS)
        if dac_kappa <= 0:
            raise ValueError(f"dac_kappa must be > 0; got {dac_kappa}")
        self.input = dac_input
        self.top = dac_top
        self.quantile_space = dac_quantile_space
        self.mode = dac_mode
        self.components = dac_components
        self.normalize = dac_normalize
        self.kappa = dac_kappa
        self.coverage_rho = dac_coverage_rho
        self.coverage_weight = dac_coverage_weight
        self.target = dac_target
        self.fixed_quantiles = _fixed_quantiles(dac_fixed_quantiles)
        self.f_sub: QuantileNetwork | None = None
        if self.fixed_quantiles is None:
            self.f_sub = QuantileNetwork(dac_top + 1, dac_hidden, dac_l_min, dac_l_max)

    def extra_repr(self) -> str:
        return (
            f"input={self.input}, space={self.quantile_space}, mode={self.mode}, components={self.components}, "
            f"fixed_quantiles={self.fixed_quantiles}, normalize={self.normalize}, kappa={self.kappa}"
        )

    def forward(self, rows: Rows) -> TermOutput:
        """values [N]: KL of the clipped distributions plus the coverage guard; stats per row."""
        dtype = (
            torch.float64 if torch.float64 in (rows.student_logits.dtype, rows.teacher_logits.dtype) else torch.float32
        )
        with torch.autocast(device_type=rows.student_logits.device.type, enabled=False):
            teacher_log_probs = _floored_log_probs(rows.teacher_logits.detach(), dtype)
            band = self.band(teacher_log_probs)
            target = self._target_class(rows, teacher_log_probs)
            sums = BandSums(
                *_BandSums.apply(
                    rows.student_logits,
                    band.log_lower,
                    band.log_upper,
                    teacher_log_probs,
                    target,
                    self.kappa,
                    self.mode == "winsorize",
                )
            )
            kl = self._clipped_kl(sums, teacher_log_probs.gather(-1, target[:, None]).squeeze(-1))
            band_mass = sums.log_band_mass.exp()
            coverage = self._coverage_penalty(band_mass)
            stats = {
                "dac_l": 1.0 - band.lower_complement.detach(),
                "dac_u": 1.0 - band.upper_complement.detach(),
                "dac_band_size": sums.band_size,
                "dac_band_mass": band_mass.detach(),
                "dac_coverage": coverage.detach(),
            }
        return TermOutput(values=kl + coverage, stats=stats)

    def band(self, teacher_log_probs: Tensor) -> Band:
        """The band thresholds for teacher log-probabilities [N, V] (LOG_FLOOR where p = 0).

        Only the leading ranks are selected (topk), never the whole row sorted: f_sub reads
        the top `dac_top`, and the thresholds need the ranks down to about (1 - l)(S - 1),
        5% of the vocabulary at the initial l. A full sort dominated training time at V = 50257.
        """
        support_size = _support_size(teacher_log_probs)
        leading = teacher_log_probs.topk(min(self.top, teacher_log_probs.shape[-1]), dim=-1).values
        lower_complement, upper_complement = self._quantile_complements(leading, teacher_log_probs)
        thresholds = _value_thresholds if self.quantile_space == "value" else _cumulative_thresholds
        log_lower, log_upper = thresholds(teacher_log_probs, leading, lower_complement, upper_complement, support_size)
        return Band(lower_complement, upper_complement, log_lower, log_upper, teacher_log_probs, self.kappa)

    def _quantile_complements(self, leading: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
        """(1 - l, 1 - u), each [N], from f_sub or from the fixed quantiles."""
        num_rows, dtype, device = leading.shape[0], leading.dtype, leading.device
        if self.fixed_quantiles is not None:
            lower, upper = self.fixed_quantiles
            return (
                torch.full((num_rows,), 1.0 - lower, dtype=dtype, device=device),
                torch.full((num_rows,), 1.0 - upper, dtype=dtype, device=device),
            )
        features = self._features(leading, teacher_log_probs)
        network_dtype = self.f_sub.layers[0].weight.dtype
        lower_complement, upper_complement = self.f_sub(features.to(network_dtype))
        return lower_complement.to(dtype), upper_complement.to(dtype)

    def _features(self, leading: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """[N, top + 1]: the top teacher (log-)probabilities, zero-padded when V < top, and the entropy.

        leading: [N, min(top, V)], the largest teacher log-probabilities in descending order.
        """
        entropy = -teacher_log_probs.exp().mul_(teacher_log_probs).sum(dim=-1, keepdim=True)
        if self.input == "sorted_probs":
            values = F.pad(leading.exp(), (0, self.top - leading.shape[1]), value=0.0)
        else:
            values = F.pad(
                leading.clamp(min=FEATURE_LOG_FLOOR), (0, self.top - leading.shape[1]), value=FEATURE_LOG_FLOOR
            )
        return torch.cat([values, entropy], dim=-1)

    def _target_class(self, rows: Rows, teacher_log_probs: Tensor) -> Tensor:
        """[N] long: the teacher argmax, or the row's label where `dac_target` is "label" and one is given."""
        argmax = teacher_log_probs.argmax(dim=-1)
        if self.target == "label" and rows.targets is not None:
            labels = rows.targets.to(argmax.device).long()
            return torch.where(labels >= 0, labels, argmax)
        return argmax

    def _clipped_kl(self, sums: BandSums, teacher_target: Tensor) -> Tensor:
        """[N] KL between the weighted teacher and student vectors (see `dac_components`).

        teacher_target: [N] log p_c.
        """
        if self.components == "target":
            return _binary_kl(teacher_target, sums.student_target)
        target_entry = (teacher_target, sums.student_target) if self.components == "both" else None
        kl = _normalized_kl if self.normalize else _generalized_kl
        return kl(sums, target_entry)

    def _coverage_penalty(self, band_mass: Tensor) -> Tensor:
        """[N] lambda_cov * max(0, rho - band mass)^2; zero with fixed quantiles (nothing can collapse)."""
        if self.fixed_quantiles is not None:
            return torch.zeros_like(band_mass)
        return self.coverage_weight * torch.relu(self.coverage_rho - band_mass).square()


def _fixed_quantiles(quantiles: tuple[float, float] | list[float] | str | None) -> tuple[float, float] | None:
    """(l, u) from a pair, or from the text "l,u" that a command-line option gives."""
    if quantiles is None:
        return None
    values = quantiles.split(",") if isinstance(quantiles, str) else list(quantiles)
    try:
        lower, upper = (float(value) for value in values)
    except ValueError:
        raise ValueError(f"dac_fixed_quantiles must be two numbers l,u; got {quantiles!r}") from None
    if not 0.0 <= lower <= upper <= 1.0:
        raise ValueError(f"dac_fixed_quantiles must be [l, u] with 0 <= l <= u <= 1; got {[lower, upper]}")
    return lower, upper


def _floored_log_probs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """log_softmax in `dtype`, with -inf (masked tokens) replaced by LOG_FLOOR. In place, so
    for logits that need no gradient: the teacher, and the student inside `_BandSums`."""
    return F.log_softmax(logits, dim=-1, dtype=dtype).clamp_(min=LOG_FLOOR)


def _support_size(teacher_log_probs: Tensor) -> Tensor:
    """[N] long: the number of tokens with p > 0. Counted only in rows with a floored token;
    counting a row costs about ten times finding its minimum."""
    floored = teacher_log_probs.amin(dim=-1) <= LOG_FLOOR
    support_size = torch.full_like(floored, teacher_log_probs.shape[-1], dtype=torch.long)
    if bool(floored.any()):
        support_size[floored] = (teacher_log_probs[floored] > LOG_FLOOR).sum(dim=-1)
    return support_size


def _leading_ranks(teacher_log_probs: Tensor, leading: Tensor, count: int) -> Tensor:
    """[N, >= count] (all V when count exceeds V): the largest log-probabilities, descending."""
    count = min(count, teacher_log_probs.shape[-1])
    return leading if leading.shape[-1] >= count else teacher_log_probs.topk(count, dim=-1).values


def _interpolate(ranked: Tensor, index: Tensor, fraction: Tensor) -> Tensor:
    """[N]: log-linear interpolation between descending ranks index and index + 1."""
    last = ranked.shape[-1] - 1
    current = ranked.gather(-1, index[:, None].clamp(max=last)).squeeze(-1)
    following = ranked.gather(-1, (index[:, None] + 1).clamp(max=last)).squeeze(-1)
    return current + fraction * (following - current)


def _value_thresholds(
    teacher_log_probs: Tensor, leading: Tensor, lower_complement: Tensor, upper_complement: Tensor, support_size: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) logs of the (1 - complement)-quantiles of the S nonzero teacher probabilities.

    Descending rank position complement * (S - 1), interpolated, so each threshold is
    piecewise linear (differentiable) in its quantile level. The ranks are selected down to
    the deepest position any row needs.
    """
    brackets = []
    for complement in (lower_complement, upper_complement):
        position = complement * (support_size - 1).clamp(min=0).to(complement.dtype)
        index = position.detach().floor().long().clamp(min=0)
        index = torch.minimum(index, (support_size - 2).clamp(min=0))
        brackets.append((index, (position - index.to(position.dtype)).clamp(0.0, 1.0)))
    deepest = max((int(index.max()) for index, _ in brackets if index.numel()), default=0)
    ranked = _leading_ranks(teacher_log_probs, leading, deepest + 2)
    lower, upper = (_interpolate(ranked, index, fraction) for index, fraction in brackets)
    return lower, upper


def _cumulative_thresholds(
    teacher_log_probs: Tensor, leading: Tensor, lower_complement: Tensor, upper_complement: Tensor, support_size: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) logs of the mass-weighted (1 - complement)-quantiles of the teacher probabilities.

    Knots at x_r (the teacher mass ranked above rank r); the level 1 - complement sits at
    x = complement, interpolated between the ranks r and r + 1 that bracket it. The
    selected ranks double until every row's mass above its last rank exceeds its larger
    complement (1 - l, as u >= l), so that r + 1 is among them.
    """
    deepest = torch.maximum(lower_complement, upper_complement).detach()
    ranked = leading
    while True:
        probs = ranked.exp()
        mass_above = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0), value=0.0)
        if ranked.shape[-1] == teacher_log_probs.shape[-1] or bool((mass_above[:, -1] > deepest).all()):
            break
        ranked = _leading_ranks(teacher_log_probs, ranked, 2 * ranked.shape[-1])
    lower, upper = (
        _cumulative_threshold(ranked, probs, mass_above, complement, support_size)
        for complement in (lower_complement, upper_complement)
    )
    return lower, upper


def _cumulative_threshold(
    ranked: Tensor, probs: Tensor, mass_above: Tensor, complement: Tensor, support_size: Tensor
) -> Tensor:
    """[N] one mass-weighted threshold; ranked, probs, mass_above: [N, R] of the leading ranks."""
    index = torch.searchsorted(mass_above, complement.detach()[:, None].contiguous(), right=True).squeeze(-1) - 1
    index = torch.minimum(index.clamp(min=0), (support_size - 1).clamp(min=0))
    knot = mass_above.gather(-1, index[:, None]).squeeze(-1)
    width = probs.gather(-1, index[:, None]).squeeze(-1).clamp(min=torch.finfo(probs.dtype).tiny)
    fraction = ((complement - knot) / width).clamp(0.0, 1.0)
    return _interpolate(ranked, index, fraction)


def _soft_log_mask(
    teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor, kappa: float, upper_term: Tensor, scratch: Tensor
) -> Tensor:
    """[N, V] log m = log sigmoid((log p - log tau_l) / kappa) + log sigmoid((log tau_u - log p) / kappa),
    -inf outside the support. In place: one new [N, V] tensor and two [N, V] work buffers
    (overwritten), where F.logsigmoid would allocate six. No autograd (see `_BandSums`)."""
    log_mask = torch.sub(teacher_log_probs, log_lower[:, None]).div_(kappa)
    torch.sub(log_upper[:, None], teacher_log_probs, out=upper_term).div_(kappa)
    log_mask = _log_sigmoid_(log_mask, scratch).add_(_log_sigmoid_(upper_term, scratch))
    return _fill_where_floored_(log_mask, teacher_log_probs, -math.inf)


def _fill_where_floored_(values: Tensor, log_probs: Tensor, fill: float) -> Tensor:
    """In place: `fill` where log_probs <= LOG_FLOOR. Usually no entry is floored, and one
    minimum over the tensor is cheaper than building the [N, V] mask."""
    if bool(log_probs.amin() <= LOG_FLOOR):
        values.masked_fill_(log_probs <= LOG_FLOOR, fill)
    return values


def _log_sigmoid_(values: Tensor, scratch: Tensor) -> Tensor:
    """In place: log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), with exp's argument floored
    (see `_exp_floor`; that changes the result by less than 1e-37)."""
    tail = torch.abs(values, out=scratch).neg_().clamp_(min=_exp_floor(values.dtype)).exp_().log1p_()
    return values.clamp_(max=0.0).sub_(tail)


def _exp_floor(dtype: torch.dtype) -> float:
    """An exponent just above where exp underflows below the smallest normal float. CPU exp
    kernels take a slow path (about 10x) for arguments below it, and V-wide exps of far-away
    tokens are mostly such arguments; their results there (below 1e-37, or 1e-307 in float64)
    do not count next to the terms that matter."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _normalize_(log_values: Tensor) -> tuple[Tensor, Tensor]:
    """In place: [N, V] log values -> (their softmax, [N] their logsumexp)."""
    peak = log_values.amax(dim=-1, keepdim=True)
    shares = log_values.sub_(peak).clamp_(min=_exp_floor(log_values.dtype)).exp_()
    total = shares.sum(dim=-1, keepdim=True)
    return shares.div_(total), (peak + total.log()).squeeze(-1)


@dataclass
class BandSums:
    """The vocabulary sums of N rows that DAC-KL is built from, each [N].

    With w the weights (the mask, or the winsorizing factor) and m the soft mask:
    log_teacher_band = log sum(w p); log_student_band = log sum(w q);
    expected_log_ratio = sum(w p (log p - log q)) / sum(w p); log_band_mass = log sum(m p);
    student_target = log q_c; band_size = sum(m), detached.
    """

    log_teacher_band: Tensor
    log_student_band: Tensor
    expected_log_ratio: Tensor
    log_band_mass: Tensor
    student_target: Tensor
    band_size: Tensor


class _BandSums(torch.autograd.Function):
    """`BandSums` from the student logits, with a closed-form backward, differentiable in the
    student logits and both thresholds.

    Why: autograd through the same formulas allocated a new [N, V] tensor for almost every
    op, forward and backward, and at V = 50257 those allocations and passes were most of
    DAC-KL's time. Here the forward allocates four (the student log-probabilities, the mask,
    two work buffers that become the band shares) and the backward three.
    Gradients, with pi = w p / sum(w p), rho = w q / sum(w q), mu = m p / sum(m p), D = log p - log q
    and X = expected_log_ratio:
    d/d log w_k = pi_k (g_teacher + g_ratio (D_k - X)) + rho_k g_student, d/d log m_k = mu_k g_mass,
    d/d log q_k = rho_k g_student - pi_k g_ratio (+ g_target at c), then through the floor and
    log_softmax; per token, d log m / d log tau_l = -sigmoid(-x1) / kappa and
    d log m / d log tau_u = sigmoid(-x2) / kappa; the winsorizing clamp's as torch.maximum and
    torch.minimum define them (ties count half).
    """

    @staticmethod
    def forward(ctx, student_logits, log_lower, log_upper, teacher_log_probs, target, kappa, winsorize):
        student_log_probs = _floored_log_probs(student_logits, teacher_log_probs.dtype)
        scratch, log_ratio = torch.empty_like(teacher_log_probs), torch.empty_like(teacher_log_probs)
        log_mask = _soft_log_mask(teacher_log_probs, log_lower, log_upper, kappa, log_ratio, scratch)
        band_size = torch.clamp(log_mask, min=_exp_floor(log_mask.dtype), out=scratch).exp_().sum(dim=-1)
        mass_shares = log_band_mass = None
        if winsorize:
            log_weights = _winsorized_log_weights(teacher_log_probs, log_lower, log_upper)
            mass_shares, log_band_mass = _normalize_(log_mask.add_(teacher_log_probs))
        else:
            log_weights = log_mask
        teacher_shares, log_teacher_band = _normalize_(torch.add(log_weights, teacher_log_probs, out=scratch))
        student_shares, log_student_band = _normalize_(log_weights.add_(student_log_probs))
        if not winsorize:
            mass_shares, log_band_mass = teacher_shares, log_teacher_band
        log_ratio = torch.sub(teacher_log_probs, student_log_probs, out=log_ratio)
        expected_log_ratio = log_ratio.mul_(teacher_shares).sum(dim=-1)
        student_target = student_log_probs.gather(-1, target[:, None]).squeeze(-1)
        ctx.kappa, ctx.winsorize, ctx.logits_dtype = kappa, winsorize, student_logits.dtype
        ctx.save_for_backward(
            student_log_probs, teacher_log_probs, log_lower, log_upper, target, teacher_shares, student_shares,
            mass_shares, expected_log_ratio,
        )  # fmt: skip
        ctx.mark_non_differentiable(band_size)
        return log_teacher_band, log_student_band, expected_log_ratio, log_band_mass, student_target, band_size

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_teacher_band, grad_student_band, grad_ratio, grad_mass, grad_target, _grad_band_size):
        (
            student_log_probs, teacher_log_probs, log_lower, log_upper, target, teacher_shares, student_shares,
            mass_shares, expected_log_ratio,
        ) = ctx.saved_tensors  # fmt: skip
        scratch = torch.empty_like(student_log_probs)
        grad_logits = grad_lower = grad_upper = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            share_grad = grad_teacher_band if ctx.winsorize else grad_teacher_band + grad_mass
            weight_grad = torch.sub(teacher_log_probs, student_log_probs).sub_(expected_log_ratio[:, None])
            weight_grad.mul_(grad_ratio[:, None]).add_(share_grad[:, None]).mul_(teacher_shares)
            weight_grad.addcmul_(student_shares, grad_student_band[:, None])  # d loss / d log w
            mask_grad = weight_grad
            if ctx.winsorize:
                grad_lower, grad_upper = _winsorized_threshold_grads(
                    weight_grad, teacher_log_probs, log_lower, log_upper, scratch
                )
                mask_grad = torch.mul(mass_shares, grad_mass[:, None], out=weight_grad)
            mask_lower, mask_upper = _mask_threshold_grads(
                mask_grad, teacher_log_probs, log_lower, log_upper, ctx.kappa, scratch
            )
            grad_lower = mask_lower if grad_lower is None else grad_lower + mask_lower
            grad_upper = mask_upper if grad_upper is None else grad_upper + mask_upper
        if ctx.needs_input_grad[0]:
            grad_log_probs = torch.mul(student_shares, grad_student_band[:, None])
            grad_log_probs.addcmul_(teacher_shares, -grad_ratio[:, None])
            grad_log_probs.scatter_add_(-1, target[:, None], grad_target[:, None])
            # no gradient through the floor (clamp's own backward passes it at exactly LOG_FLOOR)
            _fill_where_floored_(grad_log_probs, student_log_probs, 0.0)
            probs = torch.clamp(student_log_probs, min=_exp_floor(scratch.dtype), out=scratch).exp_()
            grad_log_probs.addcmul_(probs, -grad_log_probs.sum(dim=-1, keepdim=True))  # log_softmax
            grad_logits = grad_log_probs.to(ctx.logits_dtype)
        return grad_logits, grad_lower, grad_upper, None, None, None, None


def _winsorized_log_weights(teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor) -> Tensor:
    """[N, V] log of clamp(p, tau_l, tau_u) / p; -inf outside the support."""
    clamped = torch.minimum(torch.maximum(teacher_log_probs, log_lower[:, None]), log_upper[:, None])
    return _fill_where_floored_(clamped.sub_(teacher_log_probs), teacher_log_probs, -math.inf)


def _mask_threshold_grads(
    mask_grad: Tensor, teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor, kappa: float, scratch: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) gradients of the thresholds, given mask_grad = d loss / d log m [N, V]."""
    bound = -_exp_floor(mask_grad.dtype)  # keeps sigmoid's exp in range (see _exp_floor)
    torch.sub(log_lower[:, None], teacher_log_probs, out=scratch).div_(kappa).clamp_(-bound, bound).sigmoid_()
    grad_lower = scratch.mul_(mask_grad).sum(dim=-1).div_(-kappa)  # scratch was sigmoid(-x1)
    torch.sub(teacher_log_probs, log_upper[:, None], out=scratch).div_(kappa).clamp_(-bound, bound).sigmoid_()
    return grad_lower, scratch.mul_(mask_grad).sum(dim=-1).div_(kappa)  # scratch was sigmoid(-x2)


def _winsorized_threshold_grads(
    weight_grad: Tensor, teacher_log_probs: Tensor, log_lower: Tensor, log_upper: Tensor, scratch: Tensor
) -> tuple[Tensor, Tensor]:
    """([N], [N]) gradients of the thresholds through min(max(log p, log tau_l), log tau_u),
    given weight_grad = d loss / d log w [N, V]."""
    half = teacher_log_probs.new_tensor(0.5)
    raised = torch.maximum(teacher_log_probs, log_lower[:, None])
    torch.heaviside(log_lower[:, None] - teacher_log_probs, half, out=scratch)
    grad_lower = scratch.mul_(torch.heaviside(log_upper[:, None] - raised, half)).mul_(weight_grad).sum(dim=-1)
    torch.heaviside(raised.sub_(log_upper[:, None]), half, out=scratch)
    return grad_lower, scratch.mul_(weight_grad).sum(dim=-1)


def _normalized_kl(sums: BandSums, target_entry: tuple[Tensor, Tensor] | None) -> Tensor:
    """[N] KL(P/ZP || Q/ZQ) for P = [w p, p_c], Q = [w q, q_c] (no target entry when None).

    Every entry's log ratio is log p - log q + log ZQ - log ZP (the weight cancels), so
    KL = sum(P/ZP * (log p - log q)) + log ZQ - log ZP.
    """
    log_teacher_total, log_student_total = sums.log_teacher_band, sums.log_student_band
    expected_log_ratio = sums.expected_log_ratio
    if target_entry is not None:
        teacher_target, student_target = target_entry
        log_teacher_total = torch.logaddexp(log_teacher_total, teacher_target)
        log_student_total = torch.logaddexp(log_student_total, student_target)
        band_share = (sums.log_teacher_band - log_teacher_total).exp()
        target_share = (teacher_target - log_teacher_total).exp()
        expected_log_ratio = band_share * expected_log_ratio + target_share * (teacher_target - student_target)
    return expected_log_ratio + log_student_total - log_teacher_total


def _generalized_kl(sums: BandSums, target_entry: tuple[Tensor, Tensor] | None) -> Tensor:
    """[N] sum(a log(a/b) - a + b) for a = [w p, p_c], b = [w q, q_c], not renormalised."""
    teacher_band = sums.log_teacher_band.exp()
    value = teacher_band * (sums.expected_log_ratio - 1.0) + sums.log_student_band.exp()
    if target_entry is not None:
        teacher_target, student_target = target_entry
        teacher_mass = teacher_target.exp()
        value = value + teacher_mass * (teacher_target - student_target) - teacher_mass + student_target.exp()
    return value


def _binary_kl(teacher_target: Tensor, student_target: Tensor) -> Tensor:
    """[N] KL([p_c, 1 - p_c] || [q_c, 1 - q_c]) from log p_c and log q_c."""
    teacher_rest = _log_one_minus_exp(teacher_target)
    student_rest = _log_one_minus_exp(student_target)
    return teacher_target.exp() * (teacher_target - student_target) + teacher_rest.exp() * (teacher_rest - student_rest)


def _log_one_minus_exp(log_value: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0; x is capped just below 0 so a probability of exactly 1
    gives a large finite value (about -69) and a finite gradient instead of -inf and NaN."""
    return torch.log(-torch.expm1(log_value.clamp(max=-1e-30)))
