"""Typed configuration: dataclasses shared by every stage, loaded from YAML recipes and flags.

A recipe is a YAML mapping whose keys are the dataclass fields (nested dataclasses as nested
mappings). Unknown keys and values outside a field's allowed choices are one-line errors.
Flags override recipe values; `to_dict` gives the fully resolved config for manifests.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mgsr_cli.errors import UsageError

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


@dataclass
class DataConfig:
    """How rows become prompts. Field names left empty are detected (instruction; input/context;
    output/response); a row with a ready `prompt_field` uses it as is."""

    prompt_field: str | None = "prompt"
    instruction_field: str | None = None
    input_field: str | None = None
    output_field: str | None = None
    template: str = PROMPT_TEMPLATE
    template_with_input: str = PROMPT_TEMPLATE_WITH_INPUT
    max_prompt_length: int = 256
    split: str = "train"


@dataclass
class SamplingConfig:
    """Decoding of the papers by default: pure sampling at temperature 1, total length 512.

    temperature 0 is greedy decoding; top_k 0 and top_p 1 switch those filters off;
    max_new_tokens None fills each prompt up to max_length tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    max_length: int = 512


@dataclass
class ModelLoading:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class GenerateConfig:
    model: str = ""
    data: str = ""
    limit: int | None = None
    batch_size: int = 8
    num_samples: int = 1
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data_format: DataConfig = field(default_factory=DataConfig)
    loading: ModelLoading = field(default_factory=ModelLoading)


@dataclass
class EvaluateConfig:
    models: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(EVALUATION_SEEDS))
    limit: int | None = None
    batch_size: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data_format: DataConfig = field(default_factory=DataConfig)
    loading: ModelLoading = field(default_factory=ModelLoading)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and Literal choices."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{where}: unknown key '{key}'{hint}")
        values[key] = _coerce(value, hints[key], f"{where}: {key}")
    return cls(**values)


def override(config: Any, changes: dict, where: str = "flags") -> Any:
    """A copy of `config` with `changes` applied; nested dataclasses take nested mappings."""
    hints = typing.get_type_hints(type(config))
    names = {item.name for item in dataclasses.fields(config)}
    updates = {}
    for key, value in changes.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{where}: unknown key '{key}'{hint}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[key] = override(current, value, f"{where}: {key}")
        else:
            updates[key] = _coerce(value, hints[key], f"{where}: {key}")
    return dataclasses.replace(config, **updates)


def load_recipe(cls: type, path: Path) -> Any:
    """A config of type `cls` from a YAML recipe file."""
    import yaml

    if not Path(path).exists():
        raise UsageError(f"recipe '{path}' not found")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"recipe '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    return from_dict(cls, data, f"recipe {path}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, converting what YAML and flags spell loosely."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, option, where)
            except UsageError as error:
                errors.append(str(error))
        raise UsageError(errors[0])
    if origin is Literal:
        if value not in args:
            raise UsageError(f"{where}: '{value}' is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [item for item in str(value).split(",") if item]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, args[0], where) for item in value] if args else list(value)
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else from_dict(annotation, value, where)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected a number, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value
