"""Command-line flags generated from a config dataclass: every recipe key is also a flag.

`distill_command(body)` returns a function whose signature Typer reads: one option per
DistillConfig field (nested fields as `--parent-child`), all defaulting to None so that only
the flags a user actually gives override the recipe.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import typer

from mgsr_cli.config import DistillConfig
from mgsr_cli.config_loading import FLAG_NAMES, rules_text

# Flags whose names differ from the field names, for the command-line contract (primary name first).
RENAMED = {"__".join(path): names for path, names in FLAG_NAMES.items()}
FIRST = ("teacher", "student")


def _field_parameters(cls: type, prefix: str = "", defaults: Any = None) -> list[inspect.Parameter]:
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    parameters = []
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        default = getattr(defaults, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            parameters += _field_parameters(hints[field.name], name + "__", default)
            continue
        flags = RENAMED.get(name, ("--" + name.replace("__", "-").replace("_", "-"),))
        help_text = field.metadata.get("help", "")
        if hints[field.name] is dict:
            option = typer.Option(None, *flags, help=help_text + " Repeat for several.", show_default=False)
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[list[str]]))
            continue
        shown = "" if default in ("", None, []) else f" [default: {default}]"
        shown += f" [{rules_text(field)}]" if rules_text(field) else ""
        kind = _flag_type(hints[field.name])
        if kind is bool:
            option = typer.Option(None, *(f"{flag}/{flag.replace('--', '--no-', 1)}" for flag in flags), help=help_text + shown, show_default=False)
            annotation: Any = Optional[bool]
        elif isinstance(kind, tuple):
            option = typer.Option(None, *flags, help=help_text + shown, show_default=False)
            annotation = Optional[Literal[kind]]
        else:
            option = typer.Option(None, *flags, help=help_text + shown, show_default=False)
            annotation = Optional[kind]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return parameters


def _flag_type(annotation: Any) -> Any:
    """The Click type of a field's flag: int, float, bool, a tuple of choices, else str.

    Optional numbers stay numbers (leave the flag out for the recipe's or the default value).
    """
    arguments = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(arguments) == 1:
        return arguments[0] if arguments[0] in (int, float) else str
    return annotation if annotation in (bool, int, float) else str


def distill_command(body: Callable[..., None]) -> Callable[..., None]:
    """Wrap `body(**flags)` with a signature of --out, --recipe, --resume, --overwrite and every config field."""
    fields = _field_parameters(DistillConfig)
    fields.sort(key=lambda parameter: (parameter.name not in FIRST, FIRST.index(parameter.name) if parameter.name in FIRST else 0))
    fixed = [
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(..., "--out", help="Output directory: student/, metrics.jsonl, loss_curve.png, checkpoints/.")),
        inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--recipe", help="A shipped recipe name (mgsr, kd, distillm, ...) or a YAML file.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--resume", help="Continue an interrupted run in --out from its last checkpoint.")),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--overwrite", help="Replace whatever run --out holds.")),
    ]
    parameters = fields[:2] + fixed + fields[2:]

    def command(**flags: Any) -> None:
        body(**flags)

    command.__signature__ = inspect.Signature(parameters)
    command.__doc__ = body.__doc__
    return command
