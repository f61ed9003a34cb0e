"""Token divergences against slow, plainly written references of method.md's equations."""

from __future__ import annotations

import math

import pytest
import torch

from mgsr_cli.losses import Rows, adaptive_kl, build_loss, divergences
from mgsr_cli.losses.adaptive_kl import AdaptiveKL, teacher_head_mask
from mgsr_cli.losses.cross_entropy import CrossEntropy
from mgsr_cli.losses.divergences import (
    ForwardKL,
    GeneralizedJSD,
    JensenShannon,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
)

# ---- references: python floats and loops, written from method.md, not from the fast code


def probabilities(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(value - top) for value in logits]
    total = sum(weights)
    return [weight / total for weight in weights]


def kl(a: list[float], b: list[float]) -> float:
    """KL(a || b) = Σ a_k (log a_k - log b_k), with 0 · log 0 = 0."""
    return sum(a_k * (math.log(a_k) - math.log(b_k)) for a_k, b_k in zip(a, b) if a_k > 0)


def mixture(a: list[float], b: list[float], weight_a: float) -> list[float]:
    return [weight_a * a_k + (1 - weight_a) * b_k for a_k, b_k in zip(a, b)]


def gjsd(p: list[float], q: list[float], beta: float) -> float:
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = mixture(p, q, beta)
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def akl(p: list[float], q: list[float], mu: float) -> float:
    order = sorted(range(len(p)), key=lambda k: -p[k])
    head, cumulative = set(), 0.0
    for position, k in enumerate(order):
        cumulative += p[k]
        if position > 0 and cumulative > mu:
            break
        head.add(k)
    head_gap = sum(abs(p[k] - q[k]) for k in range(len(p)) if k in head)
    tail_gap = sum(abs(p[k] - q[k]) for k in range(len(p)) if k not in head)
    head_weight = 0.5 if head_gap + tail_gap == 0 else head_gap / (head_gap + tail_gap)
    return head_weight * kl(p, q) + (1 - head_weight) * kl(q, p)


REFERENCES = {
    "fkl": lambda p, q: kl(p, q),
    "kd": lambda p, q: kl(p, q),
    "rkl": lambda p, q: kl(q, p),
    "skl:0.1": lambda p, q: kl(p, mixture(p, q, 0.1)),
    "skl:0.3": lambda p, q: kl(p, mixture(p, q, 0.3)),
    "srkl:0.1": lambda p, q: kl(q, mixture(p, q, 0.9)),
    "srkl:0.4": lambda p, q: kl(q, mixture(p, q, 0.6)),
    "gjsd:0.5": lambda p, q: gjsd(p, q, 0.5),
    "gjsd:0.2": lambda p, q: gjsd(p, q, 0.2),
    "gjsd:0": lambda p, q: gjsd(p, q, 0.0),
    "gjsd:1": lambda p, q: gjsd(p, q, 1.0),
    "js": lambda p, q: 0.5 * kl(p, mixture(p, q, 0.5)) + 0.5 * kl(q, mixture(p, q, 0.5)),
    "tvd": lambda p, q: 0.5 * sum(abs(p_k - q_k) for p_k, q_k in zip(p, q)),
    "akl:0.5": lambda p, q: akl(p, q, 0.5),
    "akl:0.2": lambda p, q: akl(p, q, 0.2),
}

DIVERGENCES = {
    "fkl": ForwardKL(),
    "rkl": ReverseKL(),
    "skl": SkewForwardKL(0.1),
    "srkl": SkewReverseKL(0.1),
    "gjsd:0.3": GeneralizedJSD(0.3),
    "gjsd:0": GeneralizedJSD(0.0),
    "gjsd:1": GeneralizedJSD(1.0),
    "js": JensenShannon(),
    "tvd": TotalVariation(),
    "akl": AdaptiveKL(0.5),
}


def random_batch(batch: int, time: int, vocab: int, seed: int, scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)
    teacher = scale * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, time, generator=generator) > 0.35
    mask[0, 0] = True
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    return student, teacher, mask, labels


def term_values(term, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return term(Rows(student, teacher)).values


SHAPES = [(2, 3, 7), (3, 5, 7), (1, 3, 50257)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("spec", sorted(REFERENCES))
def test_divergence_matches_reference(spec, shape):
    student, teacher, mask, _ = random_batch(*shape, seed=len(spec) + shape[-1])
    output = build_loss(spec)(student, teacher, mask)
    expected = [
        REFERENCES[spec](probabilities(teacher[b, t].tolist()), probabilities(student[b, t].tolist()))
        for b, t in mask.nonzero().tolist()
    ]
    torch.testing.assert_close(output.per_token[mask], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(output.loss, torch.tensor(sum(expected) / len(expected), dtype=torch.float64))
    assert torch.all(output.per_token[~mask] == 0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_sft_matches_reference(shape):
    student, teacher, mask, labels = random_batch(*shape, seed=3)
    labels[tuple(mask.nonzero()[-1].tolist())] = -100  # an ignored label inside the mask scores 0
    output = build_loss("sft")(student, teacher, mask, labels=labels)
    expected = [
        0.0 if labels[b, t] == -100 else -math.log(probabilities(student[b, t].tolist())[labels[b, t]])
        for b, t in mask.nonzero().tolist()
    ]
    torch.testing.assert_close(output.per_token[mask], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(output.loss, torch.tensor(sum(expected) / len(expected), dtype=torch.float64))


def test_temperature_scales_distillation_terms_but_not_sft():
    student, teacher, mask, labels = random_batch(2, 4, 7, seed=5)
    rows = mask.nonzero().tolist()
    output = build_loss("fkl,sft", temperature=2.0)(student, teacher, mask, labels=labels)
    expected_fkl = [kl(probabilities((teacher[b, t] / 2).tolist()), probabilities((student[b, t] / 2).tolist())) for b, t in rows]
    expected_sft = [-math.log(probabilities(student[b, t].tolist())[labels[b, t]]) for b, t in rows]
    torch.testing.assert_close(output.terms["fkl"], torch.tensor(sum(expected_fkl) / len(rows), dtype=torch.float64))
    torch.testing.assert_close(output.terms["sft"], torch.tensor(sum(expected_sft) / len(rows), dtype=torch.float64))


@pytest.mark.parametrize("name", [name for name in DIVERGENCES if name != "akl"])
def test_gradcheck(name):
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda logits: term_values(DIVERGENCES[name], logits, teacher), (student,))


def test_gradcheck_sft():
    generator = torch.Generator().manual_seed(12)
    student = torch.randn(4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 3, -100, 4])
    term = CrossEntropy()
    assert torch.autograd.gradcheck(lambda logits: term(Rows(logits, logits.detach(), targets)).values, (student,))


def test_akl_gradient_treats_weights_as_constants():
    """AKL's weights are detached, so its gradient is that of w_h·FKL + w_t·RKL with w fixed
    at the current point; checked by central differences of that frozen objective."""
    generator = torch.Generator().manual_seed(13)
    student = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    term = AdaptiveKL(0.5)
    head_weight = term.head_weight(torch.log_softmax(teacher, -1), torch.log_softmax(student.detach(), -1))

    def frozen(logits: torch.Tensor) -> torch.Tensor:
        forward, reverse = term_values(ForwardKL(), logits, teacher), term_values(ReverseKL(), logits, teacher)
        return (head_weight * forward + (1 - head_weight) * reverse).sum()

    term_values(term, student, teacher).sum().backward()
    step, numeric = 1e-6, torch.zeros_like(student)
    for index in range(student.numel()):
        offset = torch.zeros_like(student).view(-1)
        offset[index] = step
        offset = offset.view_as(student)
        numeric.view(-1)[index] = (frozen(student.detach() + offset) - frozen(student.detach() - offset)) / (2 * step)
    torch.testing.assert_close(student.grad, numeric, rtol=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(frozen, (student.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_zero_for_identical_and_nonnegative(name):
    generator = torch.Generator().manual_seed(17)
    logits = 4 * torch.randn(6, 50, dtype=torch.float64, generator=generator)
    other = 4 * torch.randn(6, 50, dtype=torch.float64, generator=generator)
    for dtype, tolerance in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        same = term_values(DIVERGENCES[name], logits.to(dtype), logits.to(dtype))
        assert same.abs().max() < tolerance
        assert term_values(DIVERGENCES[name], logits.to(dtype), other.to(dtype)).min() >= 0


def test_gjsd_endpoints_are_exactly_fkl_and_rkl():
    generator = torch.Generator().manual_seed(19)
    student = torch.randn(4, 9, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 9, generator=generator)
    for beta, reference in [(0.0, ForwardKL()), (1.0, ReverseKL())]:
        values = term_values(GeneralizedJSD(beta), student, teacher)
        (grad,) = torch.autograd.grad(values.sum(), student)
        expected = term_values(reference, student, teacher)
        (expected_grad,) = torch.autograd.grad(expected.sum(), student)
        assert torch.equal(values, expected) and torch.equal(grad, expected_grad)
    assert term_values(GeneralizedJSD(1e-9), student, teacher).max() < 1e-6  # the formula degenerates


@pytest.mark.parametrize("name", ["js", "tvd"])
def test_symmetric(name):
    generator = torch.Generator().manual_seed(23)
    first = torch.randn(5, 11, dtype=torch.float64, generator=generator)
    second = torch.randn(5, 11, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(term_values(DIVERGENCES[name], first, second), term_values(DIVERGENCES[name], second, first))


def masked_vocabulary_logits(seed: int):
    """Logits with -inf on a per-row random subset of the vocabulary, same subset in both."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(4, 12, dtype=torch.float64, generator=generator)
    teacher = torch.randn(4, 12, dtype=torch.float64, generator=generator)
    banned = torch.rand(4, 12, generator=generator) < 0.4
    banned[:, :3] = False
    return student.masked_fill(banned, -math.inf), teacher.masked_fill(banned, -math.inf), banned


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_masked_vocabulary_entries_are_ignored(name):
    """-inf in both logits: finite values, zero gradient there, and the same value as the
    divergence over the remaining vocabulary only."""
    student, teacher, banned = masked_vocabulary_logits(seed=29)
    student.requires_grad_(True)
    values = term_values(DIVERGENCES[name], student, teacher)
    (grad,) = torch.autograd.grad(values.sum(), student)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    assert torch.all(grad[banned] == 0)
    for row in range(student.shape[0]):
        kept = ~banned[row]
        alone = term_values(DIVERGENCES[name], student[row, kept][None].detach(), teacher[row, kept][None])
        torch.testing.assert_close(values[row : row + 1].detach(), alone)


@pytest.mark.parametrize("order", ["a_underflows", "b_underflows"])
def test_kl_rows_where_one_side_underflows_and_the_other_is_minus_inf(order):
    """float32 a_k = exp(-200) is 0 while log b_k = -inf: the entry counts 0 (as with log a_k = -inf),
    not 0 * inf = NaN; each row is checked against the float64 reference over the other entries."""
    finite = torch.log_softmax(torch.tensor([[0.3, -0.2, -200.0], [1.0, 0.0, -250.0]]), dim=-1)
    other = torch.log_softmax(torch.tensor([[0.1, 0.4, -math.inf], [0.0, 2.0, -math.inf]]), dim=-1)
    log_a, log_b = (finite, other) if order == "a_underflows" else (other, finite)
    values = divergences.kl_rows(log_a, log_b)
    assert torch.isfinite(values).all()
    for row in range(2):
        a, b = (probabilities([float(x) for x in log[row, :2]]) for log in (log_a, log_b))
        torch.testing.assert_close(values[row], torch.tensor(kl(a, b), dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["sft", *sorted(REFERENCES), "rank:5"])
def test_no_nan_with_masked_vocabulary_or_zero_probabilities(spec):
    student, teacher, _ = masked_vocabulary_logits(seed=31)
    teacher = teacher.clone()
    teacher[:, 3] = teacher[:, 0] - 1e4  # finite logit, probability exactly 0
    student = student.view(2, 2, 12).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    labels = torch.zeros(2, 2, dtype=torch.long)
    output = build_loss(spec)(student, teacher.view(2, 2, 12), mask, labels=labels)
    output.loss.backward()
    assert torch.isfinite(output.loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("spec", ["sft", "fkl", "rkl", "skl:0.1", "srkl:0.1", "gjsd:0.5", "js", "tvd", "akl:0.5"])
def test_bf16_inputs(spec):
    student, teacher, mask, labels = random_batch(2, 4, 257, seed=37)
    student_bf16 = student.to(torch.bfloat16).requires_grad_(True)
    teacher_bf16 = teacher.to(torch.bfloat16)
    output = build_loss(spec)(student_bf16, teacher_bf16, mask, labels=labels)
    output.loss.backward()
    assert output.loss.dtype == torch.float32 and student_bf16.grad.dtype == torch.bfloat16
    assert torch.isfinite(output.loss) and torch.isfinite(student_bf16.grad.float()).all()
    upcast = build_loss(spec)(student_bf16.detach().float(), teacher_bf16.float(), mask, labels=labels).loss
    torch.testing.assert_close(output.loss, upcast, rtol=1e-6, atol=1e-6)  # float32 accumulation
    original = build_loss(spec)(student.float(), teacher.float(), mask, labels=labels).loss
    torch.testing.assert_close(output.loss, original, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("name", ["sft", *sorted(DIVERGENCES)])
def test_row_blocks_change_nothing(name, monkeypatch):
    """The functions walk rows in blocks; 2-row blocks over 5 rows give the same values and
    gradients as one block. Blocks change the shapes the reductions run over, so float64
    results agree to rounding (1e-12), not bitwise."""
    generator = torch.Generator().manual_seed(41)
    student = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    teacher = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    targets = torch.tensor([1, -100, 6, 0, 3])
    term = CrossEntropy() if name == "sft" else DIVERGENCES[name]
    weights = torch.rand(5, dtype=torch.float64, generator=generator)

    def values_and_grad():
        logits = student.clone().requires_grad_(True)
        values = term(Rows(logits, teacher, targets)).values
        (grad,) = torch.autograd.grad((values * weights).sum(), logits)
        return values.detach(), grad

    whole = values_and_grad()
    monkeypatch.setattr(divergences, "BLOCK_ENTRIES", 14)
    assert len(divergences.row_blocks(5, 7)) == 3
    blocked = values_and_grad()
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked[1], whole[1], rtol=1e-12, atol=1e-12)


def test_akl_head_from_candidates_and_from_full_sort():
    """Peaked rows resolve their head among the top candidates, flat rows need the full
    sort; both agree with the reference head and AKL value."""
    generator = torch.Generator().manual_seed(43)
    scales = torch.tensor([8.0, 0.1, 6.0, 0.3], dtype=torch.float64).unsqueeze(-1)
    teacher = scales * torch.randn(4, 1000, dtype=torch.float64, generator=generator)
    student = torch.randn(4, 1000, dtype=torch.float64, generator=generator)
    p = torch.softmax(teacher, dim=-1)
    top_mass = p.topk(adaptive_kl.HEAD_CANDIDATES, dim=-1).values.sum(dim=-1)
    assert (top_mass > 0.5).tolist() == [True, False, True, False]
    head = teacher_head_mask(p, 0.5)
    for row in range(4):
        order = sorted(range(1000), key=lambda k: -p[row, k].item())
        cumulative = p[row, order].cumsum(0)
        expected = {k for position, k in enumerate(order) if position == 0 or cumulative[position] <= 0.5}
        assert set(head[row].nonzero().flatten().tolist()) == expected
    expected_values = [akl(p[row].tolist(), probabilities(student[row].tolist()), 0.5) for row in range(4)]
    torch.testing.assert_close(term_values(AdaptiveKL(0.5), student, teacher), torch.tensor(expected_values, dtype=torch.float64))
