"""Typed configuration: the dataclasses every stage takes, with their defaults, help texts and ranges.

A recipe is a YAML mapping whose keys are these fields (nested dataclasses as nested mappings).
Loading recipes, applying flags and checking values live in config_loading.py, so this module
reads as the schema alone: one field per knob, its default, its `--help` text and its range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
EVALUATION_SEEDS = (10, 20, 30, 40, 50)


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, **rules: float) -> Any:
    """A dataclass field with a help text (shown by `--help`) and range rules checked whenever a
    recipe or a flag sets it: ge / gt (at least / greater than), le / lt (at most / less than)."""
    metadata = {"help": text, "rules": rules}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _rule(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, **rules: float) -> Any:
    return _help("", default, factory, **rules)


@dataclass
class DataConfig:
    """How rows become prompts. Field names left empty are detected (instruction; input/context;
    output/response); a row with a ready `prompt_field` uses it as is."""

    prompt_field: str | None = _help("Field holding a ready prompt (used as is when present).", "prompt")
    instruction_field: str | None = _help("Instruction field; empty = detect 'instruction'.", None)
    input_field: str | None = _help("Input/context field; empty = detect 'input' or 'context'.", None)
    output_field: str | None = _help("Reference field; empty = detect 'output' or 'response'.", None)
    template: str = _help("Prompt template without input ({instruction}).", PROMPT_TEMPLATE)
    template_with_input: str = _help("Prompt template with input ({instruction}, {input}).", PROMPT_TEMPLATE_WITH_INPUT)
    max_prompt_length: int = _help("Longer prompts are dropped (and counted).", 256, ge=1)
    split: str = _help("Split of a hub data set.", "train")
    chat_template: Literal["auto", "on", "off"] = _help(
        "Render prompts with the tokenizer's chat template: auto = on for 'messages' rows, the papers' "
        "template for instruction rows (the shipped sets); on = every row as a chat; off = the papers' template.",
        "auto",
    )


@dataclass
class SamplingConfig:
    """Decoding of the papers by default: pure sampling at temperature 1, total length 512.

    temperature 0 is greedy decoding; top_k 0 and top_p 1 switch those filters off;
    max_new_tokens None fills each prompt up to max_length tokens.
    """

    temperature: float = _help("Sampling temperature; 0 = greedy.", 1.0, ge=0)
    top_p: float = _help("Nucleus mass; 1 = off.", 1.0, gt=0, le=1)
    top_k: int = _help("Top-k; 0 = off.", 0, ge=0)
    max_new_tokens: int | None = _help("New tokens per response; empty = up to max_length.", None, ge=1)
    max_length: int = _help("Prompt + response tokens at most.", 512, ge=2)


@dataclass
class ModelLoading:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class GenerateConfig:
    model: str = ""
    data: str = ""
    limit: int | None = _rule(None, ge=1)
    batch_size: int = _rule(8, ge=1)
    num_samples: int = _rule(1, ge=1)
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data_format: DataConfig = field(default_factory=DataConfig)
    loading: ModelLoading = field(default_factory=ModelLoading)


@dataclass
class EvaluateConfig:
    models: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(EVALUATION_SEEDS))
    limit: int | None = _rule(None, ge=1)
    batch_size: int = _rule(16, ge=1)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data_format: DataConfig = field(default_factory=DataConfig)
    loading: ModelLoading = field(default_factory=ModelLoading)


@dataclass
class ScrgOptions:
    """SCRG (method.md section 1): how the error position and the teacher's token are chosen, and
    how the student re-generates after it (`sampling`: decoding and token budget).

    rounds > 1 repeats the correction on the re-generated suffix (positions after the last j).
    """

    divergence: Literal["fkl", "rkl", "js"] = "fkl"
    teacher_token: Literal["sample", "argmax"] = "sample"
    rounds: int = _rule(1, ge=1)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class CorrectConfig:
    """The `correct` stage. The CLI starts `scrg.sampling` from the generation config recorded
    in the input's manifest."""

    teacher: str = ""
    student: str = ""
    batch_size: int = _rule(8, ge=1)
    seed: int = 0
    scrg: ScrgOptions = field(default_factory=ScrgOptions)
    loading: ModelLoading = field(default_factory=ModelLoading)


@dataclass
class LoraOptions:
    enabled: bool = _help("Train LoRA adapters on the student instead of all weights (needs peft).", False)
    r: int = _help("LoRA rank.", 16, ge=1)
    alpha: int = _help("LoRA alpha.", 64, gt=0)
    dropout: float = _help("LoRA dropout.", 0.1, ge=0, lt=1)
    target_modules: list[str] = _help("Module names to adapt; empty = peft's default for the architecture.", factory=list)
    export_adapter: bool = _help("Also save the trained adapter alone (peft format) in OUT/student/adapter.", False)


@dataclass
class DistillConfig:
    """Every knob of `mgsr distill`; recipes set them in YAML, flags override them.

    Defaults are the MGSR method of method.md (sections 4 and 7): L = sft + dac_kl + span,
    adaptive off-policy SGO revised by SCRG, AdamW lr 5e-4 (GPT-2 scale) with cosine decay.
    """

    teacher: str = _help("Teacher model: hub id or local directory.", "")
    student: str = _help("Student model: hub id or local directory.", "")
    data: str = _help("Training data (anything --data takes); ground truth for L_SFT.", "dolly_train")
    dev_data: str | None = _help("Validation data; empty switches validation off.", "dolly_dev")
    limit: int | None = _help("Use only the first N training examples.", None, ge=1)
    dev_limit: int | None = _help("Use only the first N validation examples (loss).", 200, ge=1)
    data_format: DataConfig = _help("How rows become prompts.", factory=DataConfig)
    max_length: int = _help("Prompt + response tokens at most (longer responses are cut).", 512, ge=2)

    loss: str = _help("Loss spec: a registry name or a weighted sum (e.g. 'sft=1,dac_kl=1,span=1').", "sft=1,dac_kl=1,span=1")
    loss_options: dict = _help("Options of the loss terms (dac_*, span_relation, rank_on, ...), as KEY=VALUE.", factory=dict)
    temperature: float = _help("Distillation temperature (divides teacher and student logits; not sft).", 1.0, gt=0)
    span_prior: str = _help("How spans are found: phrases | words | fixed:N | spacy.", "phrases")
    span_pairs: Literal["adjacent", "all"] = _help("Token pairs inside a span the span loss compares.", "adjacent")
    sft_on_sgo: bool = _help("Compute sft on the student-generated batch instead of the ground truth (SeqKD).", False)
    chat_turns: Literal["last", "all"] = _help(
        "Chat data: train the final assistant turn, or every assistant turn (the others masked as prompt).", "last"
    )
    # 128: on 2 CPU cores at V = 50257, kd 0.54-0.57 s/step at 720 MiB peak against 0.61-0.69 s
    # at 950 MiB with 512 (mgsr 1.35-1.47 s against 1.59-1.79); likely because a [128, V] float32
    # chunk (26 MB) is under glibc's largest mmap threshold (32 MiB), so its memory is reused
    # instead of faulted in again for every chunk.
    chunk_size: int = _help("Response positions projected through the output layer at a time.", 128, ge=1)

    sgo_policy: str = _help(
        "Where distillation batches come from: none | on_policy | mixed:LAMBDA | adaptive_off_policy | static | once.",
        "adaptive_off_policy",
    )
    sgo_model: Literal["student", "teacher", "both"] = _help("Who samples the generated outputs.", "student")
    sgo_data: str | None = _help("For static: a generate/correct output directory holding the SGO.", None)
    sgo_sampling: SamplingConfig = _help("Sampling of generated outputs during training.", factory=SamplingConfig)
    scrg: bool = _help("Revise generated outputs with SCRG before training on them.", True)
    scrg_divergence: Literal["fkl", "rkl", "js"] = _help("SCRG token divergence d_i.", "fkl")
    scrg_teacher_token: Literal["sample", "argmax"] = _help("SCRG teacher proposal at the error position.", "sample")
    scrg_rounds: int = _help("SCRG corrections per sequence.", 1, ge=1)
    replay_capacity: int = _help("Adaptive off-policy replay buffer size (sequences).", 1000, ge=1)
    theta_init: float = _help("Adaptive off-policy initial SGO probability θ.", 0.0, ge=0, le=1)
    theta_step: float = _help("θ increase when the validation loss rises.", 0.1, ge=0, le=1)
    theta_threshold: float = _help("Validation-loss rise that raises θ.", 0.1, ge=0)

    epochs: int | None = _help("Training epochs; empty = 20 below 1B student parameters, 10 above (method.md §7).", None, ge=1)
    max_steps: int | None = _help("Stop after N optimizer steps (overrides epochs).", None, ge=1)
    batch_size: int = _help("Sequences per optimizer step (global, over all processes).", 8, ge=1)
    grad_accum: int = _help("Micro-batches per optimizer step (batch_size must divide evenly).", 1, ge=1)
    lr: float | None = _help("Peak learning rate; empty = 5e-4 below 1B student parameters, 5e-5 above.", None, gt=0)
    min_lr: float = _help("Cosine schedule floor.", 1e-7, ge=0)
    warmup_steps: int = _help("Linear warmup steps.", 0, ge=0)
    weight_decay: float = _help("AdamW weight decay.", 0.01, ge=0)
    dac_lr: float = _help("Learning rate of DAC-KL's sub-network (own param group).", 1e-4, gt=0)
    grad_clip: float = _help("Gradient norm clip (0 = off).", 1.0, ge=0)
    disable_dropout: bool = _help("Switch dropout off in the student (deterministic steps, as TRL's GKD).", True)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", False)
    lora: LoraOptions = _help("LoRA on the student.", factory=LoraOptions)

    eval_every: int = _help("Validate every N steps (0 = only at the end).", 200, ge=0)
    eval_rouge: bool = _help("Also sample on the dev set and score ROUGE-L; the best step is kept.", False)
    eval_rouge_examples: int = _help("Dev prompts sampled for validation ROUGE-L.", 1000, ge=1)
    eval_sampling: SamplingConfig = _help("Sampling for validation ROUGE-L.", factory=SamplingConfig)
    save_every: int = _help("Checkpoint every N steps (0 = only at the end / on interrupt).", 200, ge=0)
    keep_checkpoints: int = _help("Checkpoints kept on disk.", 2, ge=1)
    log_every: int = _help("Write metrics every N steps.", 10, ge=1)
    seed: int = _help("Seed of data order, sampling and initialisation.", 42)

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help("Training precision (autocast over float32 weights): auto = bf16 on CUDA, fp32 on CPU; bfloat16 autocasts on the CPU too; float16 needs CUDA.", "auto")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help("Teacher weights' precision.", "auto")
    device: str = _help("auto | cpu | cuda (under accelerate launch each process takes its own GPU).", "auto")
    trust_remote_code: bool = _help("Allow model code from the hub.", False)
