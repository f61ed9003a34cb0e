"""How `mgsr distill`'s throughput and peak memory scale with sequence length and batch size.

Claim under test: with a fixed chunk size, mgsr's memory stays nearly flat as B x T grows (only
the backbone's activations and the [N, H] hidden rows grow; at most one chunk of [rows, V]
logits exists at a time), while a naive full-logit loop grows with B x T x V. Both variants of
bench_distill.py (`mgsr`, `naive`; `trl` on request) train the tiny GPT-2 pair with forward KL,
each point in a fresh process, on sequences of exactly T tokens: a shipped Dolly train prompt
of at most 64 tokens followed by its reference response and the next examples' responses
(mgsr's own data path cuts each to T tokens), so every batch is B x T with no padding.

    PYTHONPATH=. python benchmarks/bench_scaling.py --runs 1 --plot benchmarks/scaling.png

The sweeps: T in --lengths at batch --length-batch, then B in --batches at length --batch-length.
A naive point whose [B, T, V] tensors would not fit in the memory available is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill import prepare, run_spec  # noqa: E402
from harness import Spec, available_gib, machine_description, median  # noqa: E402
from child_runs import run_child  # noqa: E402

VOCAB = 50257
MAX_PROMPT_TOKENS = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="repetitions of every point (medians are reported)")
    parser.add_argument("--variants", default="mgsr,naive")
    parser.add_argument("--lengths", default="128,256,512,1024", help="total tokens per sequence (length sweep)")
    parser.add_argument("--length-batch", type=int, default=4, help="batch size of the length sweep")
    parser.add_argument("--batches", default="2,4,8,16", help="batch sizes (batch sweep)")
    parser.add_argument("--batch-length", type=int, default=256, help="sequence length of the batch sweep")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--chunk-size", type=int, default=512, help="mgsr's rows per output-layer chunk (fixed over the sweep)")
    parser.add_argument("--teacher-size", default="4x128x4")
    parser.add_argument("--student-size", default="2x64x2")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir", help="models, data and logs (default: a new temporary directory)")
    parser.add_argument("--json", help="write every run's raw result here")
    parser.add_argument("--plot", help="write the curves to this PNG")
    parser.add_argument("--make-data", help=argparse.SUPPRESS)
    return parser.parse_args()


def make_data(out_path: str, tokenizer_dir: str, rows: int = 256) -> None:
    """JSONL rows (prompt, output) whose output holds at least 1,100 tokens of Dolly responses."""
    from mgsr_cli.config import DataConfig
    from mgsr_cli.data import load_examples
    from mgsr_cli.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    examples = [example for example in load_examples("dolly_train", DataConfig(), 4000) if example.references]
    lengths = [len(ids) for ids in tokenizer([example.prompt for example in examples], add_special_tokens=True)["input_ids"]]
    responses = [example.references[0] for example in examples]
    written = []
    for index, example in enumerate(examples):
        if lengths[index] > MAX_PROMPT_TOKENS:
            continue
        parts, tokens, next_index = [], 0, index
        while tokens < 1100:
            text = responses[next_index % len(responses)]
            parts.append(text)
            tokens += len(tokenizer(text + "\n\n")["input_ids"])
            next_index += 1
        written.append({"prompt": example.prompt, "output": "\n\n".join(parts)})
        if len(written) == rows:
            break
    Path(out_path).write_text("".join(json.dumps(row) + "\n" for row in written))


def naive_fits(batch: int, length: int) -> bool:
    """About eight [B, T, V] float32 tensors live at the naive loop's peak; keep 2 GiB spare."""
    need_gib = 8 * batch * length * VOCAB * 4 / 2**30 + 2
    return need_gib < available_gib()


def main() -> None:
    args = parse_args()
    if args.make_data:
        make_data(*json.loads(args.make_data))
        return
    work, teacher, student, log_path = prepare(args)
    data = work / "scaling.jsonl"
    if not data.exists():
        run_child(__file__, "--make-data", [str(data), student], "make-data", log_path, emits_result=False)
    lengths = [int(value) for value in args.lengths.split(",")]
    batches = [int(value) for value in args.batches.split(",")]
    points = [("length", args.length_batch, length) for length in lengths] + [("batch", batch, args.batch_length) for batch in batches]
    variants = args.variants.split(",")
    results: dict[tuple[int, int, str], list[dict]] = {}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {machine_description()} | logs: {log_path}", file=sys.stderr)
    started = time.time()
    for run in range(args.runs):
        for batch, length in dict.fromkeys((batch, length) for _, batch, length in points):
            for variant in variants:
                key = (batch, length, variant)
                if variant != "mgsr" and not naive_fits(batch, length):
                    print(f"skip {variant} B={batch} T={length}: needs more memory than available", file=sys.stderr)
                    continue
                spec = Spec(
                    variant=variant, beta=0.0, teacher=teacher, student=student, work_dir=str(work), data=str(data), limit=None,
                    max_length=length, batch_size=batch, steps=args.steps, warmup=args.warmup, chunk_size=args.chunk_size, threads=args.threads,
                )
                result = run_spec(spec, log_path)
                results.setdefault(key, []).append(result)
                print(f"run {run + 1} B={batch:2d} T={length:4d} {variant:5s}: {result['response_tok_s']:8,.0f} resp tok/s, "
                      f"peak {result['maxrss_mib']:6,.0f} MiB, growth {result['train_peak_mib'] - result['ready_rss_mib']:6,.0f} MiB "
                      f"(load avg {os.getloadavg()[0]:.2f}, {time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{b}x{t}/{v}": runs for (b, t, v), runs in results.items()}, indent=1))
    print(report(args, points, variants, results))
    if args.plot:
        plot(args, points, variants, results, Path(args.plot))


def summary(runs: list[dict]) -> dict:
    return {
        "tok_s": median(runs, "response_tok_s"),
        "s_step": median(runs, "s_per_step"),
        "rows": runs[0]["response_tokens"] / runs[0]["timed_steps"],
        "peak": median(runs, "maxrss_mib"),
        "ready": median(runs, "ready_rss_mib"),
        "growth": median([{"g": run["train_peak_mib"] - run["ready_rss_mib"]} for run in runs], "g"),
    }


def report(args: argparse.Namespace, points: list, variants: list[str], results: dict) -> str:
    lines = [
        f"teacher {args.teacher_size}, student {args.student_size}, V = {VOCAB}, fp32, forward KL, mgsr chunk {args.chunk_size} rows, "
        f"{args.steps} steps (timed: the last {args.steps - args.warmup}), {args.threads} torch threads, medians of {args.runs} run(s). "
        f"growth: peak RSS during the steps minus the RSS before step 1; [B,T,V]: the size of one float32 logits tensor.",
        "",
        "| sweep | B | T | response tok/step | [B,T,V] MiB | variant | response tok/s | s/step | peak RSS MiB | growth MiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for sweep, batch, length in points:
        for variant in variants:
            runs = results.get((batch, length, variant))
            logits_mib = batch * length * VOCAB * 4 / 2**20
            if not runs:
                lines.append(f"| {sweep} | {batch} | {length} | | {logits_mib:,.0f} | {variant} | skipped | | | |")
                continue
            s = summary(runs)
            lines.append(
                f"| {sweep} | {batch} | {length} | {s['rows']:,.0f} | {logits_mib:,.0f} | {variant} | {s['tok_s']:,.0f} | "
                f"{s['s_step']:.2f} | {s['peak']:,.0f} | {s['growth']:,.0f} |"
            )
    return "\n".join(lines)


def plot(args: argparse.Namespace, points: list, variants: list[str], results: dict, path: Path) -> None:
    """Two sweeps (columns) x throughput and memory growth (rows), log2 x axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    sweeps = [("length", "sequence length T (tokens)", lambda b, t: t, f"B = {args.length_batch}"),
              ("batch", "batch size B", lambda b, t: b, f"T = {args.batch_length}")]
    for column, (sweep, label, x_of, fixed) in enumerate(sweeps):
        chosen = [(b, t) for s, b, t in points if s == sweep]
        for variant in variants:
            measured = [(x_of(b, t), summary(results[(b, t, variant)])) for b, t in chosen if (b, t, variant) in results]
            if not measured:
                continue
            xs = [x for x, _ in measured]
            axes[0][column].plot(xs, [s["tok_s"] for _, s in measured], marker="o", label=variant)
            axes[1][column].plot(xs, [s["growth"] for _, s in measured], marker="o", label=f"{variant}: peak - RSS before step 1")
        xs = [x_of(b, t) for b, t in chosen]
        axes[1][column].plot(xs, [b * t * VOCAB * 4 / 2**20 for b, t in chosen], linestyle=":", color="grey", label="one [B, T, V] fp32 tensor")
        for row, ylabel in ((0, "response tokens / s"), (1, "training memory (MiB)")):
            axis = axes[row][column]
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [str(x) for x in xs])
            axis.set_xlabel(f"{label}, {fixed}")
            axis.set_ylabel(ylabel)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
    figure.suptitle(f"mgsr distill vs naive full-logit loop: tiny GPT-2 ({args.student_size} <- {args.teacher_size}), V = {VOCAB}, "
                    f"fp32 CPU, chunk {args.chunk_size}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
