"""The shared harness of the training benchmarks (bench_distill, bench_onpolicy, bench_scaling).

Child side: what one run trains (`Spec`), its timed window and memory marks (`Meter`), the batches
mgsr's own loop draws, and the models every variant loads. Parent side: the machine description
and medians the reports print. Nothing here imports torch at module level, so the parent stays
torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Spec:
    """What one child process trains; the same spec (bar `variant`) gives the same work."""

    variant: str
    beta: float
    teacher: str
    student: str
    work_dir: str
    data: str = "dolly_train"
    limit: int | None = 400
    max_length: int = 320
    batch_size: int = 8
    steps: int = 5
    warmup: int = 2
    chunk_size: int = 128  # the distill default (config.DistillConfig.chunk_size)
    lr: float = 5e-4
    seed: int = 42
    threads: int = 2
    recipe: str | None = None  # variant mgsr only: a shipped recipe's loss instead of `loss_spec(beta)`



# ---------------------------------------------------------------- memory and timing (child side)


def proc_status_mib(name: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_high_water_mark() -> bool:
    """Restart VmHWM at the current RSS, so the training peak excludes loading transients."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


@dataclass
class Meter:
    """Step end times, token counts and memory marks of one training run."""

    steps: int
    warmup: int
    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    total_tokens: list[int] = field(default_factory=list)
    first_loss: float | None = None
    load_peak_mib: float = float("nan")
    ready_rss_mib: float = float("nan")
    train_peak_mib: float = float("nan")
    hwm_reset: bool = False
    load_average_start: float = float("nan")
    load_average_end: float = float("nan")

    def begin(self) -> None:
        """Call once, right before the first optimizer step (models and data loaded)."""
        self.load_peak_mib = proc_status_mib("VmHWM")
        self.ready_rss_mib = proc_status_mib("VmRSS")
        self.hwm_reset = reset_high_water_mark()

    def step_done(self, response_tokens: int, total_tokens: int) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.response_tokens.append(response_tokens)
        self.total_tokens.append(total_tokens)
        if len(self.ends) == self.warmup:
            self.load_average_start = os.getloadavg()[0]
        if len(self.ends) == self.steps:
            self.train_peak_mib = proc_status_mib("VmHWM")
            self.load_average_end = os.getloadavg()[0]

    def result(self) -> dict:
        if len(self.ends) != self.steps:
            raise RuntimeError(f"expected {self.steps} steps, timed {len(self.ends)}")
        seconds = self.ends[-1] - self.ends[self.warmup - 1]
        response = sum(self.response_tokens[self.warmup :])
        total = sum(self.total_tokens[self.warmup :])
        return {
            "window_s": seconds,
            "timed_steps": self.steps - self.warmup,
            "s_per_step": seconds / (self.steps - self.warmup),
            "cpu_s_per_step": (self.cpu_ends[-1] - self.cpu_ends[self.warmup - 1]) / (self.steps - self.warmup),
            "load_average": (self.load_average_start + self.load_average_end) / 2,
            "response_tokens": response,
            "total_tokens": total,
            "response_tok_s": response / seconds,
            "total_tok_s": total / seconds,
            "first_loss": self.first_loss,
            "load_peak_mib": self.load_peak_mib,
            "ready_rss_mib": self.ready_rss_mib,
            "train_peak_mib": self.train_peak_mib if self.hwm_reset else float("nan"),
            "step_times": [b - a for a, b in zip(self.ends[self.warmup - 1 :], self.ends[self.warmup :])],
        }



# ---------------------------------------------------------------- data and models (child side)


def training_batches(spec: Spec, tokenizer) -> list[list]:
    """The `spec.steps` global batches mgsr's loop trains on, in order (mgsr's own data path and
    its own epoch-wise shuffle, so every variant sees exactly these sequences)."""
    from mgsr_cli.batches import ground_truth_sequences
    from mgsr_cli.config import DataConfig
    from mgsr_cli.data import load_examples
    from mgsr_cli.train_data import global_batch

    data_format = DataConfig()
    examples = load_examples(spec.data, data_format, spec.limit)
    sequences = ground_truth_sequences(examples, tokenizer, data_format.max_prompt_length, spec.max_length, None)
    return [global_batch(sequences, spec.batch_size, spec.seed, step) for step in range(spec.steps)]


def batches_fingerprint(batches: list[list]) -> str:
    """A hash of every step's token ids: equal fingerprints mean identical training data."""
    digest = hashlib.sha256()
    for batch in batches:
        for sequence in batch:
            digest.update(json.dumps([sequence.prompt_ids, sequence.response_ids]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def token_counts(batch: list) -> tuple[int, int]:
    """(response tokens scored, prompt + response tokens) of one batch."""
    response = sum(len(sequence.response_ids) for sequence in batch)
    return response, response + sum(len(sequence.prompt_ids) for sequence in batch)


def load_student_teacher(spec: Spec):
    """Both models in fp32, dropout off in the student (train mode), teacher frozen in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(spec.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec.teacher, dtype=torch.float32).eval().requires_grad_(False)
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return student.train(), teacher


def import_gkd():
    """GKDConfig, GKDTrainer: trl.experimental.gkd in current TRL."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    return GKDConfig, GKDTrainer



# ---------------------------------------------------------------- machine and medians (parent side)


def available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def machine_description() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} x {model}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)

