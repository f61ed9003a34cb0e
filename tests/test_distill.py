"""`mgsr distill` end to end on the tiny pair: CLI, every recipe, behaviour, errors, padded heads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mgsr_cli.cli import app
from mgsr_cli.config import DistillConfig
from mgsr_cli.config_loading import load_recipe, override, recipe_path
from mgsr_cli.losses import parse_spec
from mgsr_cli.models import TINY_TEACHER, build_tiny_gpt2
from mgsr_cli.train import run_distill


# Small enough for a CPU test: short prompts and responses, a few examples, no validation.
FAST = {
    "limit": 8,
    "dev_data": None,
    "batch_size": 2,
    "max_length": 128,
    "data_format": {"max_prompt_length": 96},
    "sgo_sampling": {"max_new_tokens": 6},
    "eval_every": 0,
    "save_every": 0,
    "log_every": 1,
    "chunk_size": 64,
}
PAPER_SCALE = {"gpt2-xl-to-base", "opt-6.7b-to-1.3b", "llama-13b-to-7b-lora"}
RECIPES = sorted(entry.name[:-5] for entry in resources.files("mgsr_cli.recipes").iterdir() if entry.name.endswith(".yaml"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_distill_writes_a_student_that_loads_and_evaluates(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, student = map(str, tiny_pair)
    runner = CliRunner()
    result = runner.invoke(app, [
        "distill", "--teacher", teacher, "--student", student, "--out", str(tmp_path / "run"),
        "--limit", "8", "--dev-limit", "4", "--batch-size", "4", "--max-steps", "2", "--max-length", "160",
        "--data-format-max-prompt-length", "128", "--sgo-sampling-max-new-tokens", "6", "--theta-init", "1",
        "--eval-every", "0", "--eval-rouge", "--eval-rouge-examples", "4", "--eval-sampling-max-new-tokens", "4",
    ])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "run")
    out = tmp_path / "run"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["steps"] == 2 and manifest["selected"] == "best"
    assert (out / "student" / "model.safetensors").exists() and (out / "loss_curve.png").stat().st_size > 0
    assert (out / "config.yaml").exists() and (out / "last").is_dir()
    lines = metrics(out)
    assert {"sft", "dac_kl", "span", "grad_share/span", "grad_norm/sft"} <= set(lines[0]) and any("val_rougeL" in line for line in lines)
    AutoModelForCausalLM.from_pretrained(str(out / "student"))
    scored = runner.invoke(app, ["evaluate", "--model", str(out), "--data", "dolly", "--limit", "2",  # a distill dir = its student
                                 "--seeds", "10", "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["results"]["run"]["dolly"]["examples"] == 2


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates(name):
    config = load_recipe(DistillConfig, recipe_path(name))
    assert parse_spec(config.loss)


@pytest.mark.parametrize("name", [name for name in RECIPES if name not in PAPER_SCALE])
def test_recipe_smoke_two_steps_log_every_term_finite(name, tiny_pair, tmp_path):
    config = override(load_recipe(DistillConfig, recipe_path(name)), {
        **FAST, "teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]), "max_steps": 2, "theta_init": 1.0,
    })
    out = run_distill(config, tmp_path / name)
    lines = [line for line in metrics(out) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2]
    for term in {item.name + (f":{item.param}" if item.param else "") for item in parse_spec(config.loss)}:
        logged = [line.get(term, line.get(term.split(":")[0])) for line in lines]
        assert all(value is not None and math.isfinite(value) for value in logged), (term, lines)
    assert all(math.isfinite(line["loss"]) for line in lines)


def run_fixed_batch(tiny_pair, tmp_path, recipe: str, steps: int) -> list[dict]:
    """Training on one fixed batch of 4 sequences (limit = batch size) for `steps` steps."""
    config = override(load_recipe(DistillConfig, recipe_path(recipe)), {
        **FAST, "teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]), "limit": 4, "batch_size": 4,
        "max_steps": steps, "lr": 3e-3, "grad_clip": 0.0,
    })
    return [line for line in metrics(run_distill(config, tmp_path / recipe)) if "loss" in line]


def test_fkl_lowers_kl_to_the_teacher(tiny_pair, tmp_path):
    lines = run_fixed_batch(tiny_pair, tmp_path, "kd", 8)
    assert lines[-1]["fkl"] < 0.8 * lines[0]["fkl"]


def test_sft_lowers_cross_entropy_on_the_ground_truth(tiny_pair, tmp_path):
    lines = run_fixed_batch(tiny_pair, tmp_path, "sft", 8)
    assert lines[-1]["sft"] < lines[0]["sft"] - 0.5


def test_padded_output_layers_of_different_sizes_just_work(tiny_pair, tmp_path):
    """Same tokenizer, teacher head padded to 50,264 rows, student 50,257: only the real vocabulary is compared."""
    padded_teacher = build_tiny_gpt2(tmp_path / "padded", TINY_TEACHER, seed=3, vocab_size=50264)
    config = override(DistillConfig(), {**FAST, "teacher": str(padded_teacher), "student": str(tiny_pair[1]), "max_steps": 2, "theta_init": 1.0})
    lines = [line for line in metrics(run_distill(config, tmp_path / "run")) if "loss" in line]
    assert len(lines) == 2 and all(math.isfinite(line["dac_kl"]) for line in lines)


def mgsr_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgsr_cli.cli", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_mismatched_tokenizers_are_a_one_line_error(tiny_pair, tmp_path):
    from mgsr_cli.models import load_tokenizer

    other = tmp_path / "other"
    build_tiny_gpt2(other, TINY_TEACHER, seed=5)
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<only_in_the_teacher>"])
    tokenizer.save_pretrained(str(other))
    result = mgsr_cli("distill", "--teacher", other, "--student", tiny_pair[1], "--out", tmp_path / "run")
    assert_one_line_error(result, "do not share a vocabulary")
    assert "<only_in_the_teacher>" in result.stderr


def test_empty_data_file_is_a_one_line_error(tiny_pair, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = mgsr_cli("distill", "--teacher", tiny_pair[0], "--student", tiny_pair[1], "--data", empty, "--out", tmp_path / "run")
    assert_one_line_error(result, "holds no examples")
    assert not (tmp_path / "run").exists()


def test_recipe_with_an_unknown_key_is_a_one_line_error(tiny_pair, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("loss: fkl\nlearning_rate: 0.1\n")
    result = mgsr_cli("distill", "--recipe", recipe, "--teacher", tiny_pair[0], "--student", tiny_pair[1], "--out", tmp_path / "run")
    assert_one_line_error(result, "unknown key 'learning_rate'")


def test_unknown_loss_and_option_are_one_line_errors(tiny_pair, tmp_path):
    result = mgsr_cli("distill", "--loss", "fkl,wkl", "--teacher", tiny_pair[0], "--student", tiny_pair[1], "--out", tmp_path / "a")
    assert_one_line_error(result, "wkl")
    result = mgsr_cli("distill", "--loss-option", "dac_colour=red", "--teacher", tiny_pair[0], "--student", tiny_pair[1], "--out", tmp_path / "b")
    assert_one_line_error(result, "dac_colour")


def test_static_sgo_from_correct_output_is_used(tiny_pair, tmp_path):
    runner = CliRunner()
    teacher, student = map(str, tiny_pair)
    generated = runner.invoke(app, ["generate", "--model", student, "--data", "dolly_train", "--limit", "4",
                                    "--max-new-tokens", "6", "--out", str(tmp_path / "gen")])
    assert generated.exit_code == 0, generated.output
    config = override(DistillConfig(), {**FAST, "teacher": teacher, "student": student, "limit": 4, "max_steps": 2,
                                        "sgo_policy": "static", "sgo_data": str(tmp_path / "gen")})
    lines = [line for line in metrics(run_distill(config, tmp_path / "run")) if "loss" in line]
    assert [line["source"] for line in lines] == ["static", "static"]


def test_training_state_survives_a_checkpoint_round_trip(tiny_pair, tmp_path):
    """An in-process --resume after a complete run's final checkpoint refuses (nothing left), and the
    checkpoint holds the SGO state."""
    config = override(DistillConfig(), {**FAST, "teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]), "max_steps": 2, "theta_init": 1.0})
    out = run_distill(config, tmp_path / "run")
    from mgsr_cli.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step-00000002"
    state = torch.load(next(checkpoint.glob("custom_checkpoint_1.pkl")), weights_only=False)
    assert state["step"] == 2 and len(state["sgo"].buffer) == 4 and state["sgo"].theta == 1.0
