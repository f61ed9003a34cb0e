"""Chat data: `messages` rows rendered with the tokenizer's own chat template, the same way in
every stage, recorded in the manifests, and refused in one line when malformed or mismatched."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mgsr_cli.artifacts import read_stage
from mgsr_cli.batches import collate, ground_truth_sequences
from mgsr_cli.chat import PAPERS, Rendering, resolve, template_sha256
from mgsr_cli.cli import app
from mgsr_cli.config import DataConfig, DistillConfig
from mgsr_cli.config_loading import from_dict, override
from mgsr_cli.data import load_examples, tokenize_prompts
from mgsr_cli.errors import UsageError
from mgsr_cli.models import load_tokenizer

from .conftest import write_jsonl

runner = CliRunner()
# A Zephyr-like template: each turn ends with the tokenizer's EOS and a newline the model never trains on.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATS = [
    {"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                             {"role": "assistant", "content": "Blue."}]},
    {"id": "b", "messages": [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello, how can I help?"},
                             {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}]},
    {"id": "c", "messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]},
]


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def chat_pair(tiny_pair, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny GPT-2 pair with a chat template on both tokenizers."""
    root = tmp_path_factory.mktemp("chat")
    pair = []
    for source in tiny_pair:
        target = root / source.name
        shutil.copytree(source, target)
        tokenizer = load_tokenizer(str(target))
        tokenizer.chat_template = TEMPLATE
        tokenizer.save_pretrained(str(target))
        pair.append(target)
    return pair[0], pair[1]


@pytest.fixture(scope="module")
def chat_tokenizer(chat_pair):
    return load_tokenizer(str(chat_pair[1]))


@pytest.fixture
def chats(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", CHATS)


def chat_ids(tokenizer, turns) -> list[int]:
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_prompts_are_the_tokenizers_own_chat_template(chat_tokenizer, chats):
    examples = load_examples(str(chats), DataConfig())
    assert [example.references for example in examples] == [("Blue.",), ("One, two, three.",), ("Yes.",)]
    assert examples[1].messages[-1] == {"role": "user", "content": "Count to three."} and examples[0].messages[0]["role"] == "system"
    rendering = resolve("auto", chat_tokenizer, examples, {}, "chat")
    assert rendering == Rendering(True, template_sha256(chat_tokenizer))
    prompts = tokenize_prompts(examples, chat_tokenizer, 256, rendering)
    for prompt, row in zip(prompts, CHATS):
        assert list(prompt.prompt_ids) == chat_ids(chat_tokenizer, row["messages"][:-1])  # system + multi-turn included
    assert prompts[0].text == "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nName a colour.<|endoftext|>\n<|assistant|>\n"


def test_final_turn_is_the_response_and_all_turns_train_earlier_replies(chat_tokenizer, chats):
    tokenizer = chat_tokenizer
    examples = load_examples(str(chats), DataConfig())
    rendering = resolve("on", tokenizer, examples, {}, "chat")
    last = ground_truth_sequences(examples, tokenizer, 256, 512, None, rendering, "last")
    every = ground_truth_sequences(examples, tokenizer, 256, 512, None, rendering, "all")
    for sequence, row in zip(last, CHATS):  # reference + EOS, cut after the EOS (the template's newline is not trained)
        assert tokenizer.decode(sequence.response_ids) == row["messages"][-1]["content"] + "<|endoftext|>"
        assert sequence.prompt_targets == ()
    assert [len(s.prompt_targets) for s in every] == [0, len(tokenizer("Hello, how can I help?<|endoftext|>")["input_ids"]), 0]
    sequence = every[1]
    assert tokenizer.decode([sequence.prompt_ids[p] for p in sequence.prompt_targets]) == "Hello, how can I help?<|endoftext|>"
    batch, single = collate(every, tokenizer.pad_token_id), collate(last, tokenizer.pad_token_id)
    assert batch.num_rows == single.num_rows + len(sequence.prompt_targets)
    rows = [tuple(row) for row in batch.rows.tolist()]
    for position in sequence.prompt_targets:  # row t predicts token t + 1: the earlier reply, nothing of the user turns
        assert int(batch.targets[rows.index((1, position - 1))]) == sequence.prompt_ids[position]


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_templates_without_eos_and_templates_that_are_not_prefix_stable(gpt2_tokenizer, chats):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHATML  # the turn ends in <|im_end|>, not the tokenizer's EOS: EOS follows the rendered turn
    examples = load_examples(str(chats), DataConfig())
    rendering = resolve("auto", tokenizer, examples, {}, "m")
    sequences = ground_truth_sequences(examples, tokenizer, 256, 512, None, rendering, "all")
    assert tokenizer.decode(sequences[0].response_ids) == "Blue.<|im_end|>\n<|endoftext|>"
    assert tokenizer.decode([sequences[1].prompt_ids[p] for p in sequences[1].prompt_targets]) == "Hello, how can I help?<|im_end|>\n"
    tokenizer.chat_template = CHATML.replace("{{ m['content'] }}", "{{ m['content'] if loop.last else '...' }}")
    with pytest.raises(UsageError, match=r"chats.jsonl:1: the chat template does not render the answered conversation as the prompt"):
        ground_truth_sequences(examples, tokenizer, 256, 512, None, resolve("on", tokenizer, examples, {}, "m"))


def test_auto_on_off_resolution(chat_tokenizer, gpt2_tokenizer, chats, small_data):
    instructions, conversations = load_examples(str(small_data), DataConfig()), load_examples(str(chats), DataConfig())
    digest = template_sha256(chat_tokenizer)
    assert resolve("auto", chat_tokenizer, instructions, {}, "m") == PAPERS  # the shipped sets keep the papers' template
    assert resolve("auto", gpt2_tokenizer, instructions, {}, "m") == PAPERS
    assert resolve("on", chat_tokenizer, instructions, {}, "m") == Rendering(True, digest)
    assert resolve("off", chat_tokenizer, instructions, {}, "m") == PAPERS
    # `on` renders an instruction row as one user turn: instruction, blank line, input
    prompt = tokenize_prompts(instructions[:1], chat_tokenizer, 256, Rendering(True, digest))[0]
    turn = {"role": "user", "content": "Name a colour number 0.\n\nSome context."}
    assert list(prompt.prompt_ids) == chat_ids(chat_tokenizer, [turn])
    with pytest.raises(UsageError, match="tokenizer of 'm' has none"):
        resolve("on", gpt2_tokenizer, instructions, {}, "m")
    with pytest.raises(UsageError, match=r"chats.jsonl:1: a 'messages' row needs a chat template"):
        resolve("auto", gpt2_tokenizer, conversations, {}, "m")
    with pytest.raises(UsageError, match=r"chats.jsonl:1: .*--chat-template off"):
        resolve("off", chat_tokenizer, conversations, {}, "m")


@pytest.mark.parametrize(
    "row, fragments",
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, ("rows.jsonl:2", "'messages'", "turn 1 has role \"bot\"")),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, ("rows.jsonl:2", "turn 1 (user) has empty 'content'")),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, ("rows.jsonl:2", "turn 2 (assistant) has empty")),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, ("rows.jsonl:2", "must answer a user turn")),
        ({"messages": "hello"}, ("rows.jsonl:2", "field 'messages' must be a non-empty list")),
        ({"messages": [{"role": "user", "content": "q"}], "instruction": "q"}, ("rows.jsonl:2", "both 'messages' and 'instruction'")),
        ({"instruction": "q", "output": "a"}, ("rows.jsonl:2", "the data set's first row (", "rows.jsonl:1) is a 'messages' row")),
    ],
)
def test_malformed_chat_rows_are_one_line_errors(chat_pair, tmp_path, row, fragments):
    data = write_jsonl(tmp_path / "rows.jsonl", [CHATS[0], row])
    one_line_error(invoke("generate", "--model", chat_pair[1], "--data", data, "--out", tmp_path / "out"), *fragments)


def test_chat_flags_are_choices_and_recipe_keys():
    for command in ("generate", "evaluate", "distill"):
        assert "--chat-template <auto|on|off>" in invoke(command, "--help").output, command
    assert "--chat-turns <last|all>" in invoke("distill", "--help").output
    assert "--chat-template" not in invoke("correct", "--help").output  # correct renders nothing: it re-uses the input's ids
    one_line_error(invoke("generate", "--model", "m", "--data", "d", "--out", "o", "--chat-template", "maybe"), "--chat-template")
    assert from_dict(DistillConfig, {"data_format": {"chat_template": "on"}, "chat_turns": "all"}, "recipe r.yaml").chat_turns == "all"
    with pytest.raises(UsageError, match=r"recipe r.yaml: data_format.chat_template: 'maybe' is not one of auto, on, off"):
        from_dict(DistillConfig, {"data_format": {"chat_template": "maybe"}}, "recipe r.yaml")
    with pytest.raises(UsageError, match=r"--chat-turns all .* drop --chat-template off"):
        override(DistillConfig(), {"chat_turns": "all", "data_format": {"chat_template": "off"}})


def test_stages_render_alike_record_it_and_refuse_a_mismatch(tiny_pair, chat_pair, chat_tokenizer, chats, tmp_path):
    teacher, student = chat_pair
    generated = tmp_path / "gen"
    result = invoke("generate", "--model", student, "--data", chats, "--max-new-tokens", "3", "--out", generated)
    assert result.exit_code == 0, result.output
    manifest, records = read_stage(generated, ("generate",))
    described = {"chat_template": "on", "template_sha256": template_sha256(chat_tokenizer)}
    assert manifest["prompts"] == described
    expected = {row["id"]: chat_ids(chat_tokenizer, row["messages"][:-1]) for row in CHATS}
    assert {record["example_id"]: record["prompt_ids"] for record in records} == expected
    rendering = Rendering(True, described["template_sha256"])  # distill's ground truth, whose prompts SGO samples from
    trained = ground_truth_sequences(load_examples(str(chats), DataConfig()), chat_tokenizer, 128, 160, None, rendering)
    assert {sequence.example_id: sequence.prompt_ids for sequence in trained} == expected
    one_line_error(invoke("generate", "--model", tiny_pair[1], "--data", chats, "--chat-template", "on", "--out", tmp_path / "v"),
                   "--chat-template on needs a chat template", "has none")

    corrected = tmp_path / "cor"
    result = invoke("correct", "--input", generated, "--teacher", teacher, "--student", student, "--out", corrected)
    assert result.exit_code == 0, result.output
    assert read_stage(corrected, ("correct",))[0]["prompts"] == described

    run = tmp_path / "run"
    result = invoke(
        "distill", "--teacher", teacher, "--student", student, "--data", chats, "--dev-data", chats, "--out", run,
        "--loss", "sft=1,fkl=1", "--sgo-policy", "static", "--sgo-data", corrected, "--chat-turns", "all",
        "--batch-size", "3", "--max-steps", "1", "--max-length", "160", "--data-format-max-prompt-length", "128", "--eval-every", "0", "--save-every", "0",
        "--eval-rouge", "--eval-rouge-examples", "3", "--eval-sampling-max-new-tokens", "2",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run / "manifest.json").read_text())["prompts"] == described

    evaluated = tmp_path / "eval"
    result = invoke("evaluate", "--model", f"s={student}", "--data", chats, "--seeds", "1", "--max-new-tokens", "2", "--out", evaluated)
    assert result.exit_code == 0, result.output
    eval_manifest, eval_records = read_stage(evaluated, ("evaluate",))
    assert eval_manifest["prompts"] == {"s": described}
    assert {r["example_id"]: r["prompt"] for r in eval_records} == {r["example_id"]: r["prompt"] for r in records}

    # a stage reading another's output refuses a contradicting flag, another template, or a papers-rendered input
    one_line_error(invoke("generate", "--model", student, "--data", generated, "--chat-template", "off", "--out", tmp_path / "x"),
                   "--chat-template off contradicts", "gen")
    one_line_error(invoke("distill", "--teacher", teacher, "--student", student, "--data", chats, "--sgo-policy", "static",
                          "--sgo-data", corrected, "--chat-template", "off", "--loss", "sft=1,fkl=1", "--out", tmp_path / "y"), "--chat-template off")
    with pytest.raises(UsageError, match=r"chats.jsonl:1: .* 'plain' was rendered without a chat template"):
        resolve("auto", chat_tokenizer, load_examples(str(chats), DataConfig()), {"plain": PAPERS}, "m")
    one_line_error(invoke("distill", "--teacher", teacher, "--student", student, "--data", "dolly", "--chat-turns", "all",
                          "--loss", "sft=1", "--out", tmp_path / "u"), "--chat-turns all", "pass --chat-template on")
    other = tmp_path / "other"
    shutil.copytree(student, other)
    tokenizer = load_tokenizer(str(other))
    tokenizer.chat_template = TEMPLATE.replace("\n{{ m['content'] }}", " {{ m['content'] }}")
    tokenizer.save_pretrained(str(other))
    one_line_error(invoke("generate", "--model", other, "--data", generated, "--out", tmp_path / "w"), "another chat template")
