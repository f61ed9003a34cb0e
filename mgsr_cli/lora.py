"""LoRA (peft) for `distill`: adapters injected into the student, and the merged student exported.

peft injects the adapters into the student in place (no PeftModel wrapper survives training), so
export rebuilds a PeftModel around freshly loaded base weights, loads the trained adapters into
it and merges them; every adapter tensor must land there, or the export would be the untouched base.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from mgsr_cli.config import DistillConfig
from mgsr_cli.errors import UsageError
from mgsr_cli.models import load_model

# The state-dict prefix a PeftModel built around a fresh base expects (the in-place adapters lack it).
PEFT_MODEL_PREFIX = "base_model.model."


def add_lora(student: nn.Module, config: DistillConfig) -> None:
    """Injects adapters into `student` in place and freezes the rest."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("lora.enabled needs peft: pip install 'mgsr[lora]'") from None
    with_lora(student, config)


def lora_config(config: DistillConfig, model: nn.Module):
    """LoRA dropout follows `disable_dropout` like every other dropout of the student.
    fan_in_fan_out is set for models whose linear layers are transformers' Conv1D (GPT-2's
    family stores their weights transposed); peft would otherwise warn and set it itself."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=0.0 if config.disable_dropout else config.lora.dropout,
        target_modules=config.lora.target_modules or None,
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
        task_type="CAUSAL_LM",
    )


def with_lora(model: nn.Module, config: DistillConfig):
    """get_peft_model, quietly: peft itself still calls transformers 5.x's deprecated is_gradient_checkpointing."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config(config, model))


def lora_adapted_copy(student: nn.Module, config: DistillConfig, state: dict):
    """A PeftModel around freshly loaded base weights carrying the trained adapters (from `state`,
    the student's whole tensors); refuses when any trained adapter tensor fails to land (a silent
    drop would export the untouched base)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    trained = get_peft_model_state_dict(student, state_dict=state)
    adapters = {PEFT_MODEL_PREFIX + name: tensor.detach().cpu() for name, tensor in trained.items()}
    base = load_model(config.student, torch.float32, torch.device("cpu"), config.trust_remote_code)
    wrapped = with_lora(base, config)
    result = set_peft_model_state_dict(wrapped, adapters)
    expected = set(get_peft_model_state_dict(wrapped))
    if result.unexpected_keys or expected != set(adapters):
        dropped = sorted(set(result.unexpected_keys) | (expected ^ set(adapters)))
        raise RuntimeError(f"LoRA export: {len(dropped)} adapter tensors do not match the base model (first: {dropped[0]})")
    return wrapped


def merged_student(student: nn.Module, config: DistillConfig, state: dict, adapter_dir: Path | None) -> nn.Module:
    """The base with the trained adapters (from `state`) merged in; the adapters alone also go to
    `adapter_dir` if given."""
    adapted = lora_adapted_copy(student, config, state)
    if adapter_dir is not None:
        adapted.save_pretrained(str(adapter_dir), safe_serialization=True)
    return adapted.merge_and_unload()
