"""The lab study's scales: every knob `experiments/lab.py` sets, per profile (cpu, gpu, --quick).

Only these knobs differ between the profiles, and the distill knobs are applied identically to
every recipe: they set the scale of the study, not the method.
"""

from __future__ import annotations

from dataclasses import dataclass

from mgsr_cli.models import TinySize

RECIPES = ("sft", "kd", "seqkd", "rkl", "js", "tvd", "gkd", "distillm", "akl", "rlkd", "mgsr", "mgsr_no_scrg", "mgsr_fkl", "mgsr_no_span")
EVAL_SETS = ("dolly", "self_inst", "vicuna", "sinst", "uinst")


@dataclass(frozen=True)
class LabScale:
    """Every knob the lab sets. The full study and --quick differ only here; the distill knobs
    are applied identically to every recipe (they set the scale, not the method)."""

    name: str  # "full" | "quick"
    vocab_size: int
    tokenizer_examples: int | None  # Dolly train examples the BPE is trained on (None = all)
    teacher: TinySize
    student: TinySize
    n_positions: int
    sft_examples: int
    teacher_sft_steps: int
    student_sft_steps: int
    sft_lr: float
    batch_size: int
    max_length: int  # training sequences: prompt + response tokens at most
    max_prompt_length: int  # training prompts longer than this are dropped (evaluation keeps 256)
    distill_steps: int
    validations: int  # dev-loss validations per distill run (they drive the adaptive θ)
    dev_examples: int
    response_tokens: int  # new tokens of SGO during training and of responses at evaluation
    theta_init: float
    train_seeds: tuple[int, ...]
    eval_examples: int
    eval_seeds: tuple[int, ...]
    recipes: tuple[str, ...] = RECIPES
    device: str = "cpu"

    def distill_overrides(self, seed: int) -> dict:
        """The scale knobs every recipe gets (besides teacher, student and seed)."""
        return {
            "limit": self.distill_steps * self.batch_size,
            "dev_limit": self.dev_examples,
            "max_length": self.max_length,
            "data_format": {"max_prompt_length": self.max_prompt_length},
            "sgo_sampling": {"max_new_tokens": self.response_tokens},
            "max_steps": self.distill_steps,
            "batch_size": self.batch_size,
            "theta_init": self.theta_init,
            "eval_every": max(self.distill_steps // self.validations, 1),
            "save_every": 0,
            "log_every": max(self.distill_steps // 20, 1),
            "seed": seed,
            "device": self.device,
        }


# Sized for 2 idle cores (about 40 minutes). ROUGE-L of sampled text barely moves until the dev
# loss falls under ~6.3 nats (an init at 80 or 150 SFT steps scores 2.8-2.9 alike), so the
# teacher-init gap comes from training the teacher further: 500 steps at lr 1e-3 left it 0.58
# ahead, 700 at 2e-3 0.53 (1.7x a method's CI half-width), 2000 at 2e-3 (dev loss 5.56) 0.99
# (3.1x). 150 distillation steps (60 before) so the methods move further from the init; three
# training seeds, so the paired bootstrap also resamples training noise, and two evaluation seeds.
FULL = LabScale(
    name="cpu",
    vocab_size=4096,
    tokenizer_examples=None,
    teacher=TinySize(n_layer=4, n_embd=192, n_head=4),
    student=TinySize(n_layer=2, n_embd=128, n_head=2),
    n_positions=512,
    sft_examples=8000,
    teacher_sft_steps=2000,
    student_sft_steps=100,
    sft_lr=2e-3,
    batch_size=8,
    max_length=192,
    max_prompt_length=128,
    distill_steps=150,
    validations=3,
    dev_examples=32,
    response_tokens=48,
    theta_init=0.5,
    train_seeds=(1, 2, 3),
    eval_examples=100,
    eval_seeds=(10, 20),
)

# About 8 minutes on one H100-class GPU by an estimate from the CPU timings (never run: no GPU was
# available when it was written): a 30M / 5.4M GPT-2 pair, 2 training seeds, 200 examples per set.
GPU = LabScale(
    name="gpu",
    vocab_size=8192,
    tokenizer_examples=None,
    teacher=TinySize(n_layer=8, n_embd=512, n_head=8),
    student=TinySize(n_layer=4, n_embd=256, n_head=4),
    n_positions=512,
    sft_examples=14000,
    teacher_sft_steps=2000,
    student_sft_steps=300,
    sft_lr=1e-3,
    batch_size=32,
    max_length=256,
    max_prompt_length=128,
    distill_steps=150,
    validations=3,
    dev_examples=128,
    response_tokens=128,
    theta_init=0.5,
    train_seeds=(1, 2),
    eval_examples=200,
    eval_seeds=(10, 20),
    device="cuda",
)
SCALES = {"cpu": FULL, "gpu": GPU}

QUICK = LabScale(
    name="quick",
    vocab_size=512,
    tokenizer_examples=500,
    teacher=TinySize(n_layer=2, n_embd=32, n_head=2),
    student=TinySize(n_layer=1, n_embd=16, n_head=1),
    n_positions=512,
    sft_examples=16,
    teacher_sft_steps=2,
    student_sft_steps=2,
    sft_lr=1e-3,
    batch_size=2,
    max_length=96,
    max_prompt_length=64,
    distill_steps=2,
    validations=1,
    dev_examples=2,
    response_tokens=6,
    theta_init=0.5,
    train_seeds=(1,),
    eval_examples=4,
    eval_seeds=(10,),
)
