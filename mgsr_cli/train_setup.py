"""What `distill` sets up before its first step: objectives, precision, tokenizer, models, optimizer
groups and the learning-rate schedule (method.md sections 2 and 7)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mgsr_cli.chat import template_sha256
from mgsr_cli.config import DistillConfig
from mgsr_cli.errors import UsageError
from mgsr_cli.lora import add_lora
from mgsr_cli.models import check_same_vocabulary, load_model, load_tokenizer, resolve_dtype

ONE_BILLION = 1_000_000_000


@dataclass
class Objectives:
    """The loss spec split by the batch each term reads: `sft` on the ground truth (unless
    sft_on_sgo), the distillation terms on the batch the SGO scheduler picks."""

    sft: nn.Module | None
    distill: nn.Module | None
    needs_teacher: bool

    def combined(self) -> nn.Module:
        from mgsr_cli.losses import Objective

        present = [objective for objective in (self.sft, self.distill) if objective is not None]
        if len(present) == 1:
            return present[0]
        return Objective(self.sft.weighted_terms + self.distill.weighted_terms, temperature=self.distill.temperature)

    def as_module_dict(self) -> nn.ModuleDict:
        """The objectives that exist, by name: their learnable parts train and checkpoint with the student."""
        named = (("sft", self.sft), ("distill", self.distill))
        return nn.ModuleDict({name: objective for name, objective in named if objective is not None})


def build_objectives(config: DistillConfig) -> Objectives:
    from mgsr_cli.losses import build_loss, parse_spec

    try:
        specs = parse_spec(config.loss)

        def build(items) -> nn.Module | None:
            if not items:
                return None
            text = ",".join(f"{item.name}{':' + item.param if item.param else ''}={item.weight:g}" for item in items)
            return build_loss(text, temperature=config.temperature, **config.loss_options)

        sft = build([item for item in specs if item.name == "sft"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the DAC sub-network's initial weights: part of the run's seed
            distill = build([item for item in specs if item.name != "sft"])
        build_loss(config.loss, temperature=config.temperature, **config.loss_options)  # validates every option
    except ValueError as error:
        raise UsageError(f"loss '{config.loss}': {error}") from None
    return Objectives(sft=sft, distill=distill, needs_teacher=distill is not None)


def mixed_precision(dtype_name: str, cpu: bool) -> str:
    """`--dtype` as Accelerate's autocast over fp32 master weights: bf16 and fp16 on CUDA, bf16 on
    the CPU too (torch's CPU autocast); fp16 on the CPU has no autocast and is refused."""
    dtype = resolve_dtype(dtype_name, torch.device("cpu" if cpu else "cuda"))
    if cpu and dtype == torch.float16:
        raise UsageError("--dtype float16 needs CUDA (the CPU autocasts to bfloat16 only): use --dtype bfloat16 or float32")
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def load_shared_tokenizer(config: DistillConfig) -> tuple[object, str | None]:
    """(the student's tokenizer, the sha256 of the teacher's chat template); refused unless the
    teacher's tokenizer has the same vocabulary."""
    if not config.teacher or not config.student:
        raise UsageError("distill needs --teacher and --student")
    tokenizer = load_tokenizer(config.student, config.trust_remote_code)
    teacher_tokenizer = load_tokenizer(config.teacher, config.trust_remote_code)
    check_same_vocabulary(teacher_tokenizer, tokenizer)
    return tokenizer, template_sha256(teacher_tokenizer)


def load_models(config: DistillConfig, device: torch.device, with_teacher: bool) -> tuple[nn.Module, nn.Module | None]:
    """(student in float32, frozen teacher or None), each checked against max_length (the rest is preflight's)."""
    student = load_model(config.student, torch.float32, device, config.trust_remote_code)
    teacher = None
    if with_teacher:
        teacher = load_model(config.teacher, resolve_dtype(config.teacher_dtype, device), device, config.trust_remote_code)
        teacher.requires_grad_(False)
    for model, name in ((student, "student"), (teacher, "teacher")):
        if model is not None:
            check_lengths(model, name, config.max_length)
    return student, teacher


def check_lengths(model, name: str, max_length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and max_length > limit:
        raise UsageError(f"max_length {max_length} exceeds {name}'s {limit} positions; lower --max-length")


def prepare_student(student: nn.Module, config: DistillConfig) -> nn.Module:
    """Dropout off on request, gradient checkpointing, LoRA adapters; then train mode."""
    if config.disable_dropout:
        for module in student.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if config.gradient_checkpointing:
        # transformers 5.x renamed it activation_checkpointing_enable (the old name warns, gone in v6).
        enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        enable()
        student.config.use_cache = False
    if config.lora.enabled:
        add_lora(student, config)
    return student.train()


def resolve_schedule(config: DistillConfig, student: nn.Module, examples: int) -> tuple[float, int]:
    """(learning rate, total optimizer steps), filling method.md section 7's size-dependent defaults."""
    parameters = sum(parameter.numel() for parameter in student.parameters())
    lr = config.lr if config.lr is not None else (5e-4 if parameters < ONE_BILLION else 5e-5)
    if config.max_steps is not None:
        return lr, config.max_steps
    epochs = config.epochs if config.epochs is not None else (20 if parameters < ONE_BILLION else 10)
    return lr, epochs * math.ceil(examples / config.batch_size)


def param_groups(student: nn.Module, objectives: nn.ModuleDict, config: DistillConfig, lr: float) -> list[dict]:
    """Weight decay on matrices only; DAC-KL's sub-network in its own group (method.md §2)."""
    decay, no_decay = [], []
    for parameter in student.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    sub_network = [parameter for parameter in objectives.parameters() if parameter.requires_grad]
    if sub_network:
        groups.append({"params": sub_network, "lr": config.dac_lr, "weight_decay": 0.0})
    return [group for group in groups if group["params"]]


def cosine_schedule(optimizer, lr: float, min_lr: float, warmup: int, total: int):
    """Linear warmup, then cosine decay from lr to min_lr (the papers' schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
