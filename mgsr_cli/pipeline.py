"""The main job on the embedded default: every stage, end to end, on a tiny GPT-2 pair.

build the pair -> SFT the teacher (and the student's "init" checkpoint, as the papers do) on
shipped Dolly -> `generate` student outputs -> `correct` them with SCRG -> `distill` with the
MGSR objective on those revised outputs -> `evaluate` student before, student after and teacher.
Every intermediate artifact stays under the output directory.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from mgsr_cli.artifacts import is_complete
from mgsr_cli.config import DistillConfig, EvaluateConfig, GenerateConfig, SamplingConfig
from mgsr_cli.config_loading import load_recipe, override, recipe_path
from mgsr_cli.console import console

log = logging.getLogger(__name__)


@dataclass
class DemoSize:
    """How much work each stage does; the defaults took 8 min 11 s on 2 CPU cores (mgsr demo, 2026-11-23)."""

    teacher_sft_steps: int = 200
    student_sft_steps: int = 100
    train_examples: int = 512
    distill_steps: int = 60
    response_tokens: int = 48
    eval_examples: int = 50
    eval_seeds: tuple[int, ...] = (10, 20)


# `mgsr demo --quick`: a few steps per stage, to check the pipeline, not the results
QUICK_DEMO = DemoSize(teacher_sft_steps=4, student_sft_steps=2, train_examples=16, distill_steps=3, response_tokens=8, eval_examples=4)


def _stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def _distill(config: DistillConfig, out: Path, overwrite: bool) -> Path:
    from mgsr_cli.checkpoints import latest_checkpoint
    from mgsr_cli.train import run_distill

    if overwrite or not is_complete(out):
        run_distill(config, out, resume=not overwrite and latest_checkpoint(out) is not None, overwrite=overwrite)
    return out


def _sft(student: Path, out: Path, steps: int, overwrite: bool) -> Path:
    config = override(
        load_recipe(DistillConfig, recipe_path("sft")),
        {
            "teacher": str(student),
            "student": str(student),
            "limit": 4000,
            "dev_limit": 64,
            "max_length": 320,
            "max_steps": steps,
            "lr": 1e-3,
            "eval_every": 0,
            "save_every": 0,
            "log_every": 10,
        },
    )
    return _distill(config, out, overwrite) / "student"


def run_demo(out: Path, size: DemoSize = DemoSize(), overwrite: bool = False) -> Path:
    """Run the whole pipeline under `out` and return the evaluation directory."""
    from mgsr_cli.evaluate import run_evaluate
    from mgsr_cli.generate import run_generate
    from mgsr_cli.models import build_tiny_pair
    from mgsr_cli.correct import correct_config, run_correct

    _stage("1/6 build the tiny GPT-2 teacher (4 layers) and student (2 layers)")
    models = out / "models"
    if overwrite or not (models / "student" / "tokenizer.json").exists():
        build_tiny_pair(models)
    teacher_init, student_random = models / "teacher", models / "student"
    _stage("2/6 SFT the teacher and the student's init checkpoint on Dolly")
    teacher = _sft(teacher_init, out / "teacher-sft", size.teacher_sft_steps, overwrite)
    student = _sft(student_random, out / "student-sft", size.student_sft_steps, overwrite)
    sampling = SamplingConfig(max_new_tokens=size.response_tokens)

    _stage("3/6 generate: student outputs for the training prompts")
    generated = out / "generate"
    if overwrite or not is_complete(generated):
        config = GenerateConfig(model=str(student), data="dolly_train", limit=size.train_examples, batch_size=16, sampling=sampling)
        run_generate(config, generated, overwrite)
    _stage("4/6 correct: SCRG revises each output where teacher and student disagree most")
    corrected = out / "correct"
    if overwrite or not is_complete(corrected):
        run_correct(correct_config(generated, str(teacher), str(student), {"batch_size": 16}), generated, corrected, overwrite)

    _stage("5/6 distill: MGSR (sft + dac_kl + span) on the SCRG-revised outputs")
    recipe = override(
        load_recipe(DistillConfig, recipe_path("tiny-gpt2")),
        {
            "teacher": str(teacher),
            "student": str(student),
            "limit": size.train_examples,
            "max_steps": size.distill_steps,
            "sgo_policy": "static",
            "sgo_data": str(corrected),
            "eval_every": max(size.distill_steps // 3, 1),
            "save_every": max(size.distill_steps // 3, 1),
        },
    )
    distilled = _distill(recipe, out / "distill", overwrite)

    _stage("6/6 evaluate: ROUGE-L of the student before and after distillation, and of the teacher")
    evaluation = EvaluateConfig(
        models=[f"student-before={student}", f"student-after={distilled / 'student'}", f"teacher={teacher}"],
        data=["dolly", "self_inst"],
        seeds=list(size.eval_seeds),
        limit=size.eval_examples,
        batch_size=25,
        sampling=dataclasses.replace(sampling, max_new_tokens=size.response_tokens * 2),
    )
    return run_evaluate(evaluation, out / "evaluate", overwrite=True)  # cheap, and always reflects the models above
