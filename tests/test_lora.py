"""LoRA distillation keeps its training: the exported student is the base plus exactly the
trained adapters' update, the adapter exports alone on request, and `mgsr evaluate` scores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mgsr_cli.cli import app
from mgsr_cli.config import DistillConfig
from mgsr_cli.config_loading import override
from mgsr_cli.train import run_distill

from .test_distill import FAST

pytest.importorskip("peft")

RANK, ALPHA = 4, 8


def lora_run(tiny_pair, out: Path, **changes) -> Path:
    config = override(DistillConfig(), {
        **FAST, "teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]), "max_steps": 2, "lr": 1e-2,
        "loss": "sft,fkl", "save_every": 1,
        "lora": {"enabled": True, "r": RANK, "alpha": ALPHA, "dropout": 0.3, "export_adapter": True}, **changes,
    })
    return run_distill(config, out)


def trained_adapters(out: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of the last checkpoint, as training left them."""
    checkpoint = max((out / "checkpoints").glob("step-*"), key=lambda path: int(path.name.split("-")[1]))
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    return {name: tensor for name, tensor in state.items() if "lora_" in name}


def test_exported_student_is_base_plus_the_trained_update(tiny_pair, tmp_path):
    out = lora_run(tiny_pair, tmp_path / "run")
    base = load_file(str(tiny_pair[1] / "model.safetensors"))
    exported = load_file(str(out / "student" / "model.safetensors"))
    adapters = trained_adapters(out)
    assert adapters and any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in adapters.items())
    changed = set()
    for name_a in [name for name in adapters if "lora_A" in name]:
        lora_a, lora_b = adapters[name_a], adapters[name_a.replace("lora_A", "lora_B")]
        key = name_a.split(".lora_A")[0].removeprefix("student.") + ".weight"  # the adapted layer's weight
        # GPT-2's Conv1D stores weights transposed (fan_in x fan_out): the update is (B A)^T.
        update = (lora_b @ lora_a).T * (ALPHA / RANK)
        torch.testing.assert_close(exported[key] - base[key], update, rtol=1e-4, atol=1e-6)
        assert update.abs().max() > 1e-5
        changed.add(key)
    assert changed
    for key in set(exported) - changed:  # everything the adapters do not touch stays the base
        torch.testing.assert_close(exported[key], base[key], rtol=0, atol=0)


def test_adapter_alone_and_dropout_off_and_evaluate_scores_it(tiny_pair, tmp_path):
    out = lora_run(tiny_pair, tmp_path / "run")
    adapter_config = json.loads((out / "student" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == RANK and adapter_config["lora_dropout"] == 0.0  # disable_dropout covers LoRA
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--data", "dolly", "--limit", "2",
                                      "--seeds", "10", "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["results"]["run"]["dolly"]["examples"] == 2
