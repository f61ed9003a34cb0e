"""The lab study (issues 8, 15): every recipe against the same teacher, at a scale a 2-core CPU can do.

    python experiments/lab.py --out experiments/results --readme README.md   # the CPU study
    python experiments/lab.py --out /tmp/lab-gpu --scale gpu      # larger models on one CUDA GPU
    python experiments/lab.py --out /tmp/lab --quick              # a pipeline check in a minute

Phases: train a byte-level BPE on Dolly train -> build a GPT-2 teacher and a smaller student over
it -> SFT both on Dolly (the teacher, and the student's "init" checkpoint) -> distill the init
student with each recipe and training seed -> evaluate every model with the section-6 protocol
on the five shipped sets -> score every model's fidelity to the teacher and check MGSR's mechanisms
(lab_evidence) -> write lab.md (the Table-1 layout, paired CIs), lab.png and lab.json from the run's
own artifacts. Each recipe keeps its own method settings; only the scale knobs in `LabScale` (lab_scale.py) are
set, identically for every recipe. Finished units (stage manifest `status: complete`) are reused,
so a re-run after a crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

if __package__ in (None, ""):  # run as `python experiments/lab.py`: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgsr_cli.artifacts import is_complete
from mgsr_cli.config import DistillConfig, EvaluateConfig, ModelLoading, SamplingConfig
from mgsr_cli.config_loading import load_recipe, override, recipe_path

from experiments.lab_scale import EVAL_SETS, QUICK, SCALES, LabScale

log = logging.getLogger("lab")

@dataclass(frozen=True)
class Unit:
    """One job of the study: an SFT or distill run, or an evaluation, with its output directory."""

    name: str
    kind: str  # "distill" | "evaluate"
    config: DistillConfig | EvaluateConfig
    out_dir: Path


@dataclass
class Timings:
    """Seconds per unit and wall seconds per phase, kept across re-runs in runs/timings.json."""

    path: Path
    units: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    invocations: int = 0
    commits: list[str] = field(default_factory=list)  # the code each invocation ran on

    @classmethod
    def load(cls, path: Path) -> "Timings":
        data = json.loads(path.read_text()) if path.exists() else {}
        return cls(path, data.get("units", {}), data.get("phases", {}), data.get("invocations", 0), data.get("commits", []))

    def save(self) -> None:
        from mgsr_cli.artifacts import atomic_write_json

        atomic_write_json(self.path, {"units": self.units, "phases": self.phases, "invocations": self.invocations, "commits": self.commits})

    @contextlib.contextmanager
    def phase(self, name: str):
        log.info("phase: %s", name)
        start = time.perf_counter()
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
        self.save()


# ---------------------------------------------------------------- running units


def run_unit(unit: Unit, log_path: Path) -> float:
    """Run one unit with its logs and progress bars in `log_path`; returns its wall seconds.

    A distill run left unfinished by a crash resumes from its checkpoint when it has one and
    restarts otherwise; its checkpoints are deleted once it is complete (they only serve resuming).
    """
    from mgsr_cli.checkpoints import latest_checkpoint
    from mgsr_cli.evaluate import run_evaluate
    from mgsr_cli.train import run_distill

    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as handle, contextlib.redirect_stderr(handle):  # rich follows sys.stderr
        if unit.kind == "distill":
            resume = latest_checkpoint(unit.out_dir) is not None
            run_distill(unit.config, unit.out_dir, resume=resume, overwrite=not resume and unit.out_dir.exists())
            shutil.rmtree(unit.out_dir / "checkpoints", ignore_errors=True)
        else:
            run_evaluate(unit.config, unit.out_dir)
    return time.perf_counter() - start


def _start_worker(threads: int) -> None:
    """Pool initializer: a spawned process starts with default threads and no logging set up."""
    import torch

    from mgsr_cli.console import setup_logging

    torch.set_num_threads(threads)
    setup_logging()


def execute(units: list[Unit], pool: ProcessPoolExecutor | None, runs: Path, timings: Timings) -> None:
    """Run the units not complete yet: in the pool's processes in the listed order, or here one by one."""
    todo = [unit for unit in units if not is_complete(unit.out_dir)]
    if len(todo) < len(units):
        log.info("reusing %d complete unit(s)", len(units) - len(todo))

    def finished(unit: Unit, seconds: float) -> None:
        timings.units[unit.name] = seconds
        timings.save()
        log.info("done %-24s %6.1f s", unit.name, seconds)

    if pool is None:
        for unit in todo:
            try:
                seconds = run_unit(unit, _log_path(runs, unit))
            except Exception as error:
                raise _failure(unit, runs, error) from error
            finished(unit, seconds)
        return
    futures = {pool.submit(run_unit, unit, _log_path(runs, unit)): unit for unit in todo}
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            if future.exception() is not None:
                for other in pending:
                    other.cancel()
                raise _failure(futures[future], runs, future.exception()) from future.exception()
            finished(futures[future], future.result())


@contextlib.contextmanager
def workers_for(workers: int, threads: int):
    """A pool of `workers` spawned processes, or None (run in this process) for one worker.

    One torch thread per process by default: these models are too small to gain from more, and
    on shared cores extra threads spin against other processes (measured 5-10x slower).
    """
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(threads,)) as pool:
            yield pool
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield None
    finally:
        torch.set_num_threads(previous)


def code_version() -> str:
    """The repository's commit, '+dirty' with uncommitted changes; 'unknown' outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _failure(unit: Unit, runs: Path, error: BaseException) -> RuntimeError:
    return RuntimeError(f"{unit.name} failed: {error} (its log: {_log_path(runs, unit)})")


def _log_path(runs: Path, unit: Unit) -> Path:
    return runs / "logs" / f"{unit.name}.log"


# ---------------------------------------------------------------- the study


def sft_unit(name: str, model: Path, runs: Path, steps: int, scale: LabScale) -> Unit:
    """Cross-entropy on Dolly train (the sft recipe), from `model`: the teacher and the student's init."""
    config = override(
        load_recipe(DistillConfig, recipe_path("sft")),
        {
            "teacher": str(model),
            "student": str(model),
            "limit": scale.sft_examples,
            "dev_limit": scale.dev_examples,
            "max_length": scale.max_length,
            "data_format": {"max_prompt_length": scale.max_prompt_length},
            "max_steps": steps,
            "batch_size": scale.batch_size,
            "lr": scale.sft_lr,
            "eval_every": 0,
            "save_every": 0,
            "log_every": max(steps // 20, 1),
            "device": scale.device,
        },
    )
    return Unit(name, "distill", config, runs / name)


def distill_units(scale: LabScale, teacher: Path, student: Path, runs: Path) -> list[Unit]:
    """One distill run per (recipe, training seed), the on-policy ones first (they take longest)."""
    units = []
    for recipe in scale.recipes:
        for seed in scale.train_seeds:
            config = override(
                load_recipe(DistillConfig, recipe_path(recipe)),
                {"teacher": str(teacher), "student": str(student), **scale.distill_overrides(seed)},
            )
            units.append(Unit(f"{recipe}-s{seed}", "distill", config, runs / "distill" / f"{recipe}-s{seed}"))
    return sorted(units, key=lambda unit: _cost_rank(unit.config))


def _cost_rank(config: DistillConfig) -> int:
    """Rough cost order for scheduling: generating every step > sometimes > never."""
    if config.sgo_policy in ("on_policy", "once"):
        return 0
    return 2 if config.sgo_policy == "none" else 1


def evaluate_unit(label: str, model: Path, runs: Path, scale: LabScale) -> Unit:
    config = EvaluateConfig(
        models=[f"{label}={model}"],
        data=list(EVAL_SETS),
        seeds=list(scale.eval_seeds),
        limit=scale.eval_examples,
        batch_size=scale.eval_examples,
        sampling=SamplingConfig(max_new_tokens=scale.response_tokens),
        loading=ModelLoading(device=scale.device),
    )
    return Unit(f"eval-{label}", "evaluate", config, runs / "evaluate" / label)


# The knobs that shape the tokenizer, the models and their SFT, and those only evaluation reads. A
# knob is pinned once a phase that reads it has units in the runs directory; the others may change
# (a `--until` run leaves the later phases' knobs open).
SFT_KNOBS = frozenset(
    {"vocab_size", "tokenizer_examples", "teacher", "student", "n_positions", "sft_examples", "teacher_sft_steps", "student_sft_steps",
     "sft_lr", "batch_size", "max_length", "max_prompt_length", "dev_examples", "device"}
)
EVALUATION_KNOBS = frozenset({"eval_examples", "eval_seeds"})


def check_scale(runs: Path, scale: LabScale) -> None:
    """A runs directory holds one scale only: mixing the quick and full studies would be silent nonsense.

    Knobs pinned: `SFT_KNOBS` always, every other knob but `EVALUATION_KNOBS` once a distill
    unit exists, all of them once an evaluation exists."""
    path = runs / "lab_scale.json"
    current = json.loads(json.dumps(dataclasses.asdict(scale)))
    if path.exists():
        previous = json.loads(path.read_text())
        changed = {key for key in current.keys() | previous.keys() if previous.get(key) != current.get(key)}
        if (runs / "evaluate").exists():
            pinned = changed
        else:
            pinned = changed - EVALUATION_KNOBS if (runs / "distill").exists() else changed & SFT_KNOBS
        if pinned:
            raise SystemExit(f"error: {runs} holds runs of a different lab scale ({', '.join(sorted(pinned))}); choose another --out or delete {runs}")
    runs.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2))


PHASES = ("sft", "distill", "evaluate")


def run_lab(out: Path, scale: LabScale, workers: int = 2, threads: int = 1, until: str | None = None) -> Path | None:
    """Run (or continue) the study under out/runs and write out/lab.md, lab.png, lab.json.

    `until` stops after that phase (returns None, writes no report): on shared cores the long
    teacher SFT can run ahead and a later invocation continues from its complete units."""
    from experiments.lab_models import build_model, train_tokenizer
    from experiments.lab_report import write_report

    runs = out / "runs"
    check_scale(runs, scale)
    timings = Timings.load(runs / "timings.json")
    timings.invocations += 1
    timings.commits.append(code_version())
    models = runs / "models"
    with workers_for(workers, threads) as pool:
        with timings.phase("tokenizer and models"):
            if not (models / "student" / "model.safetensors").exists():
                train_tokenizer(models / "tokenizer", scale.vocab_size, scale.tokenizer_examples)
                build_model(models / "teacher", models / "tokenizer", scale.teacher, seed=0, n_positions=scale.n_positions)
                build_model(models / "student", models / "tokenizer", scale.student, seed=1, n_positions=scale.n_positions)
        with timings.phase("SFT of teacher and student init"):
            sft = [
                sft_unit("teacher-sft", models / "teacher", runs, scale.teacher_sft_steps, scale),
                sft_unit("student-init", models / "student", runs, scale.student_sft_steps, scale),
            ]
            execute(sft, pool, runs, timings)
        if until == "sft":
            return None
        teacher, student = (unit.out_dir / "student" for unit in sft)
        distills = distill_units(scale, teacher, student, runs)
        with timings.phase("distillation"):
            execute(distills, pool, runs, timings)
        if until == "distill":
            return None
        evaluations = [evaluate_unit("teacher", teacher, runs, scale), evaluate_unit("student-init", student, runs, scale)]
        evaluations += [evaluate_unit(unit.name, unit.out_dir / "student", runs, scale) for unit in distills]
        with timings.phase("evaluation"):
            execute(evaluations, pool, runs, timings)
    parallelism = "one at a time in this process" if workers == 1 else f"{workers} at a time in separate processes"
    return write_report(out, scale, runs, timings, f"{parallelism}, {threads} torch thread(s) each")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where lab.md, lab.png, lab.json and runs/ go")
    parser.add_argument("--quick", action="store_true", help="tiny everything: checks the pipeline in a few minutes, not the ranking")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu: under an hour on 2 shared cores; gpu: larger models, one CUDA GPU")
    parser.add_argument("--workers", type=int, help="units run in parallel processes; 1 = in this process (default: 2, --quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per unit")
    parser.add_argument("--until", choices=PHASES[:-1], help="stop after this phase; a later run continues from its complete units")
    parser.add_argument("--readme", type=Path, help="also copy the result table into this README (between its lab markers)")
    args = parser.parse_args(argv)
    from mgsr_cli.console import setup_logging

    setup_logging()
    workers = args.workers or (1 if args.quick else 2)
    report = run_lab(args.out, QUICK if args.quick else SCALES[args.scale], workers, args.threads, args.until)
    if report is None:
        print(f"stopped after the {args.until} phase; run again without --until to continue")
        return
    if args.readme:
        from experiments.lab_report import copy_table_into

        copy_table_into(args.readme, report)
    print(report)


if __name__ == "__main__":
    main()
