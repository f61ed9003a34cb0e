"""Every common architecture family through mgsr: SCRG's cache reuse against re-encoding, no
deprecation warnings from mgsr's own forwards, and generate -> correct -> distill (SGO + SCRG
from step 1) -> evaluate through the CLI. Tiny random-weight pairs from tests/families.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mgsr_cli.artifacts import read_stage
from mgsr_cli.cli import app
from mgsr_cli.config import SamplingConfig
from mgsr_cli.heads import hidden_states
from mgsr_cli.kv_cache import reusable
from mgsr_cli.models import load_model
from mgsr_cli.sampling import TokenSpace, continue_sampling, forward_step, left_pad, position_ids_from_mask
from mgsr_cli.scrg_regenerate import regenerate

from .conftest import write_jsonl
from .families import EOS, FAMILIES, VOCAB, WINDOW, build_pair

SPACE = TokenSpace((EOS,), EOS, VOCAB)
CPU = torch.device("cpu")
SLIDING = {"mistral", "gemma2", "phi3"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family -> (teacher_dir, student_dir), each built on first use."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            built[family] = build_pair(family, root / family)
        return built[family]

    return get


def _sequences(width: int):
    """Three rows whose teacher-forced inputs are at most `width` tokens wide."""
    prompts = [[(7 * row + 3 * i) % 5000 + 10 for i in range(n)] for row, n in enumerate([max(width // 2, 1), width - 3, 1])]
    responses = [[(19 * row + 7 * i) % 3000 + 20 for i in range(n)] for row, n in enumerate([4, 4, 3])]
    return prompts, responses


@pytest.mark.parametrize("family", FAMILIES)
def test_regeneration_equals_re_encoding_whatever_the_window(family, pairs):
    """Continuing from the scoring cache (where exact) or re-encoding the kept prefix (where the
    window already dropped columns) gives what sampling after encoding prompt + prefix + teacher
    token from scratch gives; inputs shorter and longer than the window."""
    student = load_model(str(pairs(family)[1]), torch.float32, CPU)
    kept, teacher_tokens, budgets, rows = [2, 0, 1], [311, 42, 1000], [5, 4, 3], [2, 0, 1]
    for width in (WINDOW - 2, 3 * WINDOW):
        prompts, responses = _sequences(width)
        input_ids, mask = left_pad([p + r[:-1] for p, r in zip(prompts, responses)], EOS, CPU)
        assert input_ids.shape[1] <= width
        with torch.inference_mode():
            _, cache = hidden_states(student, input_ids, mask, position_ids_from_mask(mask), use_cache=True)
            assert reusable(cache) == (family not in SLIDING or width < WINDOW)
            reused = regenerate(
                student, cache, input_ids, mask.sum(dim=1), torch.tensor(rows),
                torch.tensor([len(prompts[r]) + kept[r] for r in rows]), torch.tensor([teacher_tokens[r] for r in rows]),
                [budgets[r] for r in rows], SamplingConfig(temperature=0.0), None, SPACE,
            )
            ids, prefix_mask = left_pad([prompts[r] + responses[r][: kept[r]] + [teacher_tokens[r]] for r in rows], EOS, CPU)
            logits, fresh = forward_step(student, ids, prefix_mask, position_ids_from_mask(prefix_mask))
            scratch = continue_sampling(
                student, logits, fresh, prefix_mask, prefix_mask.sum(dim=1), [budgets[r] for r in rows],
                SamplingConfig(temperature=0.0), None, SPACE,
            )
        assert [reused.row(i) for i in range(3)] == [scratch.row(i) for i in range(3)]


def _invoke(*args):
    """Run one CLI command in-process; mgsr's own forwards must raise no deprecation warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "cache" in str(w.message)] == []
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_correct_distill_evaluate(family, pairs, tmp_path):
    teacher, student = pairs(family)
    rows = [{"instruction": f"Say {word} twice.", "input": "", "output": f"{word} {word}."} for word in ("one", "two")]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    lengths = ["--max-new-tokens", 6, "--max-length", 120, "--max-prompt-length", 96]
    _invoke("generate", "--model", student, "--data", data, *lengths, "--out", tmp_path / "gen")
    _invoke("correct", "--input", tmp_path / "gen", "--teacher", teacher, "--student", student, "--out", tmp_path / "cor")
    _, corrected = read_stage(tmp_path / "cor", ("correct",))
    assert len(corrected) == 2 and all(len(record["response_ids"]) <= 6 for record in corrected)
    _invoke(
        "distill", "--teacher", teacher, "--student", student, "--data", data, "--dev-data", "", "--out", tmp_path / "run",
        "--batch-size", 2, "--max-steps", 1, "--max-length", 120, "--data-format-max-prompt-length", 96, "--sgo-policy", "on_policy", "--scrg",
        "--sgo-sampling-max-new-tokens", 6, "--eval-every", 0, "--save-every", 0, "--log-every", 1,
    )
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [line["source"] for line in steps] == ["fresh"] and all(torch.isfinite(torch.tensor(line["loss"])) for line in steps)
    _invoke("evaluate", "--model", tmp_path / "run", "--data", data, "--limit", 2, "--seeds", 1, *lengths, "--out", tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["results"]
