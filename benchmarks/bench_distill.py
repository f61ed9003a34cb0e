"""Training throughput and peak memory: `mgsr distill` vs TRL's GKDTrainer vs a naive full-logit loop.

All three train the same student against the same teacher (tiny GPT-2 pair, real 50,257-token
vocabulary, fp32 on the CPU, dropout off) on the same batches of shipped Dolly train examples
(the order mgsr's own loop draws, fed to the others in that order), with the same loss, AdamW,
gradient clipping 1.0 and number of optimizer steps:
- mgsr:  recipe kd (sgo_policy none) with loss fkl (beta 0) or gjsd:beta, run by mgsr's own
         `Distillation` loop (what `mgsr distill` / `run_distill` runs);
- trl:   `GKDTrainer` with lmbda=0 (no on-policy generation), seq_kd off, the same beta;
- naive: plain PyTorch: `model(input_ids).logits` [B, T, V] for student and teacher, the loss on
         the response positions, AdamW.

Every (variant, beta) run is a fresh process (started by this light, torch-free parent) and the
runs are interleaved A B C A B C. Time: the steady-state window from the end of optimizer step
`--warmup` to the end of the last step (model loading, the first steps and final saving are
outside it; data collation, forward, backward, optimizer and loop overhead are inside for all
three). Memory: the child's peak resident set (ru_maxrss from wait4, what `/usr/bin/time -v`
reports) and, from /proc/self/status, the resident size before step 1 and the high-water mark
over the training steps alone. The step-1 losses are compared to check the three compute the same
objective.

    PYTHONPATH=. python benchmarks/bench_distill.py --runs 3

`--recipes kd,mgsr,...` instead runs mgsr's own loop once per shipped recipe (its loss, loss
options and temperature; generation off: sgo_policy none), interleaved, on the same batches,
and reports each recipe's tokens/s and peak next to the floor: `floor`, the same teacher
forward (and projection) and student forward/backward with only `sft` as the loss.

    PYTHONPATH=. python benchmarks/bench_distill.py --recipes floor,kd,mgsr --runs 2 --steps 8

Needs the bench extra: pip install -e '.[bench]' (TRL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_runs import emit_result, run_child  # noqa: E402
from distill_loops import FLOOR, OTHER_LOOPS, RUNNERS, recipe_loss  # noqa: E402
from harness import Meter, Spec, available_gib, machine_description, median, proc_status_mib  # noqa: E402

SCRIPT = Path(__file__).resolve()
VARIANTS = ("mgsr", "trl", "naive")


def child_main(spec: Spec) -> None:
    import torch

    torch.set_num_threads(spec.threads)
    meter = Meter(spec.steps, spec.warmup)
    runner = RUNNERS[spec.variant]
    extra = runner(spec, meter)
    result = {**meter.result(), **extra, "end_peak_mib": proc_status_mib("VmHWM"), "torch": torch.__version__}
    emit_result(result)


def build_main(spec: Spec) -> None:
    """Build the tiny teacher/student pair (sizes in spec.teacher / spec.student as LxHxA)."""
    from mgsr_cli.models import TinySize, build_tiny_gpt2

    work = Path(spec.work_dir)
    for name, size, seed in (("teacher", spec.teacher, 0), ("student", spec.student, 1)):
        layers, width, heads = (int(part) for part in size.split("x"))
        build_tiny_gpt2(work / f"{name}-{size}", TinySize(n_layer=layers, n_embd=width, n_head=heads), seed)



# ---------------------------------------------------------------- parent side (no torch import)


def run_spec(spec: Spec, log_path: Path) -> dict:
    """One measured spec in a fresh bench_distill child."""
    return run_child(SCRIPT, "--child", dataclasses.asdict(spec), f"{spec.variant} beta={spec.beta}", log_path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions of every (beta, variant)")
    parser.add_argument("--betas", default="0,0.5", help="GKD beta values (0 = forward KL = mgsr fkl)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--recipes", help=f"mgsr's loop per shipped recipe (and '{FLOOR}', 'trl', 'naive'), instead of the variants"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length", type=int, default=320,
        help="prompt + response tokens at most (default 320: it must exceed the max prompt length, DataConfig's 256)",
    )
    parser.add_argument("--limit", type=int, default=400, help="Dolly train examples the batches are drawn from")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--chunk-size", type=int, default=128, help="mgsr's rows per output-layer chunk (distill's default)")
    parser.add_argument("--teacher-size", default="4x128x4", help="teacher layers x width x heads (default: the embedded pair)")
    parser.add_argument("--student-size", default="2x64x2", help="student layers x width x heads")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per run")
    parser.add_argument("--work-dir", help="models and logs (default: a new temporary directory)")
    parser.add_argument("--json", help="write every run's raw result here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, str, str, Path]:
    """Work dir with the built pair; returns (work, teacher dir, student dir, log path)."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mgsr-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "runs.log"
    teacher, student = work / f"teacher-{args.teacher_size}", work / f"student-{args.student_size}"
    if not (teacher / "config.json").exists() or not (student / "config.json").exists():
        build = Spec("build", 0.0, args.teacher_size, args.student_size, str(work))
        run_child(SCRIPT, "--build", dataclasses.asdict(build), "build", log_path, emits_result=False)
    return work, str(teacher), str(student), log_path


def main() -> None:
    args = parse_args()
    if args.child or args.build:
        spec = Spec(**json.loads(args.child or args.build))
        (child_main if args.child else build_main)(spec)
        return
    work, teacher, student, log_path = prepare(args)
    betas = [float(beta) for beta in args.betas.split(",")]
    variants = args.variants.split(",")
    common = dict(
        teacher=teacher, student=student, work_dir=str(work), limit=args.limit, max_length=args.max_length,
        batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, chunk_size=args.chunk_size, threads=args.threads,
    )
    if args.recipes:
        print(recipe_report(args, run_recipes(args, common, log_path)))
        return
    results: dict[tuple[float, str], list[dict]] = {(beta, variant): [] for beta in betas for variant in variants}
    started = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {machine_description()} | torch threads {args.threads} | "
          f"load average {os.getloadavg()[0]:.2f} | {available_gib():.1f} GiB available | logs: {log_path}", file=sys.stderr)
    for run in range(args.runs):
        for beta in betas:
            for variant in variants:
                result = run_spec(Spec(variant=variant, beta=beta, **common), log_path)
                results[(beta, variant)].append(result)
                print(f"run {run + 1}/{args.runs} beta {beta:g} {variant:5s}: {result['response_tok_s']:8,.0f} resp tok/s, "
                      f"{result['s_per_step']:.2f} s/step, peak {result['maxrss_mib']:6,.0f} MiB, step-1 loss {result['first_loss']:.6f} "
                      f"(load avg {os.getloadavg()[0]:.2f}, {time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{beta:g}/{variant}": runs for (beta, variant), runs in results.items()}, indent=1))
    print(report(args, results, betas, variants))


def run_recipes(args: argparse.Namespace, common: dict, log_path: Path) -> dict[str, list[dict]]:
    """Every recipe's runs, interleaved A B C A B C, each in a fresh process."""
    recipes = args.recipes.split(",")
    results: dict[str, list[dict]] = {recipe: [] for recipe in recipes}
    started = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {machine_description()} | torch threads {args.threads} | "
          f"load average {os.getloadavg()[0]:.2f} | logs: {log_path}", file=sys.stderr)
    for run in range(args.runs):
        for recipe in recipes:
            variant, own = (recipe, None) if recipe in OTHER_LOOPS else ("mgsr", recipe)
            result = run_spec(Spec(variant=variant, beta=0.0, recipe=own, **common), log_path)
            results[recipe].append(result)
            print(f"run {run + 1}/{args.runs} {recipe:12s}: {result['response_tok_s']:8,.0f} resp tok/s, "
                  f"{result['s_per_step']:.2f} s/step, peak {result['maxrss_mib']:6,.0f} MiB "
                  f"(load avg {os.getloadavg()[0]:.2f}, {time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def recipe_report(args: argparse.Namespace, results: dict[str, list[dict]]) -> str:
    """Medians per recipe and their ratios to the floor (and of mgsr to kd), all from this invocation."""
    first = next(iter(results.values()))[0]
    floor = results.get(FLOOR)
    lines = [
        f"teacher {args.teacher_size}, student {args.student_size}, V = 50257, fp32, batch {args.batch_size}, max length "
        f"{args.max_length}, Dolly train (first {args.limit}), {args.steps} steps (timed: the last {args.steps - args.warmup}), "
        f"chunk {args.chunk_size}, sgo_policy none, {args.threads} torch threads, medians of {args.runs} interleaved runs; "
        f"torch {first['torch']}; load average over the timed steps {statistics.median(r['load_average'] for runs in results.values() for r in runs):.1f}",
        "",
        "| recipe | loss | response tok/s | s/step | peak RSS MiB | step time / floor | peak / floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for recipe, runs in results.items():
        loss = recipe_loss(recipe)
        speed, peak = median(runs, "response_tok_s"), median(runs, "maxrss_mib")
        ratios = (
            f"{median(floor, 'response_tok_s') / speed:.2f}x | {peak / median(floor, 'maxrss_mib'):.2f}x" if floor else "- | -"
        )
        lines.append(f"| {recipe} | `{loss}` | {speed:,.0f} | {median(runs, 's_per_step'):.2f} | {peak:,.0f} | {ratios} |")
    lines.append("")
    for a, b in (("mgsr", "kd"), ("kd", FLOOR), ("mgsr", "trl"), ("mgsr", "naive"), ("kd", "trl")):
        if a in results and b in results:
            ra, rb = results[a], results[b]
            lines.append(
                f"- {a} / {b}: step time {median(rb, 'response_tok_s') / median(ra, 'response_tok_s'):.2f}x "
                f"(tokens/s {median(ra, 'response_tok_s') / median(rb, 'response_tok_s'):.2f}x), "
                f"peak RSS {median(ra, 'maxrss_mib') / median(rb, 'maxrss_mib'):.2f}x"
            )
    lines += ["", "Every run (response tok/s / peak RSS MiB), in run order:", ""]
    lines += [f"- {recipe}: " + ", ".join(f"{r['response_tok_s']:,.0f} / {r['maxrss_mib']:,.0f}" for r in runs) for recipe, runs in results.items()]
    return "\n".join(lines)


def report(args: argparse.Namespace, results: dict, betas: list[float], variants: list[str]) -> str:
    """The markdown tables: medians per (beta, variant), then the ratios and the loss check."""
    first = next(iter(results.values()))[0]
    trl_versions = {run["trl_version"] for (_, variant), runs in results.items() if variant == "trl" for run in runs}
    lines = [
        f"teacher {args.teacher_size}, student {args.student_size} (layers x width x heads), V = 50257, fp32, "
        f"batch {args.batch_size}, max length {args.max_length}, Dolly train (first {args.limit}), {args.steps} steps "
        f"(timed: the last {args.steps - args.warmup}), mgsr chunk {args.chunk_size}, {args.threads} torch threads, "
        f"medians of {args.runs} interleaved runs; torch {first['torch']}" + "".join(f", TRL {version}" for version in sorted(trl_versions)),
        "",
        "| beta | variant | response tok/s | total tok/s | s/step | CPU s/step | peak RSS MiB | RSS before step 1 MiB | peak in steps MiB | load avg |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for beta in betas:
        for variant in variants:
            runs = results[(beta, variant)]
            lines.append(
                f"| {beta:g} | {variant} | {median(runs, 'response_tok_s'):,.0f} | {median(runs, 'total_tok_s'):,.0f} | "
                f"{median(runs, 's_per_step'):.2f} | {median(runs, 'cpu_s_per_step'):.2f} | {median(runs, 'maxrss_mib'):,.0f} | "
                f"{median(runs, 'ready_rss_mib'):,.0f} | {median(runs, 'train_peak_mib'):,.0f} | {median(runs, 'load_average'):.1f} |"
            )
    lines += [
        "",
        "Ratios of the medians. tok/s: response tokens per second (wall clock); CPU: the same from CPU time; "
        "peak: peak RSS of the process, in brackets the growth during the steps over the RSS before step 1.",
        "",
    ]
    pairs = [(a, b) for a, b in (("mgsr", "trl"), ("mgsr", "naive"), ("naive", "trl")) if a in variants and b in variants]
    lines.append("| beta | " + " | ".join(f"{a}/{b} tok/s | CPU | {a}/{b} peak" for a, b in pairs) + " |")
    lines.append("|---:|" + "---:|---:|---:|" * len(pairs))
    for beta in betas:
        cells = []
        for a, b in pairs:
            ra, rb = results[(beta, a)], results[(beta, b)]
            speed = median(ra, "response_tok_s") / median(rb, "response_tok_s")
            cpu = median(rb, "cpu_s_per_step") / median(ra, "cpu_s_per_step")
            peak = median(ra, "maxrss_mib") / median(rb, "maxrss_mib")
            growth = (median(ra, "train_peak_mib") - median(ra, "ready_rss_mib")) / max(
                median(rb, "train_peak_mib") - median(rb, "ready_rss_mib"), 1e-9
            )
            cells.append(f"{speed:.2f}x | {cpu:.2f}x | {peak:.2f}x ({growth:.2f}x)")
        lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    lines += ["", "Step-1 loss (before any update) and data check (token-id fingerprint of all batches):", ""]
    for beta in betas:
        losses = {variant: results[(beta, variant)][0]["first_loss"] for variant in variants}
        prints = {run["fingerprint"] for variant in variants for run in results[(beta, variant)]}
        spread = max(losses.values()) - min(losses.values())
        lines.append(
            f"- beta {beta:g}: " + ", ".join(f"{variant} {loss:.7f}" for variant, loss in losses.items())
            + f"; max difference {spread:.1e} ({spread / max(abs(min(losses.values())), 1e-12):.1e} relative); "
            + ("identical batches in every run" if len(prints) == 1 else f"DIFFERENT batches: {sorted(prints)}")
        )
    lines += ["", "Every run (response tok/s / peak RSS MiB), in run order:", ""]
    for (beta, variant), runs in results.items():
        lines.append(f"- beta {beta:g} {variant}: " + ", ".join(f"{run['response_tok_s']:,.0f} / {run['maxrss_mib']:,.0f}" for run in runs))
    return "\n".join(lines)



if __name__ == "__main__":
    main()
