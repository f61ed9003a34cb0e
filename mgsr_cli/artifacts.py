"""Stage outputs on disk: `manifest.json` + `records.jsonl`, written atomically and resumable.

A stage directory is either being written (`status: running`) or complete. A crash leaves a
running manifest and a records file whose last line may be cut short; re-running the same
stage with the same config drops the cut line and continues after the last whole record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgsr_cli import __version__
from mgsr_cli.errors import UsageError

MANIFEST = "manifest.json"
RECORDS = "records.jsonl"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sha256_of(path: Path) -> str:
    """sha256 of a file, of a stage directory's records, or of a data directory's files in the order
    they are read (what a later stage actually reads)."""
    from mgsr_cli.data import DATA_SUFFIXES

    if path.is_dir():
        files = [path / RECORDS] if (path / MANIFEST).exists() else sorted(p for p in path.iterdir() if p.name.endswith(DATA_SUFFIXES))
    else:
        files = [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def describe_input(path_or_name: str, resolved: Path | None) -> dict:
    """What the manifest says about one input: the name given, the file read and its hash."""
    if resolved is None:  # a hub id: nothing on disk to hash
        return {"name": path_or_name}
    return {"name": path_or_name, "path": str(resolved), "sha256": sha256_of(resolved)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


LOCK = ".mgsr.lock"


def _is_leftover(path: Path) -> bool:
    """What a crash can leave behind: temp files of atomic writes and half-written directories."""
    return path.name == LOCK or (path.name.startswith(".") and path.name.endswith(".tmp")) or path.name.startswith(".tmp-")


def clean_leftovers(out_dir: Path) -> None:
    """Remove crash leftovers (never the lock, which the caller holds)."""
    for path in [*out_dir.glob(".*"), *out_dir.glob("checkpoints/.tmp-*")]:
        if _is_leftover(path) and path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def check_separate(out_dir: Path, inputs: Iterable[str | Path]) -> None:
    """`--out` may never be, contain or lie inside an input: --overwrite would delete it."""
    out = Path(out_dir).expanduser().resolve()
    for name in inputs:
        path = Path(name).expanduser()
        if not path.exists():
            continue
        path = path.resolve()
        if out == path or out in path.parents or path in out.parents:
            relation = "is" if out == path else ("contains" if out in path.parents else "lies inside")
            raise UsageError(f"--out '{out_dir}' {relation} the input '{name}'; choose an output directory apart from every input")


def lock_output(out_dir: Path):
    """An exclusive lock on `out_dir` for this process's lifetime (the kernel drops it on a crash)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out_dir / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(f"output directory '{out_dir}' is being written by another mgsr run; wait for it or choose another --out") from None
    _HELD.append(lock)
    return lock


_HELD: list = []


def release_locks() -> None:
    """Drop every output lock this process holds (a command ended, also by an error)."""
    while _HELD:
        _HELD.pop().release()


def make_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out '{out_dir}' is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def _refuse_foreign(out_dir: Path, existing: dict | None, stage: str) -> None:
    if existing is None and out_dir.is_dir() and any(not _is_leftover(path) for path in out_dir.iterdir()):
        raise UsageError(f"output directory '{out_dir}' is not empty and holds no mgsr manifest; choose another --out")
    if existing is not None and existing.get("stage") != stage:
        raise UsageError(f"output directory '{out_dir}' holds '{existing.get('stage')}' artifacts, not '{stage}'; choose another --out")


def _empty_dir(out_dir: Path) -> None:
    """Everything but the lock (removing a held lock file would let a second writer in)."""
    for path in out_dir.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@dataclass
class StageWriter:
    """The output directory of one stage run; records are appended and fsynced as they are made.

    The writer holds an exclusive lock on the directory until `complete()` (or the process ends).
    """

    out_dir: Path
    manifest: dict
    lock: Any = None

    @classmethod
    def open(
        cls,
        out_dir: Path,
        stage: str,
        config: dict,
        inputs: dict[str, dict],
        models: dict[str, str],
        tokenizer: str | None,
        overwrite: bool = False,
        records_name: str = RECORDS,
        progress: bool | None = None,
        prompts: dict | None = None,
    ) -> "StageWriter":
        """Start, resume or (with `overwrite`) restart the stage in `out_dir`.

        Refuses an output that is, contains or lies inside an input, a directory holding another
        stage's artifacts, unrelated files, a complete run (unless `overwrite`) or a run started
        with a different config. `progress` says whether the unfinished run holds anything worth
        resuming (default: whether it has records); a run without is started afresh. `prompts` says
        how the prompts were rendered (chat.Rendering.describe), for the stages that read them.
        """
        out_dir = Path(out_dir)
        check_separate(out_dir, [entry["path"] for entry in inputs.values() if "path" in entry] + list(models.values()))
        _refuse_foreign(out_dir, _read_manifest_if_any(out_dir) if out_dir.is_dir() else None, stage)
        make_output_dir(out_dir)
        lock = lock_output(out_dir)
        try:
            existing = _read_manifest_if_any(out_dir)
            _refuse_foreign(out_dir, existing, stage)
            clean_leftovers(out_dir)
            if existing is not None:
                if progress is None:
                    progress = _has_records(out_dir / existing.get("records", records_name))
                if overwrite or (existing.get("status") != "complete" and not progress):
                    _empty_dir(out_dir)
                elif existing.get("status") == "complete":
                    raise UsageError(f"output directory '{out_dir}' already holds a complete '{stage}' run; pass --overwrite to redo it")
                elif existing.get("config") != config:
                    raise UsageError(
                        f"output directory '{out_dir}' holds an unfinished '{stage}' run with a different config; "
                        "re-run with the same options to resume, or pass --overwrite"
                    )
                else:
                    writer = cls(out_dir, existing, lock)
                    writer._drop_partial_last_line()
                    return writer
            manifest = {
                "stage": stage,
                "tool_version": __version__,
                "status": "running",
                "config": config,
                "inputs": inputs,
                "models": models,
                "tokenizer": tokenizer,
                **({"prompts": prompts} if prompts is not None else {}),
                "records": records_name,
                "record_count": 0,
                "start_time": _now(),
                "end_time": None,
            }
            atomic_write_json(out_dir / MANIFEST, manifest)
            (out_dir / records_name).touch()
        except BaseException:
            lock.release()
            raise
        return cls(out_dir, manifest, lock)

    @property
    def records_path(self) -> Path:
        return self.out_dir / self.manifest.get("records", RECORDS)

    def _drop_partial_last_line(self) -> None:
        """A crash mid-append can leave half a line: cut the file back to its last newline."""
        data = self.records_path.read_bytes() if self.records_path.exists() else b""
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.records_path, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())

    def done_ids(self) -> set[str]:
        """Ids of the records already written (what a resumed run skips)."""
        if not self.records_path.exists():
            return set()
        return {record["id"] for record in iter_records(self.records_path)}

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not lines:
            return
        try:
            with open(self.records_path, "a", encoding="utf-8") as handle:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(self.records_path)) from None

    def rewrite(self, records: list[dict]) -> None:
        """Replace the records (e.g. metrics after the checkpoint a run resumes from)."""
        atomic_write_text(self.records_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))

    def complete(self, **extra: Any) -> None:
        """Mark the run complete; `extra` (e.g. a summary) is stored in the manifest."""
        self.manifest.update(extra)
        self.manifest["record_count"] = sum(1 for _ in iter_records(self.records_path))
        self.manifest["records_sha256"] = sha256_of(self.records_path)
        self.manifest["status"] = "complete"
        self.manifest["end_time"] = _now()
        atomic_write_json(self.out_dir / MANIFEST, self.manifest)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            if self.lock in _HELD:
                _HELD.remove(self.lock)
            self.lock = None


def _has_records(path: Path) -> bool:
    return path.exists() and b"\n" in path.read_bytes()


def _read_manifest_if_any(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"'{path}' is not valid JSON; the directory is damaged, choose another --out") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"'{path}' is not an mgsr manifest (a JSON {type(manifest).__name__}, not an object)")
    return manifest


def iter_records(path: Path) -> Iterator[dict]:
    """The records of a stage's JSONL file; a damaged line is a one-line error naming file and line."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"records file '{path}' is missing; the stage output is damaged, re-run that stage") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise UsageError(f"{path}:{number}: not UTF-8 text (mgsr reads UTF-8 only)") from None
            except json.JSONDecodeError as error:
                cut = "" if raw.endswith(b"\n") else " (the line is cut short)"
                raise UsageError(f"{path}:{number}: malformed JSON{cut} ({error.msg})") from None
            if not isinstance(record, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield record


def is_stage_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).exists()


def is_complete(path: Path) -> bool:
    """Whether `path` holds a finished stage output (what a resumable pipeline may reuse)."""
    manifest = _read_manifest_if_any(path)
    return manifest is not None and manifest.get("status") == "complete"


def read_stage(
    path: Path, stages: tuple[str, ...], tokenizer: str | None = None, vocab_size: int | None = None
) -> tuple[dict, list[dict]]:
    """The manifest and records of a complete stage output, checked before a later stage uses them:
    the records' count and hash against the manifest, and (with `vocab_size`) every record's
    token ids."""
    manifest = read_manifest(path, stages, tokenizer)
    records_path = Path(path) / manifest.get("records", RECORDS)
    records = list(iter_records(records_path))
    if len(records) != manifest.get("record_count"):
        raise UsageError(
            f"'{records_path}' holds {len(records)} records but its manifest says {manifest.get('record_count')}; "
            "the output was changed after it was written, re-run that stage"
        )
    if "records_sha256" in manifest and sha256_of(records_path) != manifest["records_sha256"]:
        raise UsageError(f"'{records_path}' does not match the sha256 in its manifest; the records were changed, re-run that stage")
    if vocab_size is not None:
        for number, record in enumerate(records, 1):
            check_token_record(record, f"{records_path}:{number}", vocab_size)
    return manifest, records


def check_token_record(record: dict, where: str, vocab_size: int) -> None:
    """A generate/correct record's fields a later stage reads: an id and token ids in range."""
    if not isinstance(record.get("id"), str) or not isinstance(record.get("example_id", ""), str):
        raise UsageError(f"{where}: field 'id' must be a string, got {record.get('id')!r}")
    for name in ("prompt_ids", "response_ids"):
        ids = record.get(name)
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise UsageError(f"{where}: field '{name}' must be a list of token ids, got {str(ids)[:40]}")
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise UsageError(f"{where}: field '{name}' holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    if not record["prompt_ids"]:
        raise UsageError(f"{where}: field 'prompt_ids' is empty")


def read_manifest(path: Path, stages: tuple[str, ...], tokenizer: str | None = None) -> dict:
    """The manifest of a complete output of one of `stages` (a one-line UsageError otherwise).

    `tokenizer` is the consumer's tokenizer fingerprint: token ids are only meaningful under
    the tokenizer that made them.
    """
    manifest = _read_manifest_if_any(path)
    if manifest is None:
        raise UsageError(f"'{path}' is not an mgsr stage output (no {MANIFEST})")
    if manifest.get("stage") not in stages:
        raise UsageError(f"'{path}' holds '{manifest.get('stage')}' artifacts; expected {' or '.join(stages)}")
    if manifest.get("status") != "complete":
        raise UsageError(f"'{path}' is an unfinished '{manifest['stage']}' run; re-run that stage to complete it first")
    if tokenizer is not None and manifest.get("tokenizer") not in (None, tokenizer):
        raise UsageError(
            f"'{path}' was made with a different tokenizer (vocabulary {manifest.get('tokenizer')}, "
            f"this model's is {tokenizer}); its token ids cannot be reused"
        )
    return manifest
