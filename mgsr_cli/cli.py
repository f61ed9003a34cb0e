"""The `mgsr` command line: thin Typer commands that parse flags into configs and call the stages.

Every stage prints its output directory, and nothing else, on stdout; logs, progress bars and
tables go to stderr. Bad input ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from typer.core import TyperGroup

from mgsr_cli import __version__
from mgsr_cli.errors import Interrupted, UsageError, error_line, is_parse_error, raise_interrupted
from mgsr_cli.flags import distill_command


class _OneLineErrors(TyperGroup):
    """Bad input becomes `error: ...` on stderr and exit code 2, never a traceback; Ctrl-C and
    SIGTERM stop the stage resumably, in one line too (exit 130 / 143)."""

    def invoke(self, ctx):
        main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        previous = signal.signal(signal.SIGTERM, raise_interrupted) if main_thread else None
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as error:
            stop = error if isinstance(error, Interrupted) else Interrupted()
            typer.echo(f"error: {stop}", err=True)
            raise typer.Exit(128 + stop.signum) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:  # every failure ends in one line; --verbose keeps the traceback
            if not (isinstance(error, UsageError) or is_parse_error(error)) and ctx.find_root().params.get("verbose"):
                raise
            typer.echo(f"error: {error_line(error)}", err=True)
            raise typer.Exit(2) from None
        finally:
            from mgsr_cli.artifacts import release_locks

            release_locks()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


app = typer.Typer(
    cls=_OneLineErrors,
    name="mgsr",
    help="Knowledge distillation of language models: MGSR (multi-granularity semantic revision) and its baselines.\n\n"
    "Stages chain through their output directories: generate -> correct -> distill -> evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts say "[default: 1.0]" literally
)

OUT = typer.Option(..., "--out", help="Output directory (created; an unfinished run there is resumed).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a complete run in --out instead of refusing.")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16.")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default).")
LIMIT = typer.Option(None, "--limit", help="Use only the first N examples of each data set.")
TEMPERATURE = typer.Option(None, "--temperature", help="Sampling temperature; 0 means greedy decoding. [default: 1.0]")
TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling mass; 1 switches it off. [default: 1.0]")
TOP_K = typer.Option(None, "--top-k", help="Sample from the K best tokens; 0 switches it off. [default: 0]")
MAX_NEW = typer.Option(None, "--max-new-tokens", help="New tokens per response. [default: fill up to --max-length]")
MAX_LENGTH = typer.Option(None, "--max-length", help="Prompt + response tokens at most. [default: 512]")
MAX_PROMPT = typer.Option(None, "--max-prompt-length", help="Longer prompts are dropped (and counted). [default: 256]")
ChatTemplate = Literal["auto", "on", "off"]
CHAT_TEMPLATE = typer.Option(
    None,
    "--chat-template",
    help="Prompts through the tokenizer's chat template: auto = on for 'messages' rows, the papers' Alpaca template "
    "for instruction rows (the shipped sets); on = every row as a chat (needs a template); off = the papers' template. "
    "An input made by another stage is rendered as it was. [default: auto]",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mgsr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging on stderr."),
) -> None:
    from mgsr_cli.console import setup_logging

    setup_logging(verbose)


def _given(**flags: Any) -> dict:
    """The flags the user actually set, as a nested override mapping for a config."""
    changes: dict = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        *parents, leaf = dotted.split("__")
        target = changes
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return changes


def _sampling_and_loading(
    max_new_tokens, temperature, top_p, top_k, max_length, max_prompt_length, chat_template, dtype, device, trust_remote_code
) -> dict:
    """The sampling, prompt and model-loading flags that `generate` and `evaluate` share, for `_given`."""
    return dict(
        sampling__max_new_tokens=max_new_tokens,
        sampling__temperature=temperature,
        sampling__top_p=top_p,
        sampling__top_k=top_k,
        sampling__max_length=max_length,
        data_format__max_prompt_length=max_prompt_length,
        data_format__chat_template=chat_template,
        loading__dtype=dtype,
        loading__device=device,
        loading__trust_remote_code=trust_remote_code,
    )


def _finish(out: Path) -> None:
    """The one line on stdout: the output directory, for shell pipelines."""
    typer.echo(str(out))


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="Hub id or local directory of a causal LM."),
    data: str = typer.Option(..., "--data", help="Shipped set (dolly, self_inst, vicuna, sinst, uinst, dolly_train, dolly_dev), file, directory or hub id."),
    out: Path = OUT,
    limit: Optional[int] = LIMIT,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per batch. [default: 8]"),
    max_new_tokens: Optional[int] = MAX_NEW,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    top_k: Optional[int] = TOP_K,
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Responses per prompt. [default: 1]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed; same seed and batch size give the same output. [default: 0]"),
    max_length: Optional[int] = MAX_LENGTH,
    max_prompt_length: Optional[int] = MAX_PROMPT,
    chat_template: Optional[ChatTemplate] = CHAT_TEMPLATE,
    dtype: Dtype = DTYPE,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Sample responses (student-generated outputs) for a prompt set."""
    from mgsr_cli.config import GenerateConfig
    from mgsr_cli.config_loading import override
    from mgsr_cli.generate import run_generate

    config = override(
        GenerateConfig(model=model, data=data),
        _given(
            limit=limit,
            batch_size=batch_size,
            num_samples=num_samples,
            seed=seed,
            **_sampling_and_loading(
                max_new_tokens, temperature, top_p, top_k, max_length, max_prompt_length, chat_template, dtype, device, trust_remote_code
            ),
        ),
        "flag",
    )
    _finish(run_generate(config, out, overwrite))


@app.command()
def evaluate(
    model: list[str] = typer.Option(..., "--model", help="Model to score; repeat for several, optionally as LABEL=PATH."),
    data: list[str] = typer.Option(..., "--data", help="Data set with references; repeat for several (shipped name, path or hub id)."),
    out: Path = OUT,
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated sampling seeds. [default: 10,20,30,40,50]"),
    limit: Optional[int] = LIMIT,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per batch. [default: 16]"),
    max_new_tokens: Optional[int] = MAX_NEW,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    top_k: Optional[int] = TOP_K,
    max_length: Optional[int] = MAX_LENGTH,
    max_prompt_length: Optional[int] = MAX_PROMPT,
    chat_template: Optional[ChatTemplate] = CHAT_TEMPLATE,
    dtype: Dtype = DTYPE,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Score models with ROUGE-L under the papers' protocol (sampling at T=1, seeds 10..50) and write a report."""
    from mgsr_cli.config import EvaluateConfig
    from mgsr_cli.config_loading import override
    from mgsr_cli.evaluate import run_evaluate

    config = override(
        EvaluateConfig(models=list(model), data=list(data)),
        _given(
            seeds=seeds,
            limit=limit,
            batch_size=batch_size,
            **_sampling_and_loading(
                max_new_tokens, temperature, top_p, top_k, max_length, max_prompt_length, chat_template, dtype, device, trust_remote_code
            ),
        ),
        "flag",
    )
    _finish(run_evaluate(config, out, overwrite))


@app.command()
def correct(
    input: Path = typer.Option(..., "--input", help="Output directory of `mgsr generate` (token ids are reused, never re-tokenised)."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model: hub id or local directory."),
    student: str = typer.Option(..., "--student", help="Student model: hub id or local directory."),
    out: Path = OUT,
    divergence: Optional[Literal["fkl", "rkl", "js"]] = typer.Option(None, "--divergence", help="Token divergence d_i: fkl = KL(p||q) | rkl | js. [default: fkl]"),
    teacher_token: Optional[Literal["sample", "argmax"]] = typer.Option(None, "--teacher-token", help="Teacher proposal: sample from p_i | argmax. [default: sample]"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Corrections per sequence, each after the last one. [default: 1]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Re-generation temperature; 0 is greedy. [default: the input's]"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Re-generation nucleus mass. [default: the input's]"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Re-generation top-k; 0 is off. [default: the input's]"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Response budget after revision. [default: the input's]"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Prompt + revised response at most. [default: the input's]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of teacher proposals and re-generation. [default: 0]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per batch. [default: 8]"),
    dtype: Dtype = DTYPE,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
    overwrite: bool = OVERWRITE,
) -> None:
    """SCRG: find where teacher and student disagree most, put the teacher's token there, let the student re-generate the rest."""
    from mgsr_cli.correct import correct_config, run_correct

    config = correct_config(
        input,
        teacher,
        student,
        _given(
            scrg__divergence=divergence,
            scrg__teacher_token=teacher_token,
            scrg__rounds=rounds,
            scrg__sampling__temperature=temperature,
            scrg__sampling__top_p=top_p,
            scrg__sampling__top_k=top_k,
            scrg__sampling__max_new_tokens=max_new_tokens,
            scrg__sampling__max_length=max_length,
            seed=seed,
            batch_size=batch_size,
            loading__dtype=dtype,
            loading__device=device,
            loading__trust_remote_code=trust_remote_code,
        ),
    )
    _finish(run_correct(config, input, out, overwrite))


def _distill(**flags: Any) -> None:
    """Train the student: L = L_SFT + L_DAC-KL + L_span on SCRG-revised student outputs (MGSR), or any baseline recipe.

    Every recipe key is also a flag (nested keys joined by '-'); flags override the recipe.
    """
    from mgsr_cli.config import DistillConfig
    from mgsr_cli.config_loading import load_recipe, override, recipe_path
    from mgsr_cli.train import run_distill

    out, recipe = flags.pop("out"), flags.pop("recipe")
    resume, overwrite = flags.pop("resume"), flags.pop("overwrite")
    loss_options = flags.pop("loss_options")
    config = load_recipe(DistillConfig, recipe_path(recipe)) if recipe else DistillConfig()
    changes = _given(**flags)
    if loss_options:
        changes["loss_options"] = {**config.loss_options, **_key_values(loss_options, "--loss-option")}
    config = override(config, changes)
    result = run_distill(config, out, resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # one line on stdout, also under accelerate launch
        _finish(result)


def _key_values(items: list[str], flag: str) -> dict:
    import yaml

    pairs = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got '{item}'")
        pairs[key] = yaml.safe_load(value)
    return pairs


app.command("distill", help=_distill.__doc__)(distill_command(_distill))


@app.command("build-tiny")
def build_tiny(
    out: Path = typer.Option(..., "--out", help="Directory to write teacher/ and student/ into."),
    seed: int = typer.Option(0, "--seed", help="Initialisation seed."),
) -> None:
    """Write the embedded default: a tiny 4-layer GPT-2 teacher and 2-layer student with the real GPT-2 tokenizer."""
    from mgsr_cli.models import build_tiny_pair

    build_tiny_pair(out, seed)
    _finish(out)


@app.command()
def demo(
    out: Path = typer.Option(Path("mgsr-demo"), "--out", help="Directory for every stage's artifacts."),
    quick: bool = typer.Option(False, "--quick", help="A few steps per stage: checks the pipeline in about 2 minutes, not the results."),
    overwrite: bool = OVERWRITE,
) -> None:
    """The main job on the embedded default: tiny GPT-2 pair -> SFT -> generate -> correct -> distill (MGSR) -> evaluate.

    A re-run continues after the last complete stage; the final table compares the student
    before and after distillation with the teacher (ROUGE-L).
    """
    from mgsr_cli.pipeline import QUICK_DEMO, DemoSize, run_demo

    _finish(run_demo(out, QUICK_DEMO if quick else DemoSize(), overwrite))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
