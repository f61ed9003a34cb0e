"""DAC-KL against a slow, plainly written reference, plus gradients, band membership,
the target entry, the coverage guard and numerical edge cases."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch

from mgsr_cli.losses.base import Rows
from mgsr_cli.losses.dac_kl import DacKL
from mgsr_cli.losses.registry import DAC_OPTIONS, build_loss

# the guard's default weight, read from the signature so the reference follows the default
DEFAULT_COVERAGE_WEIGHT = inspect.signature(DacKL).parameters["dac_coverage_weight"].default


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation cost (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the reference


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _log_softmax(logits: list[float]) -> list[float]:
    largest = max(logits)
    log_total = largest + math.log(sum(math.exp(x - largest) for x in logits))
    return [x - log_total for x in logits]


def reference_quantiles(probs: list[float], module: DacKL, l_min: float, l_max: float) -> tuple[float, float]:
    """f_sub written out: features, two dense layers with an erf GELU, bounded heads."""
    ordered = sorted(probs, reverse=True)
    top = ordered[: module.top] + [0.0] * max(0, module.top - len(ordered))
    if module.input == "sorted_logprobs":
        top = [max(math.log(p), -30.0) if p > 0 else -30.0 for p in top]
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    features = top + [entropy]
    first, _, second = module.f_sub.layers
    hidden = [
        _gelu(sum(w * x for w, x in zip(row, features)) + bias)
        for row, bias in zip(first.weight.tolist(), first.bias.tolist())
    ]
    a, b = (
        sum(w * h for w, h in zip(row, hidden)) + bias
        for row, bias in zip(second.weight.tolist(), second.bias.tolist())
    )
    lower = l_min + (l_max - l_min) * _sigmoid(a)
    return lower, lower + (1.0 - lower) * _sigmoid(b)


def reference_log_threshold(probs: list[float], level: float, space: str) -> float:
    """log of the level-quantile: of the values (uniform weights) or mass-weighted."""
    ordered = sorted((p for p in probs if p > 0), reverse=True)
    tail = 1.0 - level
    if space == "value":
        position = tail * (len(ordered) - 1)
        index = min(math.floor(position), len(ordered) - 2)
        fraction = position - index
    else:
        index, mass_above = 0, 0.0
        for rank, p in enumerate(ordered):
            if mass_above <= tail:
                index = rank
            mass_above += p
        fraction = min(max((tail - sum(ordered[:index])) / ordered[index], 0.0), 1.0)
    following = min(index + 1, len(ordered) - 1)
    return math.log(ordered[index]) + fraction * (math.log(ordered[following]) - math.log(ordered[index]))


def reference_row(
    student: list[float], teacher: list[float], module: DacKL, options: dict, target: int | None = None
) -> dict:
    """One row of DAC-KL, loop by loop over the vocabulary."""
    kappa = options.get("dac_kappa", 0.1)
    space = options.get("dac_quantile_space", "value")
    p = [math.exp(x) for x in _log_softmax(teacher)]
    q = [math.exp(x) for x in _log_softmax(student)]
    if options.get("dac_fixed_quantiles"):
        lower, upper = options["dac_fixed_quantiles"]
    else:
        lower, upper = reference_quantiles(p, module, options.get("dac_l_min", 0.5), options.get("dac_l_max", 0.999))
    log_lower = reference_log_threshold(p, lower, space)
    log_upper = reference_log_threshold(p, upper, space)
    mask = [_sigmoid((math.log(pk) - log_lower) / kappa) * _sigmoid((log_upper - math.log(pk)) / kappa) for pk in p]
    if options.get("dac_mode", "mask") == "mask":
        weights = mask
    else:
        weights = [min(max(pk, math.exp(log_lower)), math.exp(log_upper)) / pk for pk in p]
    c = max(range(len(p)), key=lambda k: p[k]) if target is None else target
    components = options.get("dac_components", "both")
    teacher_entries = [w * pk for w, pk in zip(weights, p)]
    student_entries = [w * qk for w, qk in zip(weights, q)]
    if components == "band":
        pass
    elif components == "both":
        teacher_entries.append(p[c])
        student_entries.append(q[c])
    else:
        teacher_entries, student_entries = [p[c], 1.0 - p[c]], [q[c], 1.0 - q[c]]
    if options.get("dac_normalize", True):
        teacher_total, student_total = sum(teacher_entries), sum(student_entries)
        kl = sum(
            (a / teacher_total) * math.log((a / teacher_total) / (b / student_total))
            for a, b in zip(teacher_entries, student_entries)
        )
    else:
        kl = sum(a * math.log(a / b) - a + b for a, b in zip(teacher_entries, student_entries))
    band_mass = sum(m * pk for m, pk in zip(mask, p))
    fixed = bool(options.get("dac_fixed_quantiles"))
    guard = (
        0.0
        if fixed
        else options.get("dac_coverage_weight", DEFAULT_COVERAGE_WEIGHT)
        * max(0.0, options.get("dac_coverage_rho", 0.5) - band_mass) ** 2
    )
    return {
        "value": kl + guard,
        "dac_l": lower,
        "dac_u": upper,
        "dac_band_size": sum(mask),
        "dac_band_mass": band_mass,
        "dac_coverage": guard,
    }


# ---------------------------------------------------------------- helpers


def make_module(options: dict, seed: int = 0, hidden: int | None = None) -> DacKL:
    """A float64 DAC-KL whose f_sub has random output weights, so l and u differ per row."""
    torch.manual_seed(seed)
    if hidden is not None:
        options = {"dac_hidden": hidden, **options}
    module = DacKL(**options).double()
    if module.f_sub is not None:
        with torch.no_grad():
            module.f_sub.layers[-1].weight.normal_(0.0, 0.5)
    return module


def random_logits(num_rows: int, vocab: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(num_rows, vocab, generator=generator, dtype=torch.float64) * scale
    student = teacher + torch.randn(num_rows, vocab, generator=generator, dtype=torch.float64) * scale / 2
    return student, teacher


def assert_matches_reference(
    module: DacKL, options: dict, student: torch.Tensor, teacher: torch.Tensor, targets=None
) -> None:
    output = module(Rows(student, teacher, targets=targets))
    assert output.values.dtype == torch.float64 and output.values.shape == (student.shape[0],)
    for row in range(student.shape[0]):
        target = None if targets is None else int(targets[row])
        expected = reference_row(student[row].tolist(), teacher[row].tolist(), module, options, target)
        assert output.values[row].item() == pytest.approx(expected["value"], rel=1e-8, abs=1e-12)
        for name in ("dac_l", "dac_u", "dac_band_size", "dac_band_mass", "dac_coverage"):
            assert output.stats[name][row].item() == pytest.approx(expected[name], rel=1e-8, abs=1e-12), name


SMALL_CONFIGS = [
    {"dac_quantile_space": space, "dac_mode": mode, "dac_components": components, "dac_normalize": normalize}
    for space, mode, components, normalize in itertools.product(
        ("value", "cumulative"), ("mask", "winsorize"), ("both", "band", "target"), (True, False)
    )
] + [
    {"dac_input": "sorted_logprobs"},
    {"dac_fixed_quantiles": [0.3, 0.9]},
    {"dac_fixed_quantiles": [0.3, 0.9], "dac_quantile_space": "cumulative", "dac_mode": "winsorize"},
    {"dac_coverage_rho": 0.95, "dac_coverage_weight": 2.0, "dac_kappa": 0.5, "dac_l_min": 0.2, "dac_l_max": 0.9},
]


# ---------------------------------------------------------------- value against the reference


@pytest.mark.parametrize("options", SMALL_CONFIGS, ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()))
@pytest.mark.parametrize("num_rows", [1, 5])
def test_small_vocabulary_matches_reference(options, num_rows):
    module = make_module(options, hidden=16)
    student, teacher = random_logits(num_rows, 7, seed=num_rows)
    assert_matches_reference(module, options, student, teacher)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dac_quantile_space": "cumulative", "dac_coverage_rho": 0.9},
        {"dac_mode": "winsorize", "dac_normalize": False},
    ],
    ids=["default", "cumulative", "winsorize-unnormalized"],
)
def test_gpt2_vocabulary_matches_reference(options):
    module = make_module(options, seed=1)  # full-size f_sub: dac_hidden 256, dac_top 256
    student, teacher = random_logits(2, 50257, seed=7)
    assert_matches_reference(module, options, student, teacher)


def test_default_initialisation_gives_l_095_and_u_near_1():
    output = DacKL()(Rows(*random_logits(3, 50257, seed=3)))
    assert torch.allclose(output.stats["dac_l"], torch.tensor(0.95, dtype=torch.float64))
    assert (1 - output.stats["dac_u"] < 1e-5).all()
    assert (output.stats["dac_band_size"] > 0.04 * 50257).all()  # about the top 5% of the vocabulary


def test_label_target_uses_rows_targets_and_falls_back_to_argmax():
    options = {"dac_target": "label"}
    module = make_module(options, hidden=8)
    student, teacher = random_logits(3, 7, seed=5)
    targets = torch.tensor([2, -100, 6])
    argmax = teacher.argmax(dim=-1)
    output = module(Rows(student, teacher, targets=targets))
    resolved = torch.where(targets >= 0, targets, argmax)
    for row in range(3):
        expected = reference_row(student[row].tolist(), teacher[row].tolist(), module, options, int(resolved[row]))
        assert output.values[row].item() == pytest.approx(expected["value"], rel=1e-8)


# ---------------------------------------------------------------- gradients


def parameter_function(module: DacKL, teacher: torch.Tensor):
    """values as a function of (student logits, *f_sub parameters), for gradcheck."""
    names = [name for name, _ in module.named_parameters()]

    def function(student_logits, *parameters):
        rows = Rows(student_logits, teacher)
        return torch.func.functional_call(module, dict(zip(names, parameters)), (rows,)).values

    return function


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dac_quantile_space": "cumulative"},
        {"dac_mode": "winsorize"},
        {"dac_normalize": False, "dac_components": "band"},
        {"dac_input": "sorted_logprobs", "dac_coverage_rho": 0.99, "dac_coverage_weight": 1.0},
        {"dac_fixed_quantiles": [0.2, 0.9]},
    ],
    ids=["default", "cumulative", "winsorize", "generalized-band", "logprob-guard", "fixed"],
)
def test_gradcheck_student_and_f_sub(options):
    module = make_module({"dac_top": 4, **options}, seed=2, hidden=4)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.5)
    student, teacher = random_logits(3, 7, seed=11)
    inputs = (
        student.requires_grad_(),
        *[parameter.detach().clone().requires_grad_() for parameter in module.parameters()],
    )
    assert torch.autograd.gradcheck(parameter_function(module, teacher), inputs, eps=1e-6, atol=1e-6)


def test_gradients_reach_student_and_f_sub():
    module = DacKL()
    student, teacher = random_logits(4, 50257, seed=4)
    student = student.float().requires_grad_()
    teacher = teacher.float().requires_grad_()
    module(Rows(student, teacher)).values.sum().backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher is a constant
    output_layer = module.f_sub.layers[-1]
    assert output_layer.weight.grad.abs().sum() > 0 and output_layer.bias.grad.abs().sum() > 0
    # the hidden layer learns once the zero-initialised output layer has moved
    with torch.no_grad():
        output_layer.weight.normal_(0.0, 0.1)
    module.zero_grad()
    module(Rows(student.detach(), teacher.detach())).values.sum().backward()
    assert all(parameter.grad.abs().sum() > 0 for parameter in module.parameters())


# ---------------------------------------------------------------- the band and the target entry


def test_fixed_value_quantiles_select_the_expected_tokens():
    # probabilities proportional to 1..10, shuffled; descending ranks 0..9 are the values 10..1
    weights = torch.tensor([3.0, 10.0, 6.0, 1.0, 8.0, 5.0, 9.0, 2.0, 7.0, 4.0], dtype=torch.float64)
    log_probs = (weights / weights.sum()).log()[None]
    module = DacKL(dac_fixed_quantiles=[0.5, 0.9], dac_kappa=1e-3)
    # ranks at positions (1 - u) * 9 = 0.9 and (1 - l) * 9 = 4.5: ranks 1..4, i.e. the values 9, 8, 7, 6
    membership = module.band(log_probs).log_mask.exp()[0]
    expected = torch.tensor([value in (9.0, 8.0, 7.0, 6.0) for value in weights.tolist()])
    assert (membership[expected] > 0.999).all() and (membership[~expected] < 1e-3).all()


@pytest.mark.parametrize(
    "quantiles, membership",
    [
        ([0.5, 0.95], {0.4: 0.0, 0.3: 1.0, 0.2: 0.0, 0.1: 0.0}),
        ([0.25, 0.95], {0.4: 0.0, 0.3: 1.0, 0.2: 1.0, 0.1: 0.0}),
        # u = 1 puts tau_u exactly on the argmax, which the soft mask halves
        ([0.15, 1.0], {0.4: 0.5, 0.3: 1.0, 0.2: 1.0, 0.1: 0.0}),
    ],
)
def test_fixed_cumulative_quantiles_select_the_expected_tokens(quantiles, membership):
    # mass ranked above each token: 0.4 -> 0, 0.3 -> 0.4, 0.2 -> 0.7, 0.1 -> 0.9; band: 1 - u < above <= 1 - l
    probs = torch.tensor([0.2, 0.4, 0.1, 0.3], dtype=torch.float64)
    module = DacKL(dac_fixed_quantiles=quantiles, dac_quantile_space="cumulative", dac_kappa=1e-3)
    mask = module.band(probs.log()[None]).log_mask.exp()[0]
    expected = torch.tensor([membership[value] for value in probs.tolist()], dtype=torch.float64)
    assert torch.allclose(mask, expected, atol=1e-3)


def test_target_class_counts_even_outside_the_band():
    weights = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    teacher = (weights / weights.sum()).log()[None]
    student = teacher.clone()
    student[0, 0] += 1.0  # only the argmax (rank 0) differs
    options = {"dac_fixed_quantiles": [0.2, 0.8], "dac_kappa": 1e-3}  # band: ranks 2..7
    band = DacKL(dac_components="band", **options)
    assert band.band(teacher).log_mask.exp()[0, 0] < 1e-6  # the argmax lies outside the band
    assert band(Rows(student, teacher)).values.item() < 1e-12  # ... so the band alone cannot see it
    assert DacKL(dac_components="both", **options)(Rows(student, teacher)).values.item() > 1e-2
    assert DacKL(dac_components="target", **options)(Rows(student, teacher)).values.item() > 1e-2


def test_target_class_is_the_first_of_tied_teacher_maxima():
    teacher = torch.tensor([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0], [-math.inf, 1.0, -math.inf, 1.0]]).log_softmax(-1)
    target = DacKL(dac_fixed_quantiles=[0.2, 0.8])._target_class(None, teacher)
    assert target.tolist() == [1, 0, 1] == teacher.argmax(dim=-1).tolist()


# ---------------------------------------------------------------- the coverage guard


def train_f_sub(guarded: bool, steps: int = 40) -> list[float]:
    """Minimise DAC-KL over f_sub alone (student fixed), with the guard at its default weight
    or off; return the band mass per step."""
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 64, generator=generator) * 4.0
    student = teacher + torch.randn(16, 64, generator=generator) * 0.3
    torch.manual_seed(0)
    guard = {} if guarded else {"dac_coverage_weight": 0.0}
    module = DacKL(dac_hidden=16, dac_coverage_rho=0.5, **guard)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    masses = []
    for _ in range(steps):
        output = module(Rows(student, teacher))
        optimizer.zero_grad()
        output.values.mean().backward()
        optimizer.step()
        masses.append(output.stats["dac_band_mass"].mean().item())
    return masses


def test_coverage_guard_stops_the_band_collapsing():
    unguarded = train_f_sub(guarded=False)
    guarded = train_f_sub(guarded=True)
    assert unguarded[0] > 0.5 and guarded[0] > 0.5  # both start with more than rho in the band
    assert unguarded[-1] < 0.35  # without the guard, shrinking the band is the easy way to a small KL
    assert min(guarded) > 0.45 and guarded[-1] > 0.45


# ---------------------------------------------------------------- the registry


def test_build_loss_accepts_every_constructor_option():
    objective = build_loss("dac_kl", dac_kappa=0.2, dac_top=128, dac_hidden=64)
    module = objective.term_modules["dac_kl"]
    assert (module.kappa, module.top, module.f_sub.layers[0].out_features) == (0.2, 128, 64)
    # the registry's list, used before dac_kl.py could be imported, names them all too
    assert set(DAC_OPTIONS) == set(inspect.signature(DacKL).parameters)


# ---------------------------------------------------------------- basic properties and edge cases


@pytest.mark.parametrize(
    "options", SMALL_CONFIGS[::3], ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items())
)
def test_zero_for_identical_and_nonnegative_otherwise(options):
    module = make_module(options, hidden=16)
    student, teacher = random_logits(6, 50, seed=9, scale=5.0)
    identical = module(Rows(teacher.clone(), teacher))
    assert torch.allclose(
        identical.values - identical.stats["dac_coverage"], torch.zeros(6, dtype=torch.float64), atol=1e-12
    )
    different = module(Rows(student, teacher))
    assert (different.values - different.stats["dac_coverage"] >= -1e-12).all()
    assert (different.values - different.stats["dac_coverage"] > 1e-6).any()


@pytest.mark.parametrize(
    "options", SMALL_CONFIGS[::3] + [{}], ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items())
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_nan_with_masked_vocabulary_and_low_precision(options, dtype):
    module = DacKL(dac_hidden=16, **options)
    student, teacher = random_logits(4, 300, seed=13, scale=8.0)
    teacher[:, :40] = -math.inf  # masked for both
    student[:, :40] = -math.inf
    student[0, 50:60] = -math.inf  # masked for the student only: large but finite
    teacher[1, 60:70] = -math.inf  # masked for the teacher only
    teacher[2] = -1e4
    teacher[2, 100] = 1e4  # a one-hot teacher
    student[3, 200] = 1e4  # a one-hot student
    student = student.to(dtype).requires_grad_()
    output = module(Rows(student, teacher.to(dtype)))
    assert output.values.dtype == torch.float32
    output.values.sum().backward()
    assert torch.isfinite(output.values).all() and torch.isfinite(student.grad).all()
    assert all(torch.isfinite(stat).all() for stat in output.stats.values())
    assert all(torch.isfinite(parameter.grad).all() for parameter in module.parameters() if parameter.grad is not None)


@pytest.mark.parametrize(
    "options",
    [
        {"dac_mode": "clip"},
        {"dac_quantile_space": "rank"},
        {"dac_components": "all"},
        {"dac_input": "logits"},
        {"dac_target": "ground_truth"},
        {"dac_fixed_quantiles": [0.9, 0.5]},
        {"dac_fixed_quantiles": "0.5"},
        {"dac_fixed_quantiles": "a,b"},
        {"dac_kappa": 0.0},
        {"dac_l_min": 0.9, "dac_l_max": 0.5},
    ],
)
def test_invalid_options_raise(options):
    with pytest.raises(ValueError):
        DacKL(**options)


def test_fixed_quantiles_from_command_line_text():
    assert DacKL(dac_fixed_quantiles="0.3,0.9").fixed_quantiles == (0.3, 0.9)


def test_fixed_quantiles_have_no_parameters_and_no_guard():
    module = DacKL(dac_fixed_quantiles=[0.5, 1.0], dac_coverage_weight=1.0, dac_coverage_rho=1.0)
    assert list(module.parameters()) == []
    output = module(Rows(*random_logits(3, 20, seed=1)))
    assert (output.stats["dac_coverage"] == 0).all()
    assert output.stats["dac_l"].tolist() == [0.5] * 3 and output.stats["dac_u"].tolist() == [1.0] * 3
