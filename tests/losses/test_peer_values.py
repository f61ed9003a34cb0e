"""Expected values from the peers' own test suites, reproduced with our losses.

- torchtune, tests/torchtune/modules/loss/test_kd_losses.py (`test_*_kl_loss_expected`):
  ForwardKLLoss is the cross-entropy form -Σ p log q = KL(p || q) + H(p), so our `fkl`
  (0.6293) plus the teacher entropy H(p) (1.0916, mean over the tokens) gives their 1.7209; ReverseKLLoss
  is KL(q || p) with no offset (0.6775); SymmetricKLLoss (ratio 0.5) is the mean of the two
  (1.1992). Their inputs are bfloat16; their tolerance is 1e-2.
- TRL, tests/experimental/test_gkd_trainer.py (`TestGeneralizedJSDLoss`): the edge cases
  beta = 0 / 1 against F.kl_div, uniform and identical inputs, symmetry at beta = 0.5.
Our numbers are our own code's; nothing here imports the peers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mgsr_cli.losses import build_loss

STUDENT = [
    [[1.1250, -0.4102, -0.0879, -2.5000], [0.2676, 0.3535, 0.8711, -1.4688],
     [-0.1084, 1.6641, 0.0084, 0.1196], [0.5000, -0.6406, -0.2236, -1.5938]],
    [[-1.5312, -1.9219, 0.0000, -0.5039], [-1.5391, 1.5312, 0.5820, 0.2695],
     [-0.3887, 1.2188, 0.0000, 0.6055], [0.5000, 1.3828, 0.1309, -1.0312]],
]  # fmt: skip
TEACHER = [
    [[-0.0381, -1.2578, -1.2031, 0.0947], [-0.7852, 0.4492, 1.5547, 0.0972],
     [0.8203, 0.0012, 0.7656, 0.3477], [-1.5781, 0.4297, 0.5977, 0.3926]],
    [[1.5156, 0.1641, 2.0781, -0.7734], [-0.5898, 0.4453, -0.7969, 0.6328],
     [0.6289, -0.8359, 0.9258, 0.2109], [0.0006, 0.5195, 3.2344, -1.5781]],
]  # fmt: skip
TORCHTUNE_TOLERANCE = 1e-2  # theirs (bfloat16 inputs)


def torchtune_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student = torch.tensor(STUDENT, dtype=torch.bfloat16).float()
    teacher = torch.tensor(TEACHER, dtype=torch.bfloat16).float()
    return student, teacher, torch.ones(2, 4, dtype=torch.bool)  # labels [[0, 3, 3, 1], [1, 1, 1, 1]]: none ignored


def mean_teacher_entropy(teacher: torch.Tensor) -> float:
    log_p = teacher.log_softmax(dim=-1)
    return float(-(log_p.exp() * log_p).sum(dim=-1).mean())


def test_torchtune_forward_kl_is_ours_plus_the_teacher_entropy():
    student, teacher, mask = torchtune_batch()
    ours = float(build_loss("fkl")(student, teacher, mask).loss)
    entropy = mean_teacher_entropy(teacher)
    assert entropy == pytest.approx(1.0916, abs=1e-4)  # the H(p) offset of the cross-entropy form here
    assert ours == pytest.approx(0.6293, abs=1e-4)
    assert ours + entropy == pytest.approx(1.7209, abs=TORCHTUNE_TOLERANCE)


def test_torchtune_reverse_and_symmetric_kl():
    student, teacher, mask = torchtune_batch()
    assert float(build_loss("rkl")(student, teacher, mask).loss) == pytest.approx(0.6775, abs=TORCHTUNE_TOLERANCE)
    symmetric = float(build_loss("fkl=0.5,rkl=0.5")(student, teacher, mask).loss) + 0.5 * mean_teacher_entropy(teacher)
    assert symmetric == pytest.approx(1.1992, abs=TORCHTUNE_TOLERANCE)


def test_trl_gjsd_edge_cases():
    """TRL's student [0.1, 0.9] vs teacher [0.9, 0.1]: beta = 1 is KL(student || teacher), beta = 0
    KL(teacher || student), both F.kl_div(..., reduction="batchmean") = 0.8 ln 9 here."""
    student = torch.log(torch.tensor([[[0.1, 0.9]]]))
    teacher = torch.log(torch.tensor([[[0.9, 0.1]]]))
    mask = torch.ones(1, 1, dtype=torch.bool)
    beta_1 = F.kl_div(F.log_softmax(teacher, dim=-1), F.softmax(student, dim=-1), reduction="batchmean")
    beta_0 = F.kl_div(F.log_softmax(student, dim=-1), F.softmax(teacher, dim=-1), reduction="batchmean")
    assert float(beta_1) == pytest.approx(0.8 * math.log(9), rel=1e-6)
    assert float(build_loss("gjsd:1")(student, teacher, mask).loss) == pytest.approx(float(beta_1), abs=1e-5)
    assert float(build_loss("gjsd:0")(student, teacher, mask).loss) == pytest.approx(float(beta_0), abs=1e-5)


def test_trl_gjsd_uniform_identical_and_symmetry():
    mask = torch.ones(2, 3, dtype=torch.bool)
    uniform = torch.ones(1, 1, 5)
    assert abs(float(build_loss("gjsd:0.5")(uniform, uniform, torch.ones(1, 1, dtype=torch.bool)).loss)) < 1e-5
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 2, 3, 5, generator=generator)
    assert abs(float(build_loss("gjsd:0.5")(teacher, teacher, mask).loss)) < 1e-6
    forward, backward = (float(build_loss("gjsd:0.5")(a, b, mask).loss) for a, b in ((student, teacher), (teacher, student)))
    assert forward == pytest.approx(backward, rel=1e-6)
    skewed = [float(build_loss("gjsd:0.1")(a, b, mask).loss) for a, b in ((student, teacher), (teacher, student))]
    assert skewed[0] != pytest.approx(skewed[1], rel=1e-3)


def test_temperature_squared_scales_the_distillation_terms_only():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 2, 3, 7, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 7, (2, 3), generator=generator)
    mask = torch.ones(2, 3, dtype=torch.bool)
    plain = build_loss("sft,fkl", temperature=2.0)(student, teacher, mask, labels=labels)
    squared = build_loss("sft,fkl", temperature=2.0, temperature_squared=True)(student, teacher, mask, labels=labels)
    torch.testing.assert_close(squared.loss, plain.terms["sft"] + 4.0 * plain.terms["fkl"])
    torch.testing.assert_close(squared.terms["fkl"], plain.terms["fkl"])  # logged values stay unweighted
    with pytest.raises(ValueError, match="temperature_squared"):
        build_loss("fkl", temperature_squared="yes")
