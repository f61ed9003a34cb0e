"""What ROUGE-L alone cannot show the lab (issue 15): low-variance fidelity metrics per model, and
checks of MGSR's mechanisms, computed from the saved models and the evaluation records.

Fidelity is teacher-forced on the first `examples` evaluation examples of every set: per example
the mean over response tokens of KL(teacher‖student) and KL(student‖teacher) on the reference
response and on the teacher's own sample, and the teacher's NLL of the student's sample (both
samples: the first evaluation seed). Evaluation records keep text, so responses are re-encoded
and cut at `cap` tokens; an empty sample is scored as the single EOS token it stopped at.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mgsr_cli.artifacts import atomic_write_json, iter_records

METRICS = {  # name -> (title, higher is better)
    "rougeL": ("ROUGE-L F ×100 vs references", True),
    "kl_ts_gt": ("KL(teacher‖student), reference responses", False),
    "kl_st_gt": ("KL(student‖teacher), reference responses", False),
    "kl_ts_tgen": ("KL(teacher‖student), teacher samples", False),
    "kl_st_tgen": ("KL(student‖teacher), teacher samples", False),
    "teacher_nll": ("teacher NLL per token of the student's samples", False),
}
BATCH = 16


def records_by_key(evaluate: Path, label: str) -> dict[tuple[str, int, str], dict]:
    """(data set, evaluation seed, example id) -> record of one evaluated model."""
    return {(row["data"], row["seed"], row["example_id"]): row for row in iter_records(evaluate / label / "records.jsonl")}


def example_ids(records: dict, sets: tuple[str, ...], seed: int) -> dict[str, list[str]]:
    """Per set, the evaluated example ids in a fixed order (every model was scored on the same ones)."""
    return {name: sorted(key[2] for key in records if key[0] == name and key[1] == seed) for name in sets}


def rouge_scores(records: dict, ids: dict[str, list[str]], seeds: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per set, [examples] ROUGE-L averaged over the evaluation seeds."""
    return {name: np.array([np.mean([records[(name, seed, key)]["rougeL"] for seed in seeds]) for key in keys]) for name, keys in ids.items()}


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval(), AutoTokenizer.from_pretrained(str(model_dir))


@torch.no_grad()
def response_log_probs(model, pairs: list[tuple[list[int], list[int]]], vocab: int) -> list[torch.Tensor]:
    """[response length, vocab] next-token log-probabilities over each response (right-padded batches)."""
    out = []
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        length = max(len(prompt) + len(response) for prompt, response in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, (prompt, response) in enumerate(chunk):
            ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
            mask[row, : len(prompt) + len(response)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab].float()
        out += [logits[row, len(prompt) - 1 : len(prompt) + len(response) - 1].log_softmax(-1) for row, (prompt, response) in enumerate(chunk)]
    return out


def _kl(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean over positions of KL(first‖second), both [positions, vocab] log-probabilities."""
    return float((first.exp() * (first - second)).sum(-1).mean())


def _nll(log_probs: torch.Tensor, targets: list[int]) -> float:
    return float(-log_probs.gather(-1, torch.tensor(targets)[:, None]).mean())


class Fidelity:
    """The teacher's side, computed once: prompts, reference and teacher-sample responses, and the
    teacher's log-probabilities over both (kept in float16); `of` scores one student against it."""

    def __init__(self, teacher_dir: Path, evaluate: Path, sets: tuple[str, ...], seed: int, examples: int, cap: int) -> None:
        self.teacher, self.tokenizer = _load(teacher_dir)
        self.vocab, self.seed, self.cap, self.evaluate = len(self.tokenizer), seed, cap, evaluate
        records = records_by_key(evaluate, "teacher")
        self.ids = {name: keys[:examples] for name, keys in example_ids(records, sets, seed).items()}
        self.prompts, self.responses, self.cache = {}, {}, {}
        for name, keys in self.ids.items():
            rows = [records[(name, seed, key)] for key in keys]
            self.prompts[name] = [self._encode(row["prompt"], special=True) for row in rows]
            self.responses[name] = {"gt": [self._response(row["references"][0]) for row in rows], "tgen": [self._response(row["prediction"]) for row in rows]}
            self.cache[name] = {kind: [lp.half() for lp in response_log_probs(self.teacher, list(zip(self.prompts[name], responses)), self.vocab)] for kind, responses in self.responses[name].items()}

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _response(self, text: str) -> list[int]:
        return self._encode(text)[: self.cap] or [self.tokenizer.eos_token_id]

    def of(self, label: str, model_dir: Path, cache: Path) -> dict[str, dict[str, list[float]]]:
        """metric -> set -> per-example values for one model; cached in `cache` (a re-run reuses it)."""
        if cache.exists():
            return json.loads(cache.read_text())
        student, _ = _load(model_dir)
        own = records_by_key(self.evaluate, label)
        result = {metric: {} for metric in METRICS if metric != "rougeL"}
        for name, keys in self.ids.items():
            prompts = self.prompts[name]
            for kind in ("gt", "tgen"):
                student_lps = response_log_probs(student, list(zip(prompts, self.responses[name][kind])), self.vocab)
                teacher_lps = [lp.float() for lp in self.cache[name][kind]]
                result[f"kl_ts_{kind}"][name] = [_kl(t, s) for t, s in zip(teacher_lps, student_lps)]
                result[f"kl_st_{kind}"][name] = [_kl(s, t) for t, s in zip(teacher_lps, student_lps)]
            samples = [self._response(own[(name, self.seed, key)]["prediction"]) for key in keys]
            teacher_lps = response_log_probs(self.teacher, list(zip(prompts, samples)), self.vocab)
            result["teacher_nll"][name] = [_nll(lp, sample) for lp, sample in zip(teacher_lps, samples)]
        atomic_write_json(cache, result)
        return result


def distinct(responses: list[list[int]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over a corpus of token sequences."""
    grams = [tuple(tokens[i : i + n]) for tokens in responses for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def scrg_check(fidelity: Fidelity, init_dir: Path, config, seed: int) -> dict:
    """SCRG (the recipe's settings) on the init's own Dolly samples: revised vs original sequences,
    paired teacher NLL per token, and distinct-1/2 of both corpora."""
    from experiments.lab_stats import interval
    from mgsr_cli.sampling import TokenSpace, make_generator
    from mgsr_cli.config import ScrgOptions
    from mgsr_cli.scrg import correct_sequences

    student, tokenizer = _load(init_dir)
    own = records_by_key(fidelity.evaluate, "student-init")
    prompts = fidelity.prompts["dolly"]
    originals = [fidelity._response(own[("dolly", fidelity.seed, key)]["prediction"]) for key in fidelity.ids["dolly"]]
    options = ScrgOptions(divergence=config.scrg_divergence, teacher_token=config.scrg_teacher_token, rounds=config.scrg_rounds, sampling=config.sgo_sampling)
    generator = make_generator(seed, torch.device("cpu"))
    with torch.no_grad():
        revised = [c.response_ids or [tokenizer.eos_token_id] for c in correct_sequences(fidelity.teacher, student, list(zip(prompts, originals)), options, generator, TokenSpace.of(student, tokenizer))]
    nll = {
        kind: np.array([_nll(lp, tokens) for lp, tokens in zip(response_log_probs(fidelity.teacher, list(zip(prompts, responses)), fidelity.vocab), responses)])
        for kind, responses in (("original", originals), ("revised", revised))
    }
    return {
        "sequences": len(originals),
        "changed": sum(a != b for a, b in zip(originals, revised)) / len(originals),
        "teacher_nll": {kind: float(values.mean()) for kind, values in nll.items()},
        "teacher_nll_difference": interval({"dolly": (nll["revised"] - nll["original"])[None, :]}),
        "distinct": {kind: {str(n): distinct(responses, n) for n in (1, 2)} for kind, responses in (("original", originals), ("revised", revised))},
        "settings": {"divergence": options.divergence, "teacher_token": options.teacher_token, "rounds": options.rounds},
    }


def is_gradient_log(key: str) -> bool:
    """The total gradient norm and any per-term gradient magnitude or share distill logs."""
    return key != "sgo_share" and ("grad" in key or "share" in key)


def logged(run: Path, terms: list[str]) -> dict[str, dict[str, float]]:
    """Each logged per-term value over training (loss terms, DAC-KL band stats, gradient shares):
    first, mean, min, max and last of the training log rows."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = sorted({key for row in rows for key in row if key in terms or key.startswith("dac_") or is_gradient_log(key)})
    summary = {}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if values:
            summary[key] = {"first": values[0], "mean": float(np.mean(values)), "min": min(values), "max": max(values), "last": values[-1]}
    return summary
