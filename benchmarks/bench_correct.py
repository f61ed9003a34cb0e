"""SCRG cost: `correct` timed against the `generate` run that produced its input, side by side.

Both stages run in-process, one after the other, on the same samples: `generate` samples the
student's responses, `correct` scores them with teacher and student, revises and re-generates.
Wall times include model loading (what a user waits for); the ratio is correct / generate.
correct's time is also split into scoring (both forwards, output-layer projections and d_i at
every response position), re-generation, and the rest (loading, teacher proposals, records).
Without --teacher/--student the embedded tiny GPT-2 pair is built in a temporary directory.

    python benchmarks/bench_correct.py --prompts 32 --max-new-tokens 128 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mgsr_cli import scrg
from mgsr_cli.artifacts import read_stage
from mgsr_cli.config import GenerateConfig, ModelLoading, SamplingConfig
from mgsr_cli.generate import run_generate
from mgsr_cli.models import build_tiny_pair, load_model_and_tokenizer
from mgsr_cli.correct import correct_config, run_correct

TARGET_RATIO = 1.5
PHASES = {"score_windows": "scoring", "regenerate": "re-generation"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="teacher model (default: the embedded tiny teacher)")
    parser.add_argument("--student", help="student model (default: the embedded tiny student)")
    parser.add_argument("--data", default="dolly")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="the same for both stages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="generate + correct pairs run; the median ratio is reported")
    args = parser.parse_args()
    if (args.teacher is None) != (args.student is None):
        parser.error("give both --teacher and --student, or neither")
    return args


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def time_phases() -> dict[str, float]:
    """Wrap scrg's scoring and re-generation functions with timers; seconds accumulate per phase."""
    seconds = {phase: 0.0 for phase in PHASES.values()}
    for name, phase in PHASES.items():
        function = getattr(scrg, name)

        def timed_function(*args, _function=function, _phase=phase, **kwargs):
            started = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                seconds[_phase] += time.perf_counter() - started

        setattr(scrg, name, timed_function)
    return seconds


def main() -> None:
    args = parse_args()
    generate_times, correct_times, phase_times = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        teacher, student = (args.teacher, args.student) if args.teacher else map(str, build_tiny_pair(work / "tiny"))
        load_model_and_tokenizer(student, ModelLoading())  # lazy imports are paid here, by neither stage
        generate = GenerateConfig(
            model=student,
            data=args.data,
            limit=args.prompts,
            batch_size=args.batch_size,
            seed=args.seed,
            sampling=SamplingConfig(max_new_tokens=args.max_new_tokens),
        )
        phases = time_phases()
        for repeat in range(args.repeats):
            generated_dir, corrected_dir = work / f"generate{repeat}", work / f"correct{repeat}"
            generate_times.append(timed(run_generate, generate, generated_dir))
            correct = correct_config(generated_dir, teacher, student, {"batch_size": args.batch_size, "seed": args.seed})
            before = dict(phases)
            correct_times.append(timed(run_correct, correct, generated_dir, corrected_dir))
            phase_times.append({phase: phases[phase] - before[phase] for phase in phases})
        _, generated = read_stage(generated_dir, ("generate",))
        summary = read_stage(corrected_dir, ("correct",))[0]["summary"]
    report(generated, summary, generate_times, correct_times, phase_times)


def report(
    generated: list[dict], summary: dict, generate_times: list[float], correct_times: list[float], phase_times: list[dict]
) -> None:
    """A markdown table of the median run (by the correct / generate ratio) and the machine."""
    ratios = [correct / generate for correct, generate in zip(correct_times, generate_times)]
    median = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    generate_seconds, correct_seconds, phases = generate_times[median], correct_times[median], phase_times[median]
    tokens = sum(len(record["response_ids"]) for record in generated)
    print(f"command: python {' '.join(sys.argv)}")
    threads = torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads)")
    print(f"{len(generated)} sequences, {tokens} response tokens, {summary['changed']} changed, "
          f"{summary['regenerated_tokens']} tokens re-generated")
    print(f"ratios of the {len(ratios)} runs: {', '.join(f'{ratio:.2f}x' for ratio in ratios)}; the median run:\n")
    print("| stage | wall s | tokens | tok/s |")
    print("|---|---:|---:|---:|")
    print(f"| generate | {generate_seconds:.1f} | {tokens} sampled | {tokens / generate_seconds:,.0f} |")
    print(f"| correct | {correct_seconds:.1f} | {tokens} scored | {tokens / correct_seconds:,.0f} |")
    split = ", ".join(f"{phase} {value:.1f} s" for phase, value in phases.items())
    print(f"\ncorrect: {split}, other {correct_seconds - sum(phases.values()):.1f} s (loading two models, proposals, records)")
    print(f"correct / generate = {ratios[median]:.2f}x (target <= {TARGET_RATIO}x)")


if __name__ == "__main__":
    main()
