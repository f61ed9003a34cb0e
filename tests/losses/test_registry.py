"""Spec parsing, options, and the [B, T, V] objective's masking and bookkeeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgsr_cli.losses import LOSS_NAMES, Objective, TermOutput, build_loss, parse_spec
from mgsr_cli.losses.divergences import ForwardKL, SkewForwardKL
from mgsr_cli.losses.ranking import RankLoss


def random_batch(batch: int = 2, time: int = 5, vocab: int = 13, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, time, vocab, generator=generator, dtype=dtype)
    teacher = torch.randn(batch, time, vocab, generator=generator, dtype=dtype)
    mask = torch.rand(batch, time, generator=generator) > 0.4
    mask[0, 1] = True
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    return student, teacher, mask, labels


def weights_by_name(objective: Objective) -> dict[str, float]:
    return {term.name: weight for term, weight in objective.weighted_terms}


def test_parse_weights_params_and_defaults():
    assert [(item.name, item.param, item.weight) for item in parse_spec("rank:5=2, fkl=1")] == [
        ("rank", "5", 2.0),
        ("fkl", None, 1.0),
    ]
    assert [(item.name, item.weight) for item in parse_spec("sft,fkl")] == [("sft", 1.0), ("fkl", 1.0)]
    assert weights_by_name(build_loss("sft=1,rkl=0.5")) == {"sft": 1.0, "rkl": 0.5}


def test_params_reach_the_terms():
    skew, rank = (term for term, _ in build_loss("skl:0.3,rank:7=2").weighted_terms)
    assert isinstance(skew, SkewForwardKL) and skew.alpha == 0.3
    assert isinstance(rank, RankLoss) and rank.k == 7
    assert build_loss("skl").weighted_terms[0][0].alpha == 0.1
    assert build_loss("akl").weighted_terms[0][0].mu == 0.5
    assert build_loss("gjsd").weighted_terms[0][0].beta == 0.5
    assert build_loss("rank").weighted_terms[0][0].k == 5


def test_kd_is_fkl():
    (term, weight), = build_loss("kd=2").weighted_terms
    assert isinstance(term, ForwardKL) and term.name == "fkl" and weight == 2.0


def test_rank_options():
    rank = build_loss("rank:3", rank_on="probs", rank_temperature=0.01).weighted_terms[0][0]
    assert (rank.rank_on, rank.rank_temperature) == ("probs", 0.01)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fkll", "valid: sft, fkl, kd"),
        ("fkl:2", "takes no ':param'"),
        ("skl:abc", "not a number"),
        ("skl:1.5", "(0, 1)"),
        ("gjsd:-0.1", "[0, 1]"),
        ("rank:2.5", "not an integer"),
        ("rank:0", "k >= 1"),
        ("fkl=x", "not a number"),
        ("fkl=-1", ">= 0"),
        ("fkl,,sft", "empty item"),
        ("", "empty item"),
        ("fkl,kd", "repeats fkl"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(ValueError, match=None) as error:
        build_loss(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_names_are_listed():
    with pytest.raises(ValueError) as error:
        build_loss("bogus")
    assert all(name in str(error.value) for name in LOSS_NAMES)


def test_options_of_absent_terms_are_accepted_unknown_ones_rejected():
    build_loss("fkl", dac_mode="mask", dac_fixed_quantiles=[0.9, 1.0], span_relation="cosine", span_prior="words",
               span_pairs="adjacent", rank_on="probs", dac_coverage_rho=0.5, dac_coverage_weight=0.1)
    with pytest.raises(ValueError, match="unknown loss option.*dac_mood.*valid: dac_components"):
        build_loss("fkl", dac_mood="mask")
    with pytest.raises(ValueError, match="rank_on must be one of"):
        build_loss("rank:5", rank_on="ranks")
    assert build_loss("rank:5", rank_on=None).weighted_terms[0][0].rank_on == "logprobs"  # None = default


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"chunk_size": 0}])
def test_bad_objective_settings(bad):
    with pytest.raises(ValueError):
        build_loss("fkl", **bad)


def test_public_call_shapes_and_mask():
    student, teacher, mask, _ = random_batch()
    output = build_loss("skl:0.1")(student, teacher, mask)
    assert output.loss.shape == () and output.per_token.shape == mask.shape
    assert torch.all(output.per_token[~mask] == 0) and torch.all(output.per_token[mask] > 0)
    torch.testing.assert_close(output.per_token[mask].mean(), output.loss)
    assert set(output.terms) == {"skl"} and not output.terms["skl"].requires_grad


def test_weighted_sum_of_terms():
    student, teacher, mask, labels = random_batch(seed=1)
    combined = build_loss("sft=0.5,fkl=2,rank:3=1.5")(student, teacher, mask, labels=labels)
    parts = {spec: build_loss(spec)(student, teacher, mask, labels=labels).loss for spec in ("sft", "fkl", "rank:3")}
    torch.testing.assert_close(combined.loss, 0.5 * parts["sft"] + 2 * parts["fkl"] + 1.5 * parts["rank:3"])
    torch.testing.assert_close(combined.terms["fkl"], parts["fkl"])
    torch.testing.assert_close(combined.per_token[mask].mean(), combined.loss)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_masked_positions_change_nothing(chunk_size):
    student, teacher, mask, labels = random_batch(seed=2)
    objective = build_loss("sft,fkl,akl:0.5,rank:3", chunk_size=chunk_size)
    results = []
    for fill in (0.0, 1e4):
        changed_student = student.masked_fill(~mask.unsqueeze(-1), fill).requires_grad_(True)
        changed_teacher = teacher.masked_fill(~mask.unsqueeze(-1), -fill)
        output = objective(changed_student, changed_teacher, mask, labels=labels)
        output.loss.backward()
        results.append((output.loss, changed_student.grad))
    (first_loss, first_grad), (second_loss, second_grad) = results
    assert torch.equal(first_loss, second_loss) and torch.equal(first_grad, second_grad)
    assert torch.all(first_grad[~mask] == 0)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fully_masked_batch_gives_zero_loss_and_zero_grad(chunk_size):
    student, teacher, _, labels = random_batch(seed=3)
    student.requires_grad_(True)
    mask = torch.zeros(student.shape[:2], dtype=torch.bool)
    output = build_loss("sft,fkl,rank:5", chunk_size=chunk_size)(student, teacher, mask, labels=labels)
    output.loss.backward()
    assert output.loss.item() == 0.0 and torch.all(student.grad == 0)
    assert torch.all(output.per_token == 0) and all(value.item() == 0.0 for value in output.terms.values())


def test_teacher_gets_no_gradient():
    student, teacher, mask, _ = random_batch(seed=4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    build_loss("fkl,rank:3", temperature=2.0)(student, teacher, mask).loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_input_errors():
    student, teacher, mask, _ = random_batch()
    with pytest.raises(ValueError, match="vocabularies differ"):
        build_loss("fkl")(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError, match="mask must be"):
        build_loss("fkl")(student, teacher, mask[:, :-1])
    with pytest.raises(ValueError, match="needs targets"):
        build_loss("sft")(student, teacher, mask)


class ScaledSquare(nn.Module):
    """A test-only token term with a learnable parameter and a logged stat."""

    name = "scaled_square"
    unit = "token"

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, rows):
        values = self.scale * rows.student_logits.square().mean(dim=-1)
        return TermOutput(values=values, stats={"row_max": rows.student_logits.detach().amax(dim=-1)})


def test_module_terms_are_submodules_and_stats_are_averaged():
    student, teacher, mask, _ = random_batch(seed=5)
    objective = Objective([(ScaledSquare(), 1.0), (ForwardKL(), 1.0)])
    assert [name for name, _ in objective.named_parameters()] == ["term_modules.scaled_square.scale"]
    output = objective(student, teacher, mask)
    output.loss.backward()
    assert objective.term_modules["scaled_square"].scale.grad is not None
    assert output.stats["row_max"] == pytest.approx(student[mask].amax(dim=-1).mean().item())


def test_mgsr_spec_builds_when_its_terms_exist():
    pytest.importorskip("mgsr_cli.losses.dac_kl")
    pytest.importorskip("mgsr_cli.losses.span")
    objective = build_loss("sft=1,dac_kl=1,span=1", dac_coverage_rho=0.5, span_relation="hadamard", span_prior="words")
    assert [term.name for term, _ in objective.weighted_terms] == ["sft", "dac_kl", "span"]
    assert len(list(objective.parameters())) > 0  # f_sub's parameters are reachable for the optimizer
