"""Forward chunking over the sequence and the activation-peak estimate (accel/activations.py): the
chunked DiT equals the unchunked one bit for bit on the CPU in float32 (tiny Wan — with per-sample
and per-token timesteps and image cross-attention —, FLUX, Qwen-Image), every declared site really
runs in chunks, and the estimate counts tensors' lifetimes exactly and drops with chunking."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ditserve.accel import activations as A
from ditserve.accel.activations import (
    LiveBytes,
    apply_forward_chunking,
    chunk_ranges,
    disable_forward_chunking,
    estimate_activation_peak,
    forward_chunk_size,
)
from ditserve.accel.offload import GIB, plan_streaming
from ditserve.api import InvalidRequest
from ditserve.bench.common import arch_kwargs
from ditserve.config.memory import MemoryConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_offload import TINY_ARCH  # noqa: E402

QWEN_ARCH = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=24, axes_dims_rope=[4, 6, 6])


def _init(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _wan(image: bool = False):
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT

    arch = dict(TINY_ARCH["wan2.1-t2v-1.3b"], num_layers=2)
    if image:
        arch.update(image_dim=12, added_kv_proj_dim=32)
    cfg = WanConfig.from_dict(arch_kwargs(arch))
    return cfg, _init(WanDiT(cfg))


def _wan_inputs(cfg, per_token: bool = False, image: bool = False):
    from ditserve.bench import wan
    from ditserve.models.wan.model import WanInputs

    inp = wan.inputs(cfg, 112, 160, 9, "cpu", torch.float32)  # 3 x 7 x 10 = 210 tokens: chunks 64, 64, 82
    gen = torch.Generator().manual_seed(2)
    text = 512 if image else 8  # I2V: the text is the last 512 context tokens
    timesteps = torch.rand(1, 210, generator=gen) * 1000 if per_token else inp.timesteps
    return WanInputs(latents=inp.latents, timesteps=timesteps, context=inp.context[:, :8].repeat(1, text // 8, 1),
                     image=torch.randn(1, 6, 12, generator=gen) if image else None)


def _check_chunked(dit: nn.Module, inp, chunk: int = 64) -> int:
    """dit(inp) chunked equals unchunked bit for bit; returns how many site calls ran on a chunk."""
    with torch.no_grad():
        expected = dit(inp)
        assert apply_forward_chunking(dit, chunk) > 0
        calls = []
        original = A.chunked_call

        def counting(fn, size, dim, x, *args, **kwargs):
            calls.append(len(chunk_ranges(x.shape[dim], size)))
            return original(fn, size, dim, x, *args, **kwargs)

        A.chunked_call = counting
        try:
            apply_forward_chunking(dit, chunk)  # again: the sites now call the counting wrapper
            got = dit(inp)
        finally:
            A.chunked_call = original
        disable_forward_chunking(dit)
        again = dit(inp)
    assert expected.std() > 0.1
    assert torch.equal(got, expected)
    assert torch.equal(again, expected)
    return sum(n > 1 for n in calls)


@pytest.mark.parametrize("per_token", [False, True])
def test_wan_chunked_is_bit_identical(per_token):
    cfg, dit = _wan()
    chunked = _check_chunked(dit, _wan_inputs(cfg, per_token))
    # every site of every block ran in chunks (modulate twice: before attention and inside the FFN part,
    # where it sees one chunk only): 2 blocks x (modulate, attn_residual, cross_attention, ffn_residual, 2 ropes)
    assert chunked == 2 * 6
    assert not any("_ditserve_unchunked" in m.__dict__ for m in dit.modules())  # undone


def test_wan_image_cross_attention_chunked_is_bit_identical():
    cfg, dit = _wan(image=True)
    assert _check_chunked(dit, _wan_inputs(cfg, image=True)) == 2 * 6


def test_flux_and_qwen_image_chunked_are_bit_identical():
    from ditserve.bench import flux, qwen_image
    from ditserve.models.flux.config import FluxConfig
    from ditserve.models.flux.model import FluxDiT
    from ditserve.models.qwen_image.config import QwenImageConfig
    from ditserve.models.qwen_image.model import QwenImageDiT

    cfg = FluxConfig.from_dict(arch_kwargs(TINY_ARCH["flux.1-dev"]))
    dit = _init(FluxDiT(cfg))
    inp = flux.inputs(cfg, 16 * 19, 16 * 13, 8, "cpu", torch.float32)  # 247 image tokens
    from dataclasses import replace

    inp = replace(inp, rope=dit.positional_tables(inp.img_ids, inp.txt_ids))
    assert _check_chunked(dit, inp) == cfg.num_layers  # the image MLPs (the 8 text tokens: one chunk)
    qcfg = QwenImageConfig.from_dict(QWEN_ARCH)
    qdit = _init(QwenImageDiT(qcfg))
    assert _check_chunked(qdit, qwen_image.inputs(qcfg, 16 * 15, 16 * 11, 8, "cpu", torch.float32)) == 2


def test_chunk_ranges_and_flags():
    assert chunk_ranges(210, 64) == [(0, 64), (64, 128), (128, 210)]
    assert chunk_ranges(128, 64) == [(0, 64), (64, 128)]
    assert chunk_ranges(127, 64) == [(0, 127)]  # the remainder joins the last chunk: never a sliver
    assert A.align_chunk(1) == 64 and A.align_chunk(4000) == 4032
    assert forward_chunk_size(None, "layerwise") == A.AUTO_CHUNK_TOKENS
    assert forward_chunk_size(None, "model") is None and forward_chunk_size(0, "layerwise") is None
    assert forward_chunk_size(512, "none") == 512
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidRequest, match="forward-chunk-size"):
            MemoryConfig(forward_chunk_size=bad)
    from ditserve.cli.memory_args import add_memory_arguments, memory_config_from_args

    p = argparse.ArgumentParser()
    add_memory_arguments(p)
    assert memory_config_from_args(p.parse_args(["--forward-chunk-size", "2048"])).forward_chunk_size == 2048
    assert memory_config_from_args(p.parse_args([])).forward_chunk_size is None


def test_live_bytes_counts_lifetimes_exactly():
    ff = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).to("meta")
    x = torch.empty(1, 1000, 8, device="meta")
    meter = LiveBytes()
    with torch.no_grad(), meter:
        out = ff(x)
    # the hidden layer and its GELU (4 bytes x 32 wide each), then GELU's output with the result (8 wide)
    assert meter.peak == 1000 * 4 * 64
    assert meter.now == out.numel() * 4  # only the result is still alive
    ff.forward = lambda t: A.chunked_call(nn.Sequential.forward.__get__(ff), 128, 1, t)
    meter = LiveBytes()
    with torch.no_grad(), meter:
        ff(x)
    # the output, and the last chunk's (tokens 768..1000) hidden layer and GELU
    assert meter.peak == 1000 * 4 * 8 + 2 * (232 * 4 * 32)


def test_activation_estimate_drops_with_chunking_at_size():
    """A 14B-wide Wan block on the meta device at 8,000 tokens: the estimate runs without computing, and
    chunking lowers it (the float32 residuals and the FFN hidden layer are no longer whole)."""
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT, WanInputs

    arch = dict(TINY_ARCH["wan2.1-t2v-1.3b"], num_layers=1, attention_head_dim=128, num_attention_heads=40,
                ffn_dim=13824, text_dim=4096, rope_max_seq_len=1024)
    cfg = WanConfig.from_dict(arch_kwargs(arch))
    dit = A.meta_copy(WanDiT, cfg, torch.bfloat16)
    meta = dict(device="meta")
    inp = WanInputs(latents=torch.empty(1, 16, 5, 80, 160, dtype=torch.bfloat16, **meta),
                    timesteps=torch.empty(1, **meta), context=torch.empty(1, 512, 4096, dtype=torch.bfloat16, **meta))
    whole = estimate_activation_peak(dit, inp)
    apply_forward_chunking(dit, 1024)
    chunked = estimate_activation_peak(dit, inp)
    assert whole.tokens == chunked.tokens == 5 * 40 * 80
    token_bytes = 5120 * 2  # one bf16 token of the model width
    # whole: the key's rotary float32 copy (2 widths) beside x, the rotated q, the normalised k and v
    assert 6 * token_bytes < whole.per_token < 8 * token_bytes
    assert chunked.peak_bytes < 0.75 * whole.peak_bytes  # chunked: the attention's x, q, k, v and output (5 widths)
    assert not any(p.device.type != "meta" for p in dit.parameters())


def test_budget_keeps_room_for_the_estimated_activations():
    blocks = [nn.Linear(256, 256) for _ in range(8)]  # 257 KiB each
    size = sum(p.numel() * 4 for p in blocks[0].parameters())
    budget = int(2 * GIB + 6 * size)
    resident, _ = plan_streaming(blocks, 1, budget, 0)  # the default 2 GiB reserve: 4 resident + 2 in flight
    assert len(resident) == 4
    resident, _ = plan_streaming(blocks, 1, budget, 0, reserve_bytes=int(2 * GIB + 2 * size))
    assert len(resident) == 2


@pytest.mark.slow  # 5 s: two loads and runs of the tiny Wan folder (the DiT-level tests above are the fast proof)
def test_generator_forward_chunking_is_bit_identical(tiny_wan):
    from ditserve import Generator

    request = dict(prompt="a cat", height=128, width=128, num_frames=5, num_inference_steps=2, seed=5,
                   max_sequence_length=16)
    outs = []
    for memory in ({}, {"forward_chunk_size": 64}):
        gen = Generator.from_pretrained(tiny_wan(), device="cpu", dtype=torch.float32, memory=memory)
        outs.append(np.stack(gen.generate(**request).videos))
    dit = gen.engine.pipeline.dit
    assert "_ditserve_unchunked" in dit.blocks[0].__dict__  # the flag reached the DiT
    assert outs[0].std() > 1 and np.array_equal(outs[0], outs[1])


@pytest.mark.slow  # 20 s: two runs of each tiny video folder at 192 video tokens
@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video"])
def test_video_families_chunked_are_bit_identical(family, request):
    from ditserve import Generator

    folder = request.getfixturevalue("tiny_cogvideox")() if family == "cogvideox" else \
        request.getfixturevalue("tiny_hunyuan_video")
    run = dict(prompt="a fox", height=128, width=128, num_frames=9, num_inference_steps=2, seed=1,
               max_sequence_length=226 if family == "cogvideox" else 16)
    outs = [np.stack(Generator.from_pretrained(folder, device="cpu", dtype=torch.float32, memory=memory)
                     .generate(**run).videos) for memory in ({}, {"forward_chunk_size": 64})]
    assert outs[0].std() > 1 and np.array_equal(outs[0], outs[1])


def test_budget_is_planned_at_the_first_call_around_its_activations(tiny_flux_dev):
    """Under a budget the engine streams every block until the DiT's first call, estimates that call's
    activations and keeps resident what fits beside them; the image does not change."""
    from ditserve import Generator

    request = dict(prompt="a red fox", height=32, width=48, num_inference_steps=2, seed=3, max_sequence_length=16)
    plain = np.asarray(Generator.from_pretrained(tiny_flux_dev, device="cpu", dtype=torch.float32)
                       .generate(**request).images[0])
    # 0.3 GiB: the DiT's 516 KiB and its activations (with the estimate's margin) fit, so every block
    # ends resident (under the fixed 2 GiB reserve of a budget without an estimate, none would)
    gen = Generator.from_pretrained(tiny_flux_dev, device="cpu", dtype=torch.float32, cpu_offload="layerwise",
                                    memory={"gpu_memory_budget_gib": 0.3})
    offloader = gen.engine.pipeline.offloader
    blocks = len(gen.engine.pipeline.dit.blocks)
    assert len(offloader.streamers["transformer"].copies) == blocks and not offloader.activation_gib
    got = np.asarray(gen.generate(**request).images[0])
    assert np.array_equal(got, plain)
    estimate = offloader.activation_gib["transformer"]
    assert 0 < estimate < 0.001
    assert "transformer" not in offloader.streamers  # all resident now
    assert np.array_equal(np.asarray(gen.generate(**request).images[0]), plain)


@pytest.mark.parametrize("memory, chunked_after", [
    ({"gpu_memory_budget_gib": 0.3}, False),  # every block fits unchunked: the automatic chunk goes
    ({"gpu_memory_budget_gib": 0.3, "forward_chunk_size": 64}, True),  # asked for: it stays
    ({"gpu_memory_budget_gib": 0.25}, True),  # nothing fits beside the reserve: keep the smaller peak
    ({}, False),  # no budget: everything streams, and the unchunked activations fit what is free
    ({"forward_chunk_size": 64}, True),
])
def test_automatic_chunk_stays_only_where_it_keeps_blocks_resident(tiny_flux_dev, memory, chunked_after):
    from ditserve import Generator
    from ditserve.accel.activations import chunk_of

    request = dict(prompt="a red fox", height=32, width=48, num_inference_steps=2, seed=3, max_sequence_length=16)
    gen = Generator.from_pretrained(tiny_flux_dev, device="cpu", dtype=torch.float32, cpu_offload="layerwise",
                                    memory=memory)
    dit = gen.engine.pipeline.dit
    assert chunk_of(dit)  # layerwise chunks from the start (the plan waits for the first call)
    gen.generate(**request)
    assert bool(chunk_of(dit)) == chunked_after


def test_automatic_chunk_stays_where_free_memory_is_short(tiny_flux_dev, monkeypatch):
    """Layerwise without a budget keeps the automatic chunk when the unchunked activations would not fit
    what the device has free at the DiT's first call (here: a device with 1 MiB free); the image is the
    same either way."""
    from ditserve import Generator
    from ditserve.accel import offload
    from ditserve.accel.activations import chunk_of

    request = dict(prompt="a red fox", height=32, width=48, num_inference_steps=2, seed=3, max_sequence_length=16)
    images = []
    for free_gib in (None, 2**-10):
        if free_gib is not None:
            monkeypatch.setattr(offload, "free_device_gib", lambda _device: free_gib)
        gen = Generator.from_pretrained(tiny_flux_dev, device="cpu", dtype=torch.float32, cpu_offload="layerwise")
        images.append(np.asarray(gen.generate(**request).images[0]))
        assert bool(chunk_of(gen.engine.pipeline.dit)) == (free_gib is not None)
    assert np.array_equal(images[0], images[1])


def test_chunked_blocks_compile_to_one_graph():
    """Every block's chunked feed-forward has the same type and forward, so torch.compile (fullgraph, as
    accel/compile.py compiles blocks) makes one graph for all double blocks instead of recompiling per
    block and failing past dynamo's recompile limit (8) — FLUX.1-dev has 19. The eager backend: the
    guards are dynamo's, whatever the backend."""
    import torch._dynamo

    from ditserve.bench import flux
    from ditserve.models.flux.config import FluxConfig
    from ditserve.models.flux.model import FluxDiT

    cfg = FluxConfig.from_dict(arch_kwargs(dict(TINY_ARCH["flux.1-dev"], num_layers=10, num_single_layers=1)))
    dit = _init(FluxDiT(cfg))
    inp = flux.inputs(cfg, 16 * 19, 16 * 13, 8, "cpu", torch.float32)  # 247 image tokens: chunks 64, 64, 119
    torch._dynamo.reset()
    with torch.no_grad():
        expected = dit(inp)
        apply_forward_chunking(dit, 64)
        for block in dit.blocks:
            block.compile(fullgraph=True, dynamic=False, backend="eager")
        got = dit(inp)
    torch._dynamo.reset()
    assert torch.equal(got, expected)


def test_single_stream_block_holds_only_its_projections_at_its_peak():
    """FLUX.1-dev's single-stream block at full width on the meta device, 4,608 tokens. Its peak is the
    eager RoPE of k: linear1's output (q, k, v and the MLP input: 7 model widths a token), x, the rotated
    q, the normalised k, its float32 copy (2) and the rotated k: 13. The MLP half stays under that: GELU
    in place and the attention output written over v, so linear2 reads a slice of linear1's output. A
    concatenated [attention, MLP] (5 more, 14 at that point) breaks the bound, as do a separate GELU
    output or q and k kept alive past the attention (as the block once had: 20)."""
    from ditserve.models.common.mmdit import SingleStreamBlock
    from ditserve.models.common.rope import Rotary

    dim, tokens = 3072, 4608
    with torch.device("meta"):
        block = SingleStreamBlock(dim, 24, 4.0).to(torch.bfloat16).eval()
        img = torch.empty(1, tokens - 512, dim, dtype=torch.bfloat16)
        txt = torch.empty(1, 512, dim, dtype=torch.bfloat16)
        vec = torch.empty(1, dim, dtype=torch.bfloat16)
        rope = Rotary(torch.empty(tokens, 128), torch.empty(tokens, 128))
    block.attn_op = A._flash_like
    meter = LiveBytes()
    with torch.no_grad(), A._FusedAsOnGPU(), meter:
        block(img, txt, vec, rope)
    row = tokens * dim * 2  # one bf16 tensor of the model width
    assert meter.peak <= 13 * row + 2**22  # and the rotary angles as complex numbers (2.4 MB)


def test_rope_leaves_a_float32_input_alone():
    from ditserve.models.common.rope import Rotary, apply_rope

    x = torch.randn(1, 6, 2, 8)
    before = x.clone()
    angles = torch.rand(6, 8)
    out = apply_rope(x, Rotary(angles.cos(), angles.sin()))
    assert torch.equal(x, before)
    assert not torch.equal(out, before)


def test_feed_forward_holds_one_hidden_layer():
    """The blocks' feed-forward applies its GELU over the hidden layer in place: the same values as
    nn.GELU(approximate="tanh"), and at its peak the hidden layer (32 wide) and the output (8), not a
    second 32-wide GELU output beside the first."""
    from ditserve.models.common.layers import feed_forward

    torch.manual_seed(0)
    ff = feed_forward(8, 32)
    reference = nn.Sequential(ff[0], nn.GELU(approximate="tanh"), ff[2])
    x = torch.randn(1, 1000, 8)
    with torch.no_grad():
        assert torch.equal(ff(x), reference(x))
    meter = LiveBytes()
    with torch.no_grad(), meter:
        ff(x)
    assert meter.peak == 1000 * 4 * (32 + 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_slices_equals_rope_whole(dtype, monkeypatch):
    """Eager RoPE rotates EAGER_SLICE tokens at a time (its float32 copy one slice long): the same bits as
    the whole sequence at once, for a non-contiguous input (a strided view of a fused projection) too."""
    from ditserve.models.common import rope as R

    torch.manual_seed(0)
    qkv = torch.randn(2, 300, 3, 3, 16).to(dtype)
    q = qkv[:, :, 0]  # [B, S, H, D], strided
    ids = torch.stack([torch.zeros(300), torch.arange(300.0) // 20, torch.arange(300.0) % 20], -1)
    table = R.rope_tables(ids, (4, 6, 6), 10000.0)
    whole = R.apply_rope(q, table)
    monkeypatch.setattr(R, "EAGER_SLICE", 64)  # 300 tokens: four full slices and a short one
    sliced = R.apply_rope(q, table)
    assert torch.equal(whole, sliced) and sliced.dtype == dtype
    assert not torch.equal(sliced, q)
