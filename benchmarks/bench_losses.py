"""Micro-benchmark of the registry losses: forward + backward time and peak memory on CPU.

Each loss runs in a fresh subprocess (Linux, glibc), unchunked and chunked:
- Peak memory of one forward + backward: the resident high-water mark (VmHWM), reset just
  before the run, minus the resident memory at that point, i.e. what the loss adds on top
  of the input logits: gathered rows, intermediates and the gradient of the student logits.
  (ru_maxrss cannot be used: Linux carries it across fork + exec, so a child reports its
  parent's peak, and it cannot be reset between the two runs.) These runs use a fixed
  1 MiB glibc mmap threshold, so every freed tensor goes back to the OS and the resident
  peak follows the live tensors rather than heap reuse. A tiny warm-up run first keeps
  one-off initialisation out of the numbers.
- Time: the median of --repeats further runs, with the mmap threshold raised to 32 MiB,
  the value glibc's own adaptive threshold settles at.

Weighted sums (`--sums`, the shipped multi-term recipes by default) run twice, fused (the
default: one shared log-softmax per block for every term) and per term (`fused=False`, each
term from the logits), next to their budget: the most expensive term's time plus 25% per
further term, from the single-term runs of the same invocation.

    PYTHONPATH=. python benchmarks/bench_losses.py --tokens 128 --vocab 50257 --chunk-size 32
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

SPECS = ["sft", "fkl", "rkl", "skl:0.1", "srkl:0.1", "gjsd:0.5", "js", "tvd", "akl:0.5", "rank:5", "dac_kl", "span"]
SUM_RECIPES = ("mgsr", "mgsr_fkl", "mgsr_no_span", "rlkd")  # the shipped multi-term losses, one recipe each


def recipe_losses(names: tuple[str, ...]) -> list[str]:
    """The shipped recipes' loss specs, read from the recipes so the sums cannot drift from them."""
    from mgsr_cli.config import DistillConfig
    from mgsr_cli.config_loading import load_recipe, recipe_path

    return [load_recipe(DistillConfig, recipe_path(name)).loss for name in names]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="scored tokens per batch (rows N), a multiple of 4")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case after the memory run")
    parser.add_argument("--losses", default=",".join(SPECS), help="comma-separated registry specs")
    parser.add_argument(
        "--sums",
        help=f"';'-separated weighted sums ('' for none; default: the losses of recipes {', '.join(SUM_RECIPES)})",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one loss in this process
    parser.add_argument("--per-term", action="store_true", help=argparse.SUPPRESS)  # internal: fused=False
    return parser.parse_args()


def make_batch(tokens: int, vocab: int) -> dict:
    """[4, tokens/4, vocab] float32 logits, every position scored, adjacent synthetic span pairs."""
    import torch

    torch.manual_seed(0)
    batch, time_steps = 4, tokens // 4
    return {
        "student_logits": torch.randn(batch, time_steps, vocab).mul_(3).requires_grad_(True),
        "teacher_logits": torch.randn(batch, time_steps, vocab).mul_(3),
        "mask": torch.ones(batch, time_steps, dtype=torch.bool),
        "labels": torch.randint(0, vocab, (batch, time_steps)),
        "span_pairs": torch.tensor([(b, t, t + 1) for b in range(batch) for t in range(0, time_steps - 1, 2)]),
    }


def forward_backward(objective, inputs: dict) -> float:
    inputs["student_logits"].grad = None
    start = time.perf_counter()
    objective(**inputs).loss.backward()
    return time.perf_counter() - start


def resident_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, from /proc/self/status (kB)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_mib(objective, inputs: dict) -> float:
    """Resident memory one forward + backward adds at its peak."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size
    baseline = resident_mib("VmRSS")
    forward_backward(objective, inputs)
    return resident_mib("VmHWM") - baseline


def set_mmap_threshold(size: int) -> None:
    m_mmap_threshold = -3  # glibc's mallopt parameter number
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, size)


def run_case(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Peak MiB and ms per 1k tokens of one loss, unchunked and chunked."""
    import torch

    from mgsr_cli.losses import build_loss

    torch.set_num_threads(args.threads)
    set_mmap_threshold(1 << 20)
    fused = not args.per_term
    objectives = {
        "plain": build_loss(args.case, fused=fused),
        "chunked": build_loss(args.case, chunk_size=args.chunk_size, fused=fused),
    }
    warm_up = make_batch(8, args.vocab)
    for objective in objectives.values():
        forward_backward(objective, warm_up)
    del warm_up
    inputs = make_batch(args.tokens, args.vocab)
    peaks = {mode: peak_mib(objective, inputs) for mode, objective in objectives.items()}
    set_mmap_threshold(32 << 20)
    tokens = inputs["mask"].numel()
    return {
        mode: {
            "peak_mib": peaks[mode],
            "ms_per_1k_tokens": statistics.median(forward_backward(objective, inputs) for _ in range(args.repeats))
            * 1e6
            / tokens,
        }
        for mode, objective in objectives.items()
    }


def case_result(args: argparse.Namespace, spec: str, per_term: bool = False) -> dict[str, dict[str, float]]:
    command = [sys.executable, __file__, "--case", spec, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    command += ["--per-term"] if per_term else []
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"case {spec!r} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def available(spec: str) -> bool:
    """dac_kl and span live in modules written in parallel; skip them until they exist."""
    module = {"dac_kl": "mgsr_cli.losses.dac_kl", "span": "mgsr_cli.losses.span"}.get(spec.split(":")[0])
    return module is None or importlib.util.find_spec(module) is not None


def main() -> None:
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    tokens = args.tokens // 4 * 4
    per_1k = 1000 / tokens
    print(f"tokens={tokens} vocab={args.vocab} chunk_size={args.chunk_size} float32 logits (3 * randn), "
          f"{args.threads} torch thread(s) of {os.cpu_count()} CPUs; "
          f"input logits (student + teacher) {2 * tokens * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (timings are only meaningful on an idle machine)")
    print(f"{'loss':<10} {'ms/1k tok':>10} {'chunked':>8} {'peak MiB':>9} {'chunked':>8} {'MiB/1k tok':>11} {'chunked':>8}")
    sums = recipe_losses(SUM_RECIPES) if args.sums is None else [text for text in args.sums.split(";") if text]
    singles = list(dict.fromkeys(args.losses.split(",") + [term for text in sums for term in sum_terms(text)]))
    times = {}
    for spec in singles:
        if not available(spec):
            print(f"{spec:<10} (module not present, skipped)")
            continue
        result = case_result(args, spec)
        plain, chunked = result["plain"], result["chunked"]
        times[spec] = plain["ms_per_1k_tokens"]
        print(f"{spec:<10} {plain['ms_per_1k_tokens']:>10.0f} {chunked['ms_per_1k_tokens']:>8.0f} "
              f"{plain['peak_mib']:>9.0f} {chunked['peak_mib']:>8.0f} "
              f"{plain['peak_mib'] * per_1k:>11.0f} {chunked['peak_mib'] * per_1k:>8.0f}", flush=True)
    if sums:
        print("\nweighted sums, unchunked; budget = most expensive term + 25% per further term (ms/1k tok)")
        print(f"{'sum':<22} {'fused':>7} {'per term':>9} {'terms added':>12} {'budget':>7} {'fused/budget':>13} "
              f"{'fused MiB/1k':>13} {'per-term MiB/1k':>16}")
    for text in sums:
        terms = sum_terms(text)
        if not all(term in times for term in terms):
            print(f"{text:<22} (a term's module is not present, skipped)")
            continue
        fused, per_term = case_result(args, text)["plain"], case_result(args, text, per_term=True)["plain"]
        budget = max(times[term] for term in terms) * (1 + 0.25 * (len(terms) - 1))
        print(f"{text:<22} {fused['ms_per_1k_tokens']:>7.0f} {per_term['ms_per_1k_tokens']:>9.0f} "
              f"{sum(times[term] for term in terms):>12.0f} {budget:>7.0f} {fused['ms_per_1k_tokens'] / budget:>12.2f}x "
              f"{fused['peak_mib'] * per_1k:>13.0f} {per_term['peak_mib'] * per_1k:>16.0f}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def sum_terms(text: str) -> list[str]:
    """The single-term specs of a weighted sum: 'rank:5=1,fkl=0.5' -> ['rank:5', 'fkl']."""
    return [item.split("=")[0].strip() for item in text.split(",")]


if __name__ == "__main__":
    main()
