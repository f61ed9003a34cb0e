"""Data sets -> prompts: shipped sets by short name, local files and directories, hub data sets.

Every source ends as a list of `Example` (an id, the prompt in the papers' template and as a
conversation, the reference responses). Three row layouts: instruction rows (Alpaca/MiniLLM
fields), ready `prompt` rows (used as is) and `messages` rows (chat.py). One data set holds one
layout: `messages` mixed with instruction or prompt rows is refused, naming the first row that
breaks it. Prompts are then rendered (chat.py) and tokenised once; those over the prompt-length
limit are dropped and counted, never truncated mid-token.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mgsr_cli.artifacts import RECORDS, is_stage_dir, read_stage
from mgsr_cli.chat import PAPERS, Rendering, parse_messages, prompt_text
from mgsr_cli.config import DataConfig
from mgsr_cli.errors import UsageError

log = logging.getLogger(__name__)

# Short names of the sets shipped in data/ (see data/README.md for sources and licenses).
SHIPPED = {
    "dolly": "dolly/minillm_test.jsonl",
    "dolly_train": "dolly/minillm_train.jsonl.gz",
    "dolly_dev": "dolly/minillm_dev.jsonl",
    "self_inst": "self_inst/minillm_valid.jsonl",
    "vicuna": "vicuna/minillm_valid.jsonl",
    "sinst": "sinst/minillm_11_valid.jsonl.gz",
    "uinst": "uinst/dtkd_short_answer_valid.jsonl",  # short-answer bucket: smoke tests only
}
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
INSTRUCTION_FIELDS = ("instruction",)
INPUT_FIELDS = ("input", "context")
OUTPUT_FIELDS = ("output", "response")


@dataclass(frozen=True)
class Example:
    """One prompt with its reference responses (several for S-NI, none for unlabeled prompts).

    `prompt` is the papers' template text (or a ready prompt), None for a `messages` row;
    `messages` is the conversation the chat template renders (None for a ready prompt);
    `where` is the file and line it came from, for errors.
    """

    id: str
    prompt: str | None
    references: tuple[str, ...]
    messages: tuple[dict, ...] | None = None
    where: str = ""

    @property
    def is_chat(self) -> bool:
        """A `messages` row: only the chat template renders it."""
        return self.prompt is None


@dataclass(frozen=True)
class PromptTokens:
    example: Example
    prompt_ids: tuple[int, ...]
    text: str = ""


def shipped_path(name: str) -> Path:
    """Where a shipped set lives inside the installed package."""
    return Path(str(resources.files("mgsr_cli.shipped_data") / SHIPPED[name]))


def resolve_source(spec: str) -> Path | None:
    """The file or directory a data spec names, or None for a hub data set id."""
    if spec in SHIPPED:
        return shipped_path(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.endswith(DATA_SUFFIXES) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"data '{spec}' not found: no such file or directory, and not a shipped set ({', '.join(SHIPPED)})")
    return None


def load_examples(spec: str, config: DataConfig, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a data spec (shipped name, path, stage output or hub id)."""
    source = resolve_source(spec)
    rows = _iter_rows(spec, source, config)
    examples = []
    for index, (where, row) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        examples.append(_row_to_example(row, index, where, config))
        if examples[-1].is_chat != examples[0].is_chat:
            kinds = ["a 'messages' row" if example.is_chat else "an instruction/prompt row" for example in (examples[-1], examples[0])]
            raise UsageError(
                f"{examples[-1].where}: {kinds[0]}, but the data set's first row ({examples[0].where}) is {kinds[1]}; "
                "one data set holds one kind of row (convert or split it)"
            )
    if not examples:
        raise UsageError(f"data '{spec}' holds no examples")
    return examples


def _iter_rows(spec: str, source: Path | None, config: DataConfig) -> Iterator[tuple[str, dict]]:
    """(location for error messages, row) pairs from any supported source."""
    if source is None:
        yield from _hub_rows(spec, config.split)
    elif is_stage_dir(source):
        seen = set()  # several samples per prompt are one example
        _, records = read_stage(source, ("generate", "correct"))
        for number, record in enumerate(records, 1):
            row = _stage_record_to_row(record, f"{source / RECORDS}:{number}")
            if row["id"] not in seen:
                seen.add(row["id"])
                yield f"{source / RECORDS}:{number}", row
    elif source.is_dir():
        files = sorted(path for path in source.iterdir() if path.name.endswith(DATA_SUFFIXES))
        if not files:
            raise UsageError(f"data directory '{source}' holds no {', '.join(DATA_SUFFIXES)} files")
        for path in files:
            yield from _file_rows(path)
    else:
        yield from _file_rows(source)


def _file_rows(path: Path) -> Iterator[tuple[str, dict]]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_rows(path)
    elif name.endswith((".json", ".csv", ".parquet")):
        builder = {"json": "json", "csv": "csv", "parquet": "parquet"}[name.rsplit(".", 1)[1]]
        import datasets

        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # datasets raises many types for unreadable files
            raise UsageError(f"cannot read '{path}': {str(error).splitlines()[0]}") from None
        for number, row in enumerate(table, 1):
            yield f"{path}:row {number}", row
    else:
        raise UsageError(f"cannot read '{path}': expected one of {', '.join(DATA_SUFFIXES)}")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a JSONL file, gzip-compressed or not (told by its first bytes, not its name); UTF-8 only."""
    with open(path, "rb") as probe:
        head = probe.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{path}: the file is UTF-16 text; mgsr reads UTF-8 only (convert it, e.g. iconv -f UTF-16 -t UTF-8)")
    compressed = head.startswith(b"\x1f\x8b")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            for number, raw in enumerate(handle, 1):
                yield from _jsonl_row(path, number, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UsageError(f"{path}: damaged gzip data ({str(error) or type(error).__name__})") from None


def _jsonl_row(path: Path, number: int, raw: bytes) -> Iterator[tuple[str, dict]]:
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}:{number}: not UTF-8 text (mgsr reads UTF-8 only)") from None
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        cut = "" if raw.endswith(b"\n") else "; the line is cut short"
        raise UsageError(f"{path}:{number}: malformed JSON ({error.msg}{cut})") from None
    if not isinstance(row, dict):
        raise UsageError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    yield f"{path}:{number}", row


def _hub_rows(spec: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        table = datasets.load_dataset(spec, split=split)
    except Exception as error:  # offline, unknown id, bad split: all one line for the user
        raise UsageError(f"cannot load data set '{spec}' from the hub: {str(error).splitlines()[0]}") from None
    for number, row in enumerate(table, 1):
        yield f"{spec}:row {number}", row


def _stage_record_to_row(record: dict, where: str) -> dict:
    """A generate/correct record read as data: its prompt and references, one row per example."""
    if "prompt" not in record or ("example_id" not in record and "id" not in record):
        raise UsageError(f"{where}: a stage record needs 'id' and 'prompt' (the record has: {', '.join(sorted(record))})")
    return {"id": record.get("example_id", record.get("id")), "prompt": record["prompt"], "output": record.get("references", [])}


def _row_to_example(row: dict, index: int, where: str, config: DataConfig) -> Example:
    """One row as an Example; every field it reads is checked (type, empty text) and named on error."""
    identifier = row.get("id", index)
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
        raise UsageError(f"{where}: field 'id' must be a string or an integer, got {_shown(identifier)}")
    if "messages" in row:
        return _messages_example(row, str(identifier), where, config)
    prompt = row.get(config.prompt_field) if config.prompt_field else None
    messages = None
    if prompt is not None:
        _text(prompt, config.prompt_field, where)
    else:
        name, instruction = _field(row, config.instruction_field, INSTRUCTION_FIELDS, where, required=True)
        _text(instruction, name, where)
        name, context = _field(row, config.input_field, INPUT_FIELDS, where, required=False)
        if context is not None and not isinstance(context, str):
            raise UsageError(f"{where}: field '{name}' must be a string, got {_shown(context)}")
        prompt = format_prompt(instruction, context or "", config)
        messages = ({"role": "user", "content": f"{instruction}\n\n{context}" if context else instruction},)
    name, output = _field(row, config.output_field, OUTPUT_FIELDS, where, required=False)
    outputs = output if isinstance(output, list) else ([] if output is None else [output])
    for reference in outputs:
        _text(reference, name, where)
    return Example(str(identifier), prompt, tuple(outputs), messages, where)


def _messages_example(row: dict, identifier: str, where: str, config: DataConfig) -> Example:
    """A `messages` row: it may not also carry the fields of an instruction or prompt row."""
    other = [name for name in (config.prompt_field, config.instruction_field, *INSTRUCTION_FIELDS) if name and name in row]
    if other:
        raise UsageError(f"{where}: the row has both 'messages' and '{other[0]}'; give one or the other")
    conversation, reference = parse_messages(row["messages"], where)
    return Example(identifier, None, () if reference is None else (reference,), conversation, where)


def _text(value, name: str, where: str) -> None:
    if not isinstance(value, str):
        raise UsageError(f"{where}: field '{name}' must be a string, got {_shown(value)}")
    if not value.strip():
        raise UsageError(f"{where}: field '{name}' is empty")


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(row: dict, configured: str | None, candidates: tuple[str, ...], where: str, required: bool):
    """(name, value) of the first of the field names present in the row."""
    names = (configured,) if configured else candidates
    for name in names:
        if name in row:
            return name, row[name]
    if required:
        raise UsageError(f"{where}: missing field '{names[0]}' (the row has: {', '.join(sorted(row)) or 'no fields'})")
    return names[0], None


def format_prompt(instruction: str, context: str, config: DataConfig) -> str:
    """The instruction template of method.md section 6 (the with-input form when there is an input)."""
    if context:
        return config.template_with_input.format(instruction=instruction, input=context)
    return config.template.format(instruction=instruction)


def tokenize_prompts(examples: list[Example], tokenizer, max_prompt_length: int, rendering: Rendering = PAPERS) -> list[PromptTokens]:
    """Token ids of each prompt as `rendering` renders it; prompts longer than the limit are dropped
    and counted in the log. A chat-rendered prompt gets no special tokens on top (the template has
    them), exactly as `apply_chat_template` tokenises."""
    texts = [prompt_text(example, tokenizer, rendering) for example in examples]
    encoded = tokenizer(texts, add_special_tokens=not rendering.chat_template)["input_ids"]
    kept = [
        PromptTokens(example, tuple(ids), text)
        for example, ids, text in zip(examples, encoded, texts)
        if len(ids) <= max_prompt_length
    ]
    dropped = len(examples) - len(kept)
    if dropped:
        log.warning("dropped %d of %d prompts longer than %d tokens", dropped, len(examples), max_prompt_length)
    if not kept:
        raise UsageError(f"every prompt is longer than the prompt-length limit of {max_prompt_length} tokens")
    return kept
