"""Recipe loading, flag overrides and validation of the typed configs of config.py.

Unknown keys and values outside a field's type, choices or range are one-line errors that name
the culprit as the user wrote it (a flag or a recipe key); `check` adds the rules across fields.
`to_dict` gives the fully resolved config for manifests. Kept apart from the dataclasses so the
schema reads on its own and this machinery has one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from mgsr_cli.config import DistillConfig, EvaluateConfig, GenerateConfig, ModelLoading
from mgsr_cli.errors import UsageError

RULE_TEXT = {"ge": ("at least", lambda v, b: v >= b), "gt": ("greater than", lambda v, b: v > b),
             "le": ("at most", lambda v, b: v <= b), "lt": ("less than", lambda v, b: v < b)}


def rules_text(item: dataclasses.Field) -> str:
    """The range of a field for help texts, e.g. '>= 1'."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{signs[name]} {bound:g}" for name, bound in item.metadata.get("rules", {}).items())


def _check_rules(value: Any, item: dataclasses.Field, where: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, bound in item.metadata.get("rules", {}).items():
        text, holds = RULE_TEXT[name]
        if not holds(value, bound):
            raise UsageError(f"{where}: must be {text} {bound:g}, got {value!r}")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict, where: str, path: tuple[str, ...] = ()) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types, choices, ranges and cross-field rules."""
    if not isinstance(data, dict):
        raise UsageError(f"{culprit(where, path)}: expected a mapping, got {type(data).__name__}")
    fields = _fields(cls, data, where, path)
    values = {key: _checked(value, fields[key], cls, where, (*path, key)) for key, value in data.items()}
    return check(cls(**values), where, path)


def override(config: Any, changes: dict, where: str = "flags", path: tuple[str, ...] = ()) -> Any:
    """A copy of `config` with `changes` applied; nested dataclasses take nested mappings.

    `where` names the source in errors: "flags" names a flag `--a-b` by its whole key path (the
    distill flags), "flag" as `--b` by its last key (the generate/evaluate/correct flags); any
    other text is a recipe or file, whose keys are named as written.
    """
    fields = _fields(type(config), changes, where, path)
    updates = {}
    for key, value in changes.items():
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[key] = override(current, value, where, (*path, key))
        else:
            updates[key] = _checked(value, fields[key], type(config), where, (*path, key))
    return check(dataclasses.replace(config, **updates), where, path)


# distill flags whose names are not their key paths joined by '-' (flags.py builds them from this):
# the first name is the one --help shows and errors name, the others are older spellings still taken.
# --max-prompt-length is the spelling generate and evaluate use for the same setting.
FLAG_NAMES = {
    ("loss_options",): ("--loss-option",),
    ("data_format", "chat_template"): ("--chat-template",),
    ("data_format", "max_prompt_length"): ("--max-prompt-length", "--data-format-max-prompt-length"),
}


def culprit(where: str, path: tuple[str, ...]) -> str:
    """The flag or key an error names: '--top-p' for flags, 'recipe r.yaml: lr' for recipes."""
    if where == "flags":
        return FLAG_NAMES.get(tuple(path), ("--" + "-".join(path).replace("_", "-"),))[0]
    if where == "flag":
        return "--" + path[-1].replace("_", "-")
    return f"{where}: {'.'.join(path)}" if path else where


def _fields(cls: type, data: dict, where: str, path: tuple[str, ...]) -> dict[str, dataclasses.Field]:
    fields = {item.name: item for item in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{where if where not in ('flags', 'flag') else 'flags'}: unknown key '{'.'.join((*path, str(key)))}'{hint}")
    return fields


def _checked(value: Any, item: dataclasses.Field, cls: type, where: str, path: tuple[str, ...]) -> Any:
    annotation = typing.get_type_hints(cls)[item.name]
    if dataclasses.is_dataclass(annotation) and not isinstance(value, annotation):
        return from_dict(annotation, value, where, path)
    coerced = _coerce(value, annotation, culprit(where, path))
    _check_rules(coerced, item, culprit(where, path))
    return coerced


def check(config: Any, where: str = "config", path: tuple[str, ...] = ()) -> Any:
    """Rules across fields (and the device), named as the user wrote them; returns `config`."""

    def name(dotted: str) -> str:
        return culprit(where, (*path, *dotted.split(".")))
    if isinstance(config, (GenerateConfig, EvaluateConfig)):
        _check_lengths(config.sampling.max_length, config.data_format.max_prompt_length, name("sampling.max_length"), name("data_format.max_prompt_length"))
    if isinstance(config, DistillConfig):
        _check_lengths(config.max_length, config.data_format.max_prompt_length, name("max_length"), name("data_format.max_prompt_length"))
        if config.batch_size % config.grad_accum:
            raise UsageError(f"{name('batch_size')} {config.batch_size} does not split into {name('grad_accum')} {config.grad_accum} micro-batches")
        check_device(config.device, name("device"))
        if config.chat_turns == "all" and config.data_format.chat_template == "off":
            raise UsageError(f"{name('chat_turns')} all trains assistant turns, which only the chat template renders; drop {name('data_format.chat_template')} off")
    if isinstance(config, EvaluateConfig):
        if not config.seeds:
            raise UsageError(f"{name('seeds')}: give at least one seed, e.g. 10,20,30,40,50")
        repeated = sorted({seed for seed in config.seeds if config.seeds.count(seed) > 1})
        if repeated:
            raise UsageError(f"{name('seeds')}: seeds must be distinct, {', '.join(map(str, repeated))} is given twice")
    if isinstance(config, ModelLoading):
        check_device(config.device, name("device"))
    return config


def _check_lengths(max_length: int, max_prompt_length: int, length_name: str, prompt_name: str) -> None:
    if max_length <= max_prompt_length:
        raise UsageError(
            f"{length_name} {max_length} must exceed {prompt_name} {max_prompt_length}: a prompt of that length leaves no room for a response"
        )


def check_device(name: str, culprit: str = "--device") -> None:
    """auto, cpu, cuda[:N] (when CUDA and that GPU exist) or mps (when present); nothing else runs a model."""
    if name in ("auto", "cpu"):
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{culprit}: unknown device '{name}'; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{culprit}: '{name}' asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{culprit}: '{name}' asked for, but this machine has {torch.cuda.device_count()} GPUs")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{culprit}: '{name}' asked for, but MPS is not available on this machine")
    else:
        raise UsageError(f"{culprit}: mgsr cannot run models on '{name}'; choose auto, cpu, cuda or cuda:N")


def recipe_path(name: str | Path) -> Path:
    """A shipped recipe by name (`mgsr`, `kd`, ...) always; a YAML file only when `name` is a path to one."""
    from importlib import resources

    shipped_dir = resources.files("mgsr_cli.recipes")
    shipped = shipped_dir / f"{name}.yaml"
    if "/" not in str(name) and "\\" not in str(name) and shipped.is_file():
        return Path(str(shipped))
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        raise UsageError(f"--recipe '{name}' is a directory; give a shipped recipe name or a YAML file")
    names = sorted(entry.name[:-5] for entry in shipped_dir.iterdir() if entry.name.endswith(".yaml"))
    if candidate.suffix in (".yaml", ".yml") or "/" in str(name):
        raise UsageError(f"recipe '{name}' not found")
    raise UsageError(f"unknown recipe '{name}': give a YAML path or one of {', '.join(names)}")


def load_recipe(cls: type, path: Path) -> Any:
    """A config of type `cls` from a YAML recipe file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe '{path}' not found" if not path.exists() else f"recipe '{path}' is not a file")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"recipe '{path}' is not UTF-8 text (a YAML recipe must be UTF-8)") from None
    except yaml.YAMLError as error:
        raise UsageError(f"recipe '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    return from_dict(cls, {} if data is None else data, f"recipe {path}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, converting what YAML and flags spell loosely."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
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
    if annotation is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping of KEY: VALUE, got {value!r}")
        return dict(value)
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
