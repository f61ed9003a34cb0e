"""Bad input across the four stages, as a table: each case must end in a non-zero exit, a last
stderr line `error: ...` naming the culprit, no traceback and no complete-looking output."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from mgsr_cli.cli import app

from .conftest import write_jsonl

runner = CliRunner()
GOOD_ROW = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


@dataclass
class Workspace:
    teacher: Path
    student: Path
    data: Path
    generated: Path
    root: Path

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def rows(self, name: str, *rows: dict) -> Path:
        return write_jsonl(self.root / name, [*rows])

    def stage_copy(self, name: str, edit: Callable[[Path], None]) -> Path:
        """A copy of the complete generate output, then damaged by `edit`."""
        target = self.root / name
        shutil.copytree(self.generated, target)
        edit(target)
        return target

    def dev_dir(self) -> Path:
        """A data directory (one JSONL file) to use as --dev-data."""
        return self.file("devset/dev.jsonl", json.dumps(GOOD_ROW) + "\n").parent

    def broken_model(self, name: str, weights: bytes) -> Path:
        target = self.root / name
        shutil.copytree(self.student, target)
        (target / "model.safetensors").write_bytes(weights)
        return target


@pytest.fixture(scope="module")
def workspace(tiny_pair, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("bad")
    data = write_jsonl(root / "good.jsonl", [dict(GOOD_ROW, id=str(index)) for index in range(3)])
    generated = root / "generated"
    result = runner.invoke(app, ["generate", "--model", str(tiny_pair[1]), "--data", str(data), "--max-new-tokens", "3", "--out", str(generated)])
    assert result.exit_code == 0, result.output
    return Workspace(tiny_pair[0], tiny_pair[1], data, generated, root)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


def _write_records(path: Path, records: list[dict], fix_manifest: bool) -> None:
    (path / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if fix_manifest:  # a hand-edited output whose manifest was edited to match
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["record_count"] = len(records)
        manifest.pop("records_sha256", None)
        (path / "manifest.json").write_text(json.dumps(manifest))


def _edit_first(key: str, value) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        records = _records(path)
        records[0][key] = value
        _write_records(path, records, fix_manifest=True)

    return edit


def _drop_a_line(path: Path) -> None:
    _write_records(path, _records(path)[:-1], fix_manifest=False)


def _change_a_response(path: Path) -> None:
    records = _records(path)
    records[0]["response_ids"] = records[0]["response_ids"][:-1] or [11]
    _write_records(path, records, fix_manifest=False)


def _cut_last_line(path: Path) -> None:
    text = (path / "records.jsonl").read_text()
    (path / "records.jsonl").write_text(text[: -len(text.splitlines()[-1]) // 2])


def _manifest(content: str) -> Callable[[Path], None]:
    return lambda path: (path / "manifest.json").write_text(content)


def _status(status: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["status"] = status
        (path / "manifest.json").write_text(json.dumps(manifest))

    return edit


GZIP = gzip.compress(json.dumps(GOOD_ROW).encode() + b"\n")


def generate(*extra, data=None):
    return lambda w, out: ["generate", "--model", w.student, "--data", data(w) if data else w.data, "--out", out, "--max-new-tokens", "2", *extra]


def generate_with(data: Callable[[Workspace], Path], *extra):
    return generate(*extra, data=data)


def generate_model(model: Callable[[Workspace], Path]):
    return lambda w, out: ["generate", "--model", model(w), "--data", w.data, "--out", out, "--max-new-tokens", "2"]


def generate_out(out_of: Callable[[Workspace], Path]):
    return lambda w, out: ["generate", "--model", w.student, "--data", w.data, "--out", out_of(w), "--max-new-tokens", "2"]


def correct(*extra, input=None):
    return lambda w, out: ["correct", "--input", input(w) if input else w.generated, "--teacher", w.teacher, "--student", w.student, "--out", out, *extra]


def correct_out(out_of: Callable[[Workspace], Path]):
    return lambda w, out: ["correct", "--input", w.generated, "--teacher", w.teacher, "--student", w.student, "--out", out_of(w)]


def distill(*extra, data=None, student=None):
    def args(w, out):
        return ["distill", "--teacher", w.teacher, "--student", student(w) if student else w.student, "--out", out,
                "--data", data(w) if data else w.data, "--dev-data", "", "--max-steps", "1", "--batch-size", "1", *extra]

    return args


def distill_recipe(content: bytes | str | None, *extra, name="recipe.yaml"):
    def args(w, out):
        recipe = w.file(name, content) if content is not None else w.root
        return ["distill", "--teacher", w.teacher, "--student", w.student, "--out", out, "--recipe", recipe, *extra]

    return args


def evaluate(*extra, data=None, model=None):
    return lambda w, out: ["evaluate", "--model", model(w) if model else w.student, "--data", data(w) if data else w.data,
                           "--out", out, "--max-new-tokens", "2", "--seeds", "10", *extra]


def rows(*rows: dict, name=None):
    counter = iter(range(10**6))
    return lambda w: w.rows(name or f"rows-{id(rows)}-{next(counter)}.jsonl", *rows)


def raw(content: bytes | str, name: str):
    return lambda w: w.file(name, content)


CASES = [
    # ---------------------------------------------------------------- generate: flags
    ("gen-batch-size-negative", generate("--batch-size", "-1"), "--batch-size"),
    ("gen-batch-size-zero", generate("--batch-size", "0"), "--batch-size"),
    ("gen-batch-size-text", generate("--batch-size", "abc"), "--batch-size"),
    ("gen-num-samples-zero", generate("--num-samples", "0"), "--num-samples"),
    ("gen-limit-zero", generate("--limit", "0"), "--limit"),
    ("gen-limit-negative", generate("--limit", "-5"), "--limit"),
    ("gen-temperature-negative", generate("--temperature", "-1"), "--temperature"),
    ("gen-top-p-above-one", generate("--top-p", "2"), "--top-p"),
    ("gen-top-p-zero", generate("--top-p", "0"), "--top-p"),
    ("gen-top-k-negative", generate("--top-k", "-5"), "--top-k"),
    ("gen-max-new-tokens-zero", generate("--max-new-tokens", "0"), "--max-new-tokens"),
    ("gen-max-new-tokens-negative", generate("--max-new-tokens", "-1"), "--max-new-tokens"),
    ("gen-max-length-below-prompt-limit", generate("--max-length", "100"), "--max-length"),
    ("gen-max-prompt-length-zero", generate("--max-prompt-length", "0"), "--max-prompt-length"),
    ("gen-device-meta", generate("--device", "meta"), "--device"),
    ("gen-device-bogus", generate("--device", "bogus"), "--device"),
    ("gen-device-cuda-without-cuda", generate("--device", "cuda:7"), "--device"),
    ("gen-dtype-unknown", generate("--dtype", "float8"), "--dtype"),
    ("gen-seed-text", generate("--seed", "x"), "--seed"),
    # ---------------------------------------------------------------- generate: data
    ("gen-data-missing", generate_with(lambda w: w.root / "absent.jsonl"), "absent.jsonl"),
    ("gen-data-binary", generate_with(raw(b"\x00\xff\xfe\x80garbage\n", "binary.jsonl")), "UTF-8"),
    ("gen-data-utf16", generate_with(raw(json.dumps(GOOD_ROW).encode("utf-16"), "utf16.jsonl")), "UTF-16"),
    ("gen-data-latin1", generate_with(raw('{"instruction": "caf\xe9"}\n'.encode("latin-1"), "latin1.jsonl")), "latin1.jsonl:1"),
    ("gen-data-gzip-truncated", generate_with(raw(GZIP[:-10], "cut.jsonl.gz")), "gzip"),
    ("gen-data-gzip-named-plain", generate_with(raw(gzip.compress(b'{"instruction": 5}\n'), "packed.jsonl")), "'instruction'"),
    ("gen-data-instruction-number", generate_with(rows({"instruction": 5})), "'instruction'"),
    ("gen-data-instruction-list", generate_with(rows({"instruction": ["a", "b"]})), "'instruction'"),
    ("gen-data-instruction-null", generate_with(rows({"instruction": None})), "'instruction'"),
    ("gen-data-instruction-empty", generate_with(rows({"instruction": ""})), "'instruction' is empty"),
    ("gen-data-instruction-blank", generate_with(rows(GOOD_ROW, {"instruction": "   "})), ":2: field 'instruction'"),
    ("gen-data-input-number", generate_with(rows({"instruction": "a", "input": 5})), "'input'"),
    ("gen-data-context-dict", generate_with(rows({"instruction": "a", "context": {"k": 1}})), "'context'"),
    ("gen-data-output-number", generate_with(rows({"instruction": "a", "output": 5})), "'output'"),
    ("gen-data-output-empty-in-list", generate_with(rows({"instruction": "a", "output": ["x", ""]})), "'output' is empty"),
    ("gen-data-prompt-number", generate_with(rows({"prompt": 5})), "'prompt'"),
    ("gen-data-prompt-empty", generate_with(rows({"prompt": ""})), "'prompt' is empty"),
    ("gen-data-id-list", generate_with(rows({"id": [1], "instruction": "a"})), "'id'"),
    ("gen-data-missing-field", generate_with(rows({"question": "x"})), "missing field 'instruction'"),
    ("gen-data-row-not-object", generate_with(raw("[1, 2]\n", "array.jsonl")), "expected a JSON object"),
    ("gen-data-malformed-json", generate_with(raw('{"instruction": "a"}\n{broken\n', "broken.jsonl")), "broken.jsonl:2"),
    ("gen-data-cut-mid-line", generate_with(raw('{"instruction": "a"}\n{"instruction": "b', "cut.jsonl")), "cut short"),
    ("gen-data-empty-file", generate_with(raw("", "empty.jsonl")), "holds no examples"),
    ("gen-data-dir-without-files", generate_with(lambda w: (w.root / "nothing").mkdir(exist_ok=True) or w.root / "nothing"), "holds no"),
    ("gen-data-unknown-format", generate_with(raw("hello", "notes.txt")), "notes.txt"),
    ("gen-data-stage-lines-removed", generate_with(lambda w: w.stage_copy("gd-short", _drop_a_line)), "manifest says"),
    ("gen-data-stage-manifest-list", generate_with(lambda w: w.stage_copy("gd-list", _manifest("[]"))), "not an mgsr manifest"),
    ("gen-data-stage-records-missing", generate_with(lambda w: w.stage_copy("gd-none", lambda p: (p / "records.jsonl").unlink())), "missing"),
    ("gen-data-stage-unfinished", generate_with(lambda w: w.stage_copy("gd-running", _status("running"))), "unfinished"),
    # ---------------------------------------------------------------- generate: models and output
    ("gen-model-missing", generate_model(lambda w: w.root / "no-such-model"), "no-such-model"),
    ("gen-model-corrupted-weights", generate_model(lambda w: w.broken_model("garbled", b"\x00" * 64)), "garbled"),
    ("gen-model-truncated-weights", generate_model(
        lambda w: w.broken_model("truncated", (w.student / "model.safetensors").read_bytes()[:5000])), "truncated"),
    ("gen-out-is-a-file", generate_out(lambda w: w.file("plain.txt", "x")), "plain.txt"),
    ("gen-out-under-a-file", generate_out(lambda w: w.file("plain2.txt", "x") / "sub"), "plain2.txt"),
    ("gen-out-is-the-data", generate_out(lambda w: w.data), "is the input"),
    ("gen-out-is-the-model", generate_out(lambda w: w.student), "is the input"),
    ("gen-out-contains-the-data", generate_out(lambda w: w.root), "contains the input"),
    ("gen-out-foreign-dir", generate_out(lambda w: w.file("foreign/notes.txt", "mine").parent), "holds no mgsr manifest"),
    ("gen-out-other-stage", generate_out(lambda w: w.stage_copy("gd-evaluate", _manifest('{"stage": "evaluate", "status": "complete"}'))),
     "holds 'evaluate' artifacts"),
    ("gen-out-complete-run", generate_out(lambda w: w.stage_copy("gd-complete", lambda p: None)), "--overwrite"),
    # ---------------------------------------------------------------- correct
    ("cor-rounds-zero", correct("--rounds", "0"), "--rounds"),
    ("cor-batch-size-zero", correct("--batch-size", "0"), "--batch-size"),
    ("cor-divergence-unknown", correct("--divergence", "kl2"), "--divergence"),
    ("cor-teacher-token-unknown", correct("--teacher-token", "best"), "--teacher-token"),
    ("cor-temperature-negative", correct("--temperature", "-1"), "--temperature"),
    ("cor-top-p-above-one", correct("--top-p", "1.5"), "--top-p"),
    ("cor-top-k-negative", correct("--top-k", "-1"), "--top-k"),
    ("cor-max-new-tokens-zero", correct("--max-new-tokens", "0"), "--max-new-tokens"),
    ("cor-device-meta", correct("--device", "meta"), "--device"),
    ("cor-input-not-a-stage", correct(input=lambda w: w.root / "nothing"), "not an mgsr stage output"),
    ("cor-input-lines-removed", correct(input=lambda w: w.stage_copy("c-short", _drop_a_line)), "manifest says"),
    ("cor-input-record-changed", correct(input=lambda w: w.stage_copy("c-changed", _change_a_response)), "sha256"),
    ("cor-input-manifest-list", correct(input=lambda w: w.stage_copy("c-list", _manifest("[]"))), "not an mgsr manifest"),
    ("cor-input-manifest-garbage", correct(input=lambda w: w.stage_copy("c-garbage", _manifest("{nope"))), "not valid JSON"),
    ("cor-input-records-missing", correct(input=lambda w: w.stage_copy("c-none", lambda p: (p / "records.jsonl").unlink())), "missing"),
    ("cor-input-unfinished", correct(input=lambda w: w.stage_copy("c-running", _status("running"))), "unfinished"),
    ("cor-input-cut-mid-line", correct(input=lambda w: w.stage_copy("c-cut", _cut_last_line)), "cut short"),
    ("cor-input-token-out-of-range", correct(input=lambda w: w.stage_copy("c-range", _edit_first("response_ids", [10**6]))),
     "outside the vocabulary"),
    ("cor-input-token-negative", correct(input=lambda w: w.stage_copy("c-negative", _edit_first("prompt_ids", [-1]))), "'prompt_ids'"),
    ("cor-input-prompt-ids-text", correct(input=lambda w: w.stage_copy("c-type", _edit_first("prompt_ids", "abc"))), "'prompt_ids'"),
    ("cor-input-prompt-ids-floats", correct(input=lambda w: w.stage_copy("c-float", _edit_first("prompt_ids", [1.5]))), "'prompt_ids'"),
    ("cor-input-evaluate-stage", correct(input=lambda w: w.stage_copy("c-eval", _manifest('{"stage": "evaluate", "status": "complete"}'))),
     "expected generate or correct"),
    ("cor-out-is-the-input", correct_out(lambda w: w.generated), "is the input"),
    ("cor-out-inside-the-input", correct_out(lambda w: w.generated / "sub"), "lies inside"),
    ("cor-student-missing", lambda w, out: ["correct", "--input", w.generated, "--teacher", w.teacher, "--student", w.root / "nope",
                                            "--out", out], "nope"),
    # ---------------------------------------------------------------- distill
    ("dis-lr-negative", distill("--lr", "-1"), "--lr"),
    ("dis-lr-text", distill("--lr", "fast"), "--lr"),
    ("dis-batch-size-negative", distill("--batch-size", "-1"), "--batch-size"),
    ("dis-grad-accum-zero", distill("--grad-accum", "0"), "--grad-accum"),
    ("dis-grad-accum-uneven", distill("--batch-size", "3", "--grad-accum", "2"), "--grad-accum"),
    ("dis-chunk-size-zero", distill("--chunk-size", "0"), "--chunk-size"),
    ("dis-max-length-below-prompt-limit", distill("--max-length", "128"), "--max-length"),
    ("dis-temperature-zero", distill("--temperature", "0"), "--temperature"),
    ("dis-max-steps-zero", distill("--max-steps", "0"), "--max-steps"),
    ("dis-theta-init-above-one", distill("--theta-init", "2"), "--theta-init"),
    ("dis-keep-checkpoints-zero", distill("--keep-checkpoints", "0"), "--keep-checkpoints"),
    ("dis-lora-dropout-one", distill("--lora-dropout", "1"), "--lora-dropout"),
    ("dis-device-cuda-without-cuda", distill("--device", "cuda"), "--device"),
    ("dis-device-bogus", distill("--device", "bogus"), "--device"),
    ("dis-device-meta", distill("--device", "meta"), "--device"),
    ("dis-span-pairs-unknown", distill("--span-pairs", "some"), "--span-pairs"),
    ("dis-sgo-policy-unknown", distill("--sgo-policy", "sometimes"), "sgo_policy"),
    ("dis-static-without-data", distill("--sgo-policy", "static"), "--sgo-data"),
    ("dis-loss-option-malformed", distill("--loss-option", "novalue"), "--loss-option"),
    ("dis-data-instruction-number", distill(data=rows({"instruction": 5, "output": "x"})), "'instruction'"),
    ("dis-data-output-number", distill(data=rows({"instruction": "a", "output": 7})), "'output'"),
    ("dis-data-missing", distill(data=lambda w: w.root / "absent.jsonl"), "absent.jsonl"),
    ("dis-student-corrupted-weights", distill(student=lambda w: w.broken_model("dis-garbled", b"\x01" * 128)), "dis-garbled"),
    ("dis-out-is-the-student", lambda w, out: distill()(w, w.student), "is the input"),
    ("dis-out-inside-the-dev-data", lambda w, out: distill("--dev-data", w.dev_dir())(w, w.dev_dir() / "run"), "lies inside the input"),
    ("dis-out-inside-the-sgo-data", lambda w, out: distill("--sgo-policy", "static", "--sgo-data", w.generated)(w, w.generated / "run"),
     "lies inside the input"),
    ("dis-recipe-unknown", lambda w, out: distill("--recipe", "nope")(w, out), "unknown recipe 'nope'"),
    ("dis-recipe-directory", distill_recipe(None), "is a directory"),
    ("dis-recipe-binary", distill_recipe(b"\x00\xff\xfe\x81", name="binary.yaml"), "not UTF-8"),
    ("dis-recipe-lr-negative", distill_recipe("lr: -1\n", name="neg.yaml"), "lr"),
    ("dis-recipe-unknown-key", distill_recipe("learning_rate: 0.1\n", name="key.yaml"), "unknown key 'learning_rate'"),
    ("dis-recipe-list", distill_recipe("- 1\n- 2\n", name="list.yaml"), "expected a mapping"),
    ("dis-recipe-invalid-yaml", distill_recipe("loss: [unclosed\n", name="bad.yaml"), "not valid YAML"),
    ("dis-recipe-bad-choice", distill_recipe("span_pairs: some\n", name="choice.yaml"), "span_pairs"),
    ("dis-recipe-max-length", distill_recipe("max_length: 64\n", name="len.yaml"), "max_length"),
    ("dis-recipe-nested-range", distill_recipe("sgo_sampling:\n  top_p: 3\n", name="nested.yaml"), "sgo_sampling.top_p"),
    # ---------------------------------------------------------------- evaluate
    ("eval-seeds-repeated", evaluate("--seeds", "10,10"), "--seeds"),
    ("eval-seeds-empty", evaluate("--seeds", ""), "--seeds"),
    ("eval-seeds-text", evaluate("--seeds", "a,b"), "--seeds"),
    ("eval-limit-zero", evaluate("--limit", "0"), "--limit"),
    ("eval-batch-size-zero", evaluate("--batch-size", "0"), "--batch-size"),
    ("eval-top-k-negative", evaluate("--top-k", "-1"), "--top-k"),
    ("eval-device-bogus", evaluate("--device", "bogus"), "--device"),
    ("eval-data-without-references", evaluate(data=rows({"instruction": "a"})), "reference"),
    ("eval-data-reference-number", evaluate(data=rows({"instruction": "a", "output": 5})), "'output'"),
    ("eval-data-instruction-null", evaluate(data=rows({"instruction": None, "output": "x"})), "'instruction'"),
    ("eval-model-missing", evaluate(model=lambda w: w.root / "gone"), "gone"),
    ("eval-model-corrupted-weights", evaluate(model=lambda w: w.broken_model("eval-garbled", b"\x02" * 64)), "eval-garbled"),
    ("eval-two-models-one-label", lambda w, out: evaluate("--model", f"x={w.student}", model=lambda w: f"x={w.teacher}")(w, out), "labelled"),
    ("eval-out-is-the-data", lambda w, out: evaluate()(w, w.data), "is the input"),
]


def test_the_table_is_large_enough():
    assert len(CASES) >= 80
    assert len({name for name, *_ in CASES}) == len(CASES)
    assert {name.split("-")[0] for name, *_ in CASES} == {"gen", "cor", "dis", "eval"}


@pytest.mark.parametrize("name, args, culprit", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_naming_the_culprit(workspace, tmp_path, name, args, culprit):
    out = tmp_path / "out"
    argv = [str(arg) for arg in args(workspace, out)]
    out = Path(argv[argv.index("--out") + 1])
    before = _state(out)
    result = runner.invoke(app, argv)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert culprit in lines[-1], lines[-1]
    assert _state(out) == before or not _looks_complete(out), "a refused run must not leave a complete-looking output"


def _state(path: Path):
    manifest = path / "manifest.json"
    return manifest.read_bytes() if manifest.is_file() else None


def _looks_complete(out: Path) -> bool:
    try:
        complete = json.loads((out / "manifest.json").read_text()).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        complete = False
    return complete or (out / "student").exists() or (out / "report.json").exists()


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.EACCES, "Permission denied"), (errno.ENOSPC, "disk is full")])
def test_os_errors_on_the_output_are_one_line(workspace, tmp_path, monkeypatch, code, words):
    """Read-only, forbidden and full disks (simulated: this suite may run as root)."""
    import os

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    out = tmp_path / "out"
    result = runner.invoke(app, generate()(workspace, out) and [str(a) for a in generate()(workspace, out)])
    assert result.exit_code == 2
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: cannot access") and words in last and str(out) in last, last
    assert not _looks_complete(out)


def test_a_failure_before_the_first_record_leaves_nothing_a_corrected_rerun_refuses(workspace, tmp_path):
    out = tmp_path / "eval"
    broken = workspace.broken_model("rerun-garbled", b"\x03" * 64)
    failed = runner.invoke(app, [str(a) for a in evaluate(model=lambda w: broken)(workspace, out)])
    assert failed.exit_code == 2
    corrected = runner.invoke(app, [str(a) for a in evaluate()(workspace, out)])
    assert corrected.exit_code == 0, corrected.output
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_shipped_recipe_name_is_never_shadowed_by_a_directory(workspace, tmp_path, monkeypatch):
    from mgsr_cli.config_loading import recipe_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "kd").mkdir()
    assert recipe_path("kd").name == "kd.yaml" and recipe_path("kd").is_file()


def test_help_shows_types_and_choices():
    help_text = runner.invoke(app, ["distill", "--help"]).output
    assert "--lr" in help_text and "<float>" in help_text and "<int>" in help_text and "adjacent|all" in help_text
    assert "auto|float32|bfloat16|float16" in runner.invoke(app, ["generate", "--help"]).output
