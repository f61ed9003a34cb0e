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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a stage directory's records (what a later stage actually reads)."""
    if path.is_dir():
        path = path / RECORDS
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
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


@dataclass
class StageWriter:
    """The output directory of one stage run; records are appended and fsynced as they are made."""

    out_dir: Path
    manifest: dict

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
    ) -> "StageWriter":
        """Start, resume or (with `overwrite`) restart the stage in `out_dir`.

        Refuses a directory holding another stage's artifacts, unrelated files, a complete
        run (unless `overwrite`) or a run started with a different config.
        """
        out_dir = Path(out_dir)
        existing = _read_manifest_if_any(out_dir)
        if existing is None and out_dir.exists() and any(out_dir.iterdir()):
            raise UsageError(f"output directory '{out_dir}' is not empty and holds no mgsr manifest; choose another --out")
        if existing is not None:
            if existing.get("stage") != stage:
                raise UsageError(
                    f"output directory '{out_dir}' holds '{existing.get('stage')}' artifacts, not '{stage}'; choose another --out"
                )
            if overwrite:
                shutil.rmtree(out_dir)
            elif existing.get("status") == "complete":
                raise UsageError(f"output directory '{out_dir}' already holds a complete '{stage}' run; pass --overwrite to redo it")
            elif existing.get("config") != config:
                raise UsageError(
                    f"output directory '{out_dir}' holds an unfinished '{stage}' run with a different config; "
                    "re-run with the same options to resume, or pass --overwrite"
                )
            else:
                writer = cls(out_dir, existing)
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
            "records": records_name,
            "record_count": 0,
            "start_time": _now(),
            "end_time": None,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / MANIFEST, manifest)
        (out_dir / records_name).touch()
        return cls(out_dir, manifest)

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
        return {record["id"] for record in iter_records(self.records_path)}

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not lines:
            return
        with open(self.records_path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def complete(self, **extra: Any) -> None:
        """Mark the run complete; `extra` (e.g. a summary) is stored in the manifest."""
        self.manifest.update(extra)
        self.manifest["record_count"] = sum(1 for _ in iter_records(self.records_path))
        self.manifest["status"] = "complete"
        self.manifest["end_time"] = _now()
        atomic_write_json(self.out_dir / MANIFEST, self.manifest)


def _read_manifest_if_any(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UsageError(f"'{path}' is not valid JSON; the directory is damaged, choose another --out") from None


def iter_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def is_stage_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).exists()


def is_complete(path: Path) -> bool:
    """Whether `path` holds a finished stage output (what a resumable pipeline may reuse)."""
    manifest = _read_manifest_if_any(path)
    return manifest is not None and manifest.get("status") == "complete"


def read_stage(path: Path, stages: tuple[str, ...], tokenizer: str | None = None) -> tuple[dict, list[dict]]:
    """The manifest and records of a complete stage output, checked before a later stage uses them."""
    return read_manifest(path, stages, tokenizer), list(iter_records(path / RECORDS))


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
