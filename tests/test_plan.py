"""`neuroar plan`: counts on the meta device that match the real models, and a guarded measured step."""

import pytest
import torch

from conftest import TINY
from neuroar.cli import main
from neuroar.config import load_config
from neuroar.errors import NeuroARError
from neuroar.models.tokenizer import MSVQVAE
from neuroar.models.transformer import build_transformer
from neuroar.plan import measure_steps, parameter_counts, step_costs


def test_parameter_counts_match_the_built_models():
    config = load_config("demo")
    counts = parameter_counts(config)
    assert counts["tokenizer (MS-VQVAE)"] == sum(p.numel() for p in MSVQVAE(config.tokenizer).parameters())
    assert counts["NeuroAR transformer"] == sum(p.numel() for p in build_transformer(config).parameters())
    assert parameter_counts(load_config("paper"))["NeuroAR transformer"] > 2.5e9  # 32 blocks of width 2048


def test_flops_and_activations_grow_with_the_batch():
    config = load_config("demo")
    one, two = step_costs(config, 1), step_costs(config, 2)
    for a, b in zip(one, two):
        assert a.flops > 0 and b.flops == pytest.approx(2 * a.flops, rel=0.01)
        assert b.activation_bytes == pytest.approx(2 * a.activation_bytes, rel=0.05)
        assert b.memory_bytes() > a.memory_bytes() > 16 * a.parameters


def test_plan_prints_tokens_per_scale_and_a_measured_step(capsys):
    assert main(["plan", "--config", "demo", *TINY, "--run-step"]) == 0
    out = capsys.readouterr().out
    assert "| all |  | 577 |" in out  # 1 + 64 + 512 tokens
    assert "measured tokenizer step" in out and "measured NeuroAR step" in out


def test_a_step_that_cannot_fit_is_refused(monkeypatch):
    monkeypatch.setattr("neuroar.plan.free_memory_bytes", lambda device: 2**20)
    with pytest.raises(NeuroARError, match="GiB free"):
        measure_steps(load_config("demo", TINY), 1, torch.device("cpu"))


def test_activation_checkpointing_trades_flops_for_memory():
    plain = step_costs(load_config("demo", ["transformer.depth=4"]), 2)[1]
    checkpointed = step_costs(load_config("demo", ["transformer.depth=4",
                                                   "train_transformer.activation_checkpointing=true"]), 2)[1]
    assert checkpointed.activation_bytes < 0.5 * plain.activation_bytes
    assert checkpointed.flops > plain.flops  # the forward pass of every block runs twice
