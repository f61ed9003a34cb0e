"""The fused pass (one shared log-softmax per block for every term) equals the per-term path.

Every comparison runs in float64 and asserts allclose at rtol 1e-9 / atol 1e-12 (the two
paths compute the same formulas in a different order): the loss, the per-token values, the
term means, the stats, and the gradients of the student logits and of DAC-KL's f_sub.
"""

from __future__ import annotations

import zlib
from importlib import resources

import pytest
import torch

from mgsr_cli.config import DistillConfig
from mgsr_cli.config_loading import load_recipe
from mgsr_cli.losses import Objective, build_loss, fused
from mgsr_cli.losses.span import RELATIONS

RTOL, ATOL = 1e-9, 1e-12


def shipped_specs() -> list[tuple[str, dict]]:
    """(loss spec, loss options) of every shipped recipe with more than one term, deduplicated."""
    found = {}
    for entry in sorted(resources.files("mgsr_cli.recipes").iterdir(), key=lambda entry: entry.name):
        if entry.name.endswith(".yaml"):
            config = load_recipe(DistillConfig, entry)
            found.setdefault((config.loss, repr(sorted(config.loss_options.items()))), config.loss_options)
    return [(spec, options) for (spec, _), options in found.items() if "," in spec]


RANDOM_SUMS = [
    "sft=0.5,fkl=2,span=0.3,tvd=1",
    "rkl=0.7,skl:0.2=1.5,srkl:0.3=0.2,js=1",
    "gjsd:0.3,akl:0.4=2,rank:3=0.5,sft=0.1",
    "dac_kl=2,rkl=0.5,span=3",
]
DAC_VARIANTS = [
    {"dac_mode": "winsorize", "dac_target": "label"},
    {"dac_quantile_space": "cumulative", "dac_components": "band", "dac_input": "sorted_logprobs"},
    {"dac_fixed_quantiles": (0.4, 0.9), "dac_components": "target", "dac_normalize": False},
]


def random_batch(seed: int, vocab: int = 23, batch: int = 3, length: int = 7):
    """Logits [batch, length, vocab], a mask, labels with some -100, adjacent span pairs."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 3
    mask = torch.rand(batch, length, generator=generator) > 0.2
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = labels.masked_fill(torch.rand(batch, length, generator=generator) < 0.15, -100)
    positions = [(b, t) for b in range(batch) for t in range(length) if mask[b, t]]
    pairs = [(b, t, u) for (b, t), (c, u) in zip(positions, positions[1:]) if b == c and u == t + 1][::2]
    return student, teacher, mask, labels, torch.tensor(pairs, dtype=torch.long).reshape(-1, 3)


def evaluate(objective: Objective, batch) -> tuple:
    student, teacher, mask, labels, pairs = batch
    student = student.clone().requires_grad_(True)
    output = objective(student, teacher, mask, labels, pairs)
    parameters = list(objective.parameters())
    gradients = torch.autograd.grad(output.loss, [student, *parameters])
    return output, gradients


def objectives(spec: str, options: dict, **settings) -> tuple[Objective, Objective]:
    """(per-term, fused) objectives of `spec` with the same initial f_sub weights."""
    built = []
    for is_fused in (False, True):
        torch.manual_seed(0)
        built.append(build_loss(spec, fused=is_fused, **settings, **options).double())
    return built[0], built[1]


def assert_same(reference: tuple, candidate: tuple) -> None:
    (expected, expected_grads), (actual, actual_grads) = reference, candidate
    torch.testing.assert_close(actual.loss, expected.loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(actual.per_token, expected.per_token, rtol=RTOL, atol=ATOL)
    assert actual.terms.keys() == expected.terms.keys() and actual.stats.keys() == expected.stats.keys()
    for name in expected.terms:
        torch.testing.assert_close(actual.terms[name], expected.terms[name], rtol=RTOL, atol=ATOL)
    for name in expected.stats:
        assert actual.stats[name] == pytest.approx(expected.stats[name], rel=RTOL, abs=ATOL)
    assert len(actual_grads) == len(expected_grads)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=RTOL, atol=ATOL)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 rows at V = 23, so every batch is scored in several blocks."""
    monkeypatch.setattr(fused, "BLOCK_ENTRIES", 4 * 23)


SHIPPED = shipped_specs()


def test_every_shipped_multi_term_recipe_is_covered():
    assert {"sft=1,dac_kl=1,span=1", "sft=1,fkl=1,span=1", "sft=1,dac_kl=1", "rank:5=1,fkl=0.5"} <= {spec for spec, _ in SHIPPED}


@pytest.mark.parametrize("spec, options", SHIPPED + [(spec, {}) for spec in RANDOM_SUMS], ids=lambda item: str(item))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_equals_per_term(spec, options, temperature, small_blocks):
    reference, candidate = objectives(spec, options, temperature=temperature)
    sharing = [term.name for term, _ in candidate.weighted_terms if hasattr(term, "from_log_probs")]
    assert not reference.uses_fused and candidate.uses_fused == (len(sharing) >= 2)
    batch = random_batch(zlib.crc32(f"{spec}{temperature}".encode()) % 1000)
    assert_same(evaluate(reference, batch), evaluate(candidate, batch))


@pytest.mark.parametrize("options", DAC_VARIANTS, ids=lambda options: ",".join(options))
def test_fused_equals_per_term_for_dac_variants(options, small_blocks):
    reference, candidate = objectives("sft=0.3,dac_kl=1,span=2", options)
    batch = random_batch(7)
    assert_same(evaluate(reference, batch), evaluate(candidate, batch))


@pytest.mark.parametrize("relation", RELATIONS)
def test_fused_equals_per_term_for_span_relations(relation, small_blocks):
    reference, candidate = objectives("sft=0.3,fkl=1,span=2", {"span_relation": relation})
    batch = random_batch(9)
    assert_same(evaluate(reference, batch), evaluate(candidate, batch))


def test_chunks_and_blocks_do_not_change_the_fused_result(small_blocks):
    batch = random_batch(3)
    whole = evaluate(objectives("sft,dac_kl,span", {})[1], batch)
    chunked = evaluate(objectives("sft,dac_kl,span", {}, chunk_size=5)[1], batch)
    assert_same(whole, chunked)


def test_fused_without_gradients_scores_the_same(small_blocks):
    _, objective = objectives("sft,dac_kl,span", {})
    student, teacher, mask, labels, pairs = random_batch(5)
    with_grad = objective(student.clone().requires_grad_(True), teacher, mask, labels, pairs)
    with torch.no_grad():
        without = objective(student, teacher, mask, labels, pairs)
    assert not without.loss.requires_grad
    torch.testing.assert_close(without.loss, with_grad.loss.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(without.per_token, with_grad.per_token, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("spec", ["sft,fkl,span", "sft=0.5,dac_kl=1"])
def test_fused_gradcheck(spec, monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_ENTRIES", 2 * 6)
    student, teacher, mask, labels, pairs = random_batch(11, vocab=6, batch=1, length=6)
    objective = build_loss(spec, temperature=1.5, dac_fixed_quantiles=(0.3, 0.95)).double()
    assert objective.uses_fused

    def loss(student_logits):
        return objective(student_logits, teacher, mask, labels, pairs).loss

    assert torch.autograd.gradcheck(loss, (student.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
