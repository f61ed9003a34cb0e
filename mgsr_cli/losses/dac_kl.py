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
are one autograd Function with a closed-form backward (dac_band.py's `BandSumsFunction`)
instead of autograd over a dozen [N, V] temporaries. Values and gradients are those of the
plain formulas. `score` works on log-probabilities, so the fused objective (fused.py) feeds
it the teacher and student log-softmax that every other term shares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Rows, SharedLogProbs, TermOutput
from .dac_band import (
    Band,
    BandSums,
    BandSumsFunction,
    cumulative_thresholds,
    floored_log_probs,
    floored_log_softmax,
    support_size,
    value_thresholds,
)
from .divergences import compute_dtype
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
        self._ranks_hint = 0  # how many leading ranks `band` selects at once (see there)
        if self.fixed_quantiles is None:
            self.f_sub = QuantileNetwork(dac_top + 1, dac_hidden, dac_l_min, dac_l_max)

    def extra_repr(self) -> str:
        return (
            f"input={self.input}, space={self.quantile_space}, mode={self.mode}, components={self.components}, "
            f"fixed_quantiles={self.fixed_quantiles}, normalize={self.normalize}, kappa={self.kappa}"
        )

    def forward(self, rows: Rows) -> TermOutput:
        """values [N]: KL of the clipped distributions plus the coverage guard; stats per row."""
        dtype = compute_dtype(rows.student_logits, rows.teacher_logits)
        with torch.autocast(device_type=rows.student_logits.device.type, enabled=False):
            teacher_log_probs = floored_log_probs(rows.teacher_logits.detach(), dtype)
            return self.score(floored_log_softmax(rows.student_logits, dtype), teacher_log_probs, rows.targets)

    def score(self, student_log_probs: Tensor, teacher_log_probs: Tensor, targets: Tensor | None) -> TermOutput:
        """`forward` from floored log-probabilities [N, V] (student differentiable, teacher not).

        The fused objective calls this with the log-softmax it shares with the other terms.
        """
        band = self.band(teacher_log_probs)
        target = self._target_class(targets, teacher_log_probs)
        sums = BandSums(
            *BandSumsFunction.apply(
                student_log_probs,
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

    def from_log_probs(self, shared: SharedLogProbs) -> TermOutput:
        return self.score(shared.student, shared.teacher, shared.targets)

    def band(self, teacher_log_probs: Tensor) -> Band:
        """The band thresholds for teacher log-probabilities [N, V] (LOG_FLOOR where p = 0).

        Only the leading ranks are selected (topk), never the whole row sorted: f_sub reads
        the top `dac_top`, and the thresholds need the ranks down to about (1 - l)(S - 1),
        5% of the vocabulary at the initial l. A full sort dominated training time at V = 50257.
        """
        support = support_size(teacher_log_probs)
        vocab = teacher_log_probs.shape[-1]
        ranked = teacher_log_probs.topk(min(max(self.top, self._ranks_hint), vocab), dim=-1).values
        leading = ranked[:, : min(self.top, vocab)]
        lower_complement, upper_complement = self._quantile_complements(leading, teacher_log_probs)
        thresholds = value_thresholds if self.quantile_space == "value" else cumulative_thresholds
        log_lower, log_upper = thresholds(teacher_log_probs, ranked, lower_complement, upper_complement, support)
        if self.quantile_space == "value" and lower_complement.numel():
            # the value thresholds' deepest rank this time, plus a margin: next time one topk selects
            # both f_sub's inputs and the thresholds' ranks (speed only; the values do not depend on it)
            deepest = float(lower_complement.detach().max()) * (int(support.max()) - 1)
            self._ranks_hint = int(deepest * 1.1) + 16
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

    def _target_class(self, targets: Tensor | None, teacher_log_probs: Tensor) -> Tensor:
        """[N] long: the teacher argmax, or the row's label where `dac_target` is "label" and one is given."""
        argmax = teacher_log_probs.max(dim=-1).indices  # argmax's first-maximum rule, about 5x faster on the CPU
        if self.target == "label" and targets is not None:
            labels = targets.to(argmax.device).long()
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
