"""Fresh-interpreter runs for the training benchmarks: one measured configuration per process.

A fresh process keeps one run's allocations, caches and thread pools out of the next, and its
peak resident set (ru_maxrss from wait4, what `/usr/bin/time -v` reports) is that run's alone.
The parent stays torch-free; the child prints its result as one RESULT_PREFIX line on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH-RESULT "


def emit_result(result: dict) -> None:
    """Child side: hand `result` to the parent (the last line it reads is the one it takes)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str | Path, mode: str, payload, label: str, log_path: Path, emits_result: bool = True) -> dict:
    """Run `script mode <payload as JSON>` in a fresh interpreter, its stderr appended to `log_path`.

    Returns what the child emitted plus its peak RSS as `maxrss_mib` (a setup step that emits
    nothing passes emits_result=False and gets only that)."""
    environment = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(Path(script).resolve()), mode, json.dumps(payload)]
    with open(log_path, "a") as log:
        log.write(f"\n=== {label} {time.strftime('%H:%M:%S')}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=environment)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{label} failed with exit code {code}; see {log_path}")
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if emits_result and not lines:
        raise SystemExit(f"{label} printed no result; see {log_path}")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else {}
    return {**result, "maxrss_mib": usage.ru_maxrss / 1024}
