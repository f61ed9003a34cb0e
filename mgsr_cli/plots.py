"""The loss-curve PNG of a distill run, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

TERM_NAMES = ("sft", "dac_kl", "span", "fkl", "rkl", "js", "tvd")


def plot_training(metrics_path: Path, target: Path) -> None:
    """Training loss and its terms (left), validation loss and ROUGE-L (right), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [row for row in rows if "loss" in row]
    validation = [row for row in rows if "val_loss" in row]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [row["step"] for row in train]
        left.plot(steps, [row["loss"] for row in train], label="loss", linewidth=2)
        for name in sorted({key for row in train for key in row if key in TERM_NAMES or ":" in key}):
            left.plot(steps, [row.get(name, float("nan")) for row in train], label=name, linewidth=1)
    left.set(xlabel="step", ylabel="training loss", title="training")
    left.legend(fontsize=8)
    if validation:
        steps = [row["step"] for row in validation]
        right.plot(steps, [row["val_loss"] for row in validation], marker="o", label="val loss")
        if any("val_rougeL" in row for row in validation):
            rouge = right.twinx()
            rouge.plot(steps, [row.get("val_rougeL", float("nan")) for row in validation], marker="s", color="tab:green", label="val ROUGE-L")
            rouge.set_ylabel("ROUGE-L")
    right.set(xlabel="step", ylabel="validation loss", title="validation")
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
