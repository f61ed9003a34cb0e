"""Conversations: `messages` rows and the tokenizer's chat template (`--chat-template auto|on|off`).

A `messages` row is the OpenAI/TRL layout, `[{"role": "system"|"user"|"assistant", "content": ...}]`,
one or many turns. Its final assistant turn is the reference response; everything before it (ending
with a user turn) is the conversation to answer, rendered with the tokenizer's own
`apply_chat_template(..., add_generation_prompt=True)` so the model continues exactly where it
would in a chat. Nothing here writes a template by hand.

One rendering per stage run (per model in `evaluate`), recorded in its manifest as `prompts`:
- `auto`: the chat template when the data has `messages` rows, the papers' Alpaca template
  otherwise; so the shipped instruction sets keep the papers' template under any tokenizer.
- `on`: every row through the chat template (an instruction row is one user turn: the instruction,
  a blank line, its input); a tokenizer without a template is refused.
- `off`: the papers' template; a `messages` row is refused (it has no instruction to template).
- Under the chat template every data set of the run is rendered so (e.g. distill's dolly_dev
  validation set, as single user turns), and a ready `prompt` (a stage output read as data) is
  used as is.
- A stage reading another stage's output renders as that output did: a flag contradicting the
  recorded rendering, or another template (by sha256), is refused.

Responses: the final assistant turn as the template renders it, cut just after the tokenizer's EOS
when the template emits one (a newline after it is never trained on), else followed by EOS.
`chat_turns: all` also trains the earlier assistant turns inside the prompt (content and EOS),
the system and user turns staying masked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mgsr_cli.artifacts import MANIFEST, is_stage_dir
from mgsr_cli.errors import UsageError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rendering:
    """How a stage turned conversations into prompt ids: the chat template (by hash) or the papers' template."""

    chat_template: bool
    template_sha256: str | None = None

    def describe(self) -> dict:
        return {"chat_template": "on" if self.chat_template else "off", "template_sha256": self.template_sha256}

    @classmethod
    def recorded(cls, manifest: dict) -> "Rendering":
        """What a manifest says; outputs written before chat support used the papers' template."""
        prompts = manifest.get("prompts") or {}
        return cls(prompts.get("chat_template") == "on", prompts.get("template_sha256"))


PAPERS = Rendering(False)


def parse_messages(messages, where: str) -> tuple[tuple[dict, ...], str | None]:
    """(conversation to answer, reference) of a `messages` field; the reference is the final
    assistant turn's content, None when the row ends with a user turn (a prompt without answer)."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for number, turn in enumerate(messages, 1):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            shown = json.dumps(role) if isinstance(turn, dict) else f"a {type(turn).__name__}, not an object"
            raise UsageError(f"{where}: field 'messages': turn {number} has role {shown}; expected {', '.join(ROLES)}")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            problem = "empty" if isinstance(content, str) or content is None else f"a {type(content).__name__}, not text"
            raise UsageError(f"{where}: field 'messages': turn {number} ({role}) has {problem} 'content'")
        turns.append({"role": role, "content": content})
    reference = turns.pop()["content"] if turns[-1]["role"] == "assistant" else None
    if not turns or turns[-1]["role"] != "user":
        raise UsageError(f"{where}: field 'messages': the final assistant turn must answer a user turn")
    return tuple(turns), reference


def template_sha256(tokenizer) -> str | None:
    """sha256 of the chat template the tokenizer applies (None without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return hashlib.sha256(tokenizer.get_chat_template().encode("utf-8")).hexdigest()


def recorded_renderings(specs: list[str | None]) -> dict[str, Rendering]:
    """{spec: rendering} of the specs that are stage outputs (generate / correct directories)."""
    found = {}
    for spec in specs:
        if spec and is_stage_dir(Path(spec)):
            found[spec] = Rendering.recorded(json.loads((Path(spec) / MANIFEST).read_text(encoding="utf-8")))
    return found


def resolve(mode: str, tokenizer, examples, recorded: dict[str, Rendering], model: str) -> Rendering:
    """The one rendering of a stage run (module docstring), or a one-line UsageError."""
    digest = template_sha256(tokenizer)
    chat_row = next((example for example in examples if example.is_chat), None)
    if recorded:
        rendering = _recorded(mode, recorded, digest, model)
    elif mode == "off" or (mode == "auto" and chat_row is None):
        rendering = PAPERS
    elif digest is None:
        reason = "--chat-template on" if mode == "on" else f"{chat_row.where}: a 'messages' row"
        raise UsageError(f"{reason} needs a chat template, but the tokenizer of '{model}' has none; use a chat model's tokenizer or instruction rows")
    else:
        rendering = Rendering(True, digest)
    if chat_row is not None and not rendering.chat_template:
        why = "--chat-template off" if mode == "off" else f"'{next(iter(recorded))}' was rendered without a chat template"
        raise UsageError(f"{chat_row.where}: a 'messages' row needs the chat template, but {why}")
    return rendering


def _recorded(mode: str, recorded: dict[str, Rendering], digest: str | None, model: str) -> Rendering:
    """The rendering the input stage outputs share, checked against the flag and the tokenizer."""
    if len(set(recorded.values())) > 1:
        raise UsageError("the input stage outputs rendered their prompts differently: " + ", ".join(
            f"'{spec}' chat template {rendering.describe()['chat_template']}" for spec, rendering in recorded.items()))
    spec, rendering = next(iter(recorded.items()))
    if mode != "auto" and (mode == "on") != rendering.chat_template:
        raise UsageError(
            f"--chat-template {mode} contradicts '{spec}', whose prompts were rendered with chat template "
            f"{rendering.describe()['chat_template']}; drop the flag or regenerate that input"
        )
    if rendering.chat_template and rendering.template_sha256 != digest:
        raise UsageError(
            f"'{spec}' was rendered with another chat template than the tokenizer of '{model}' has "
            f"(sha256 {str(rendering.template_sha256)[:12]} vs {str(digest)[:12]}); its prompts cannot be rendered the same way"
        )
    return rendering


def _render(tokenizer, turns, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)


def prompt_text(example, tokenizer, rendering: Rendering) -> str:
    """The text a prompt is before tokenisation: the chat template with the generation prompt,
    or the example's ready prompt (the papers' template, or a stage output's recorded prompt)."""
    if rendering.chat_template and example.messages is not None:
        return _render(tokenizer, example.messages, True)
    return example.prompt


def _turn_end(text: str, start: int, eos: str | None) -> int:
    """Where an assistant turn rendered from `start` ends: just after its EOS, else the text's end."""
    cut = text.find(eos, start) if eos else -1
    return cut + len(eos) if cut >= 0 else len(text)


def response_ids(tokenizer, example, text: str, reference: str) -> list[int]:
    """Token ids of the reference as the chat template renders the final assistant turn, ending in EOS."""
    full = _render(tokenizer, (*example.messages, {"role": "assistant", "content": reference}), False)
    if not full.startswith(text):
        raise UsageError(f"{example.where}: the chat template does not render the answered conversation as the prompt followed by the answer")
    end = _turn_end(full, len(text), tokenizer.eos_token)
    ids = tokenizer(full[len(text) : end], add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def earlier_assistant_positions(tokenizer, example, text: str) -> tuple[int, ...]:
    """Indices into the prompt's token ids (tokenised without special tokens added) that belong to
    its earlier assistant turns, content and EOS; position 0 predicts nothing and is left out."""
    spans = []
    for index, turn in enumerate(example.messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, example.messages[:index], True)
        upto = _render(tokenizer, example.messages[: index + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UsageError(f"{example.where}: the chat template does not render turn {index + 1} as a prefix of the conversation")
        spans.append((len(before), _turn_end(upto, len(before), tokenizer.eos_token)))
    if not spans:
        return ()
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return tuple(
        position for position, (first, last) in enumerate(offsets)
        if position > 0 and last > first and any(start <= first and last <= end for start, end in spans)
    )
