"""The "fp8" attention backend is wired through config, CLI and selection; on the CPU its op is
exactly SDPA. No Triton needed: the kernels themselves are checked in test_fp8_attention_kernel.py."""

import argparse

import pytest
import torch

from ditserve.accel import accelerate_dit
from ditserve.accel import attention as backends
from ditserve.accel.fp8_attention import fp8_attention
from ditserve.api import InvalidRequest
from ditserve.config import AccelConfig
from ditserve.models.common.attention import sdpa_attention
from ditserve.models.flux import FluxConfig, FluxDiT


def test_config_and_cli_accept_fp8():
    from ditserve.cli.generate import accel_config, add_model_args

    assert AccelConfig(attention="fp8").attention == "fp8"
    with pytest.raises(InvalidRequest):
        AccelConfig(attention="fp9")
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert accel_config(parser.parse_args(["--attention-backend", "fp8"])).attention == "fp8"


def test_selection_needs_cuda_and_triton(monkeypatch):
    assert "fp8" in backends.BACKENDS
    assert backends.select_attention("fp8", torch.device("cpu")) is sdpa_attention
    monkeypatch.setattr(backends, "available", lambda name: True)
    assert backends.select_attention("fp8", torch.device("cuda")) is fp8_attention
    monkeypatch.setattr(backends, "available", lambda name: False)
    with pytest.raises(ValueError, match="not installed"):
        backends.select_attention("fp8", torch.device("cuda"))


def test_cpu_op_is_sdpa_with_and_without_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 64) for _ in range(3))
    mask = torch.rand(2, 37) > 0.3
    assert torch.equal(fp8_attention(q, k, v), sdpa_attention(q, k, v))
    assert torch.equal(fp8_attention(q, k, v, mask=mask), sdpa_attention(q, k, v, mask=mask))


def test_accelerate_with_fp8_attention_on_cpu_keeps_sdpa():
    cfg = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
                     axes_dims_rope=(4, 6, 6))
    dit = accelerate_dit(FluxDiT(cfg).eval(), AccelConfig(attention="fp8"), torch.device("cpu"))
    assert all(block.attn_op is sdpa_attention for block in dit.blocks)
