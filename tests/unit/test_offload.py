"""CPU offload, the text-encoder device and the memory flags (accel/offload.py) on the CPU, where the
"device" and the "host" are both the CPU: the copies are still made and dropped, so the mechanics
run, and the output must be bit-identical to no offload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ditserve import Generator
from ditserve.accel.offload import GIB, BlockStreamer, HostCopy, plan_streaming
from ditserve.api import InvalidRequest
from ditserve.config.memory import MemoryConfig, memory_config

IMAGE = dict(prompt="a red fox", height=32, width=48, num_inference_steps=2, seed=3, max_sequence_length=16)
VIDEO = dict(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=4, seed=5,
             max_sequence_length=16)


def _gen(folder, offload="none", **memory):
    return Generator.from_pretrained(folder, device="cpu", dtype=torch.float32, cpu_offload=offload, memory=memory)


def _pixels(out) -> np.ndarray:
    if out.videos:
        return np.stack(out.videos)
    return np.stack([np.asarray(im) for im in out.images])


def _outputs(folder, runs, request):
    """Pixels of each (offload, memory keys) run; the generator of the last run."""
    got = []
    for offload, memory in runs:
        gen = _gen(folder, offload, **memory)
        got.append(_pixels(gen.generate(**request)))
    return got, gen


def test_flux_offload_is_bit_identical(tiny_flux_dev):
    (plain, model, layer, layer2), gen = _outputs(tiny_flux_dev, [
        ("none", {}), ("model", {}), ("layerwise", {"offload_group_size": 2}), ("layerwise", {})], IMAGE)
    assert plain.std() > 5
    for got in (model, layer, layer2):
        assert np.array_equal(got, plain)
    offloader = gen.engine.pipeline.offloader
    streamer = offloader.streamers["transformer"]
    blocks = len(gen.engine.pipeline.dit.blocks)
    # one group per block, each fetched once per step (2 steps); the last block of a step prefetches the
    # first for the next step (once more after the last step, dropped when the VAE comes over)
    assert len(streamer.copies) == blocks and streamer.transfers == 2 * blocks + 1
    assert offloader.resident == {"vae"}  # the last stage's component; the others wait on the host
    dit = gen.engine.pipeline.dit
    assert all(not p.is_pinned() for p in dit.parameters())  # no CUDA here: plain host memory


def test_qwen_image_layerwise_is_bit_identical(tiny_qwen_image):
    request = dict(IMAGE, negative_prompt=" ", true_cfg_scale=4.0)
    (plain, layer), _ = _outputs(tiny_qwen_image, [("none", {}), ("layerwise", {"offload_group_size": 3})], request)
    assert np.array_equal(layer, plain)


def test_wan_two_experts_offload_is_bit_identical(tiny_wan):
    folder = tiny_wan("a14b")
    (plain, layer), gen = _outputs(folder, [("none", {}), ("layerwise", {})], VIDEO)
    assert np.array_equal(layer, plain)
    offloader = gen.engine.pipeline.offloader
    assert set(offloader.streamers) == {"transformer", "transformer_2"}
    # text encoder, expert 1, expert 2 (the boundary falls inside the 4 steps), VAE: each came over once
    assert offloader.loads == 4
    assert all(s.transfers > 0 for s in offloader.streamers.values())


def test_text_encoder_on_cpu_keeps_the_image(tiny_flux_dev):
    (plain, cpu), gen = _outputs(tiny_flux_dev, [("none", {}), ("none", {"text_encoder_device": "cpu"})], IMAGE)
    assert np.array_equal(cpu, plain)
    assert gen.engine.pipeline.t5.model.device.type == "cpu"


def test_streamer_moves_groups_and_prefetches_the_next():
    blocks = [nn.Linear(4, 4) for _ in range(5)]
    weights = [b.weight.detach().clone() for b in blocks]
    streamer = BlockStreamer([blocks[0:2], blocks[2:4], blocks[4:5]], torch.device("cpu"), pin=False)
    hosts = [b.weight.data_ptr() for b in blocks]
    x = torch.randn(1, 4)
    expected = x
    for w, b in zip(weights, blocks):
        expected = expected @ w.t() + b.bias.data
    seen = []
    h = x
    for k, block in enumerate(blocks):
        h = block(h)
        seen.append(sorted(streamer.loaded))
    assert torch.equal(h, expected)
    # group 0 and its successor on entry; group 0 dropped after block 1; group 2 prefetches group 0 again
    assert seen == [[0, 1], [1], [1, 2], [2], [0]]
    assert all(b.weight.data_ptr() == host for b, host in zip(blocks[2:], hosts[2:]))  # back on the host copies
    assert blocks[0].weight.data_ptr() != hosts[0]  # prefetched for the next call: a device copy


def test_host_copy_shares_tied_tensors():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.register_buffer("table", torch.arange(3.0))
    copy = HostCopy([model], pin=False)
    assert len(copy.params) == 2 and len(copy.buffers) == 1
    before = model(torch.ones(1, 3))
    copy.to_device(torch.device("cpu"))
    assert torch.equal(model(torch.ones(1, 3)), before)
    copy.to_host()
    assert model[0].weight.data_ptr() == copy.params[0][1].data_ptr()


def test_budget_keeps_the_first_blocks_that_fit():
    blocks = [nn.Linear(256, 256, bias=False) for _ in range(8)]  # 256 KiB each
    size = 256 * 256 * 4
    reserve = 2 * GIB
    resident, groups = plan_streaming(blocks, 1, None, 0)
    assert resident == [] and len(groups) == 8
    resident, groups = plan_streaming(blocks, 2, reserve + 7 * size, 0)  # 3 resident + 2 groups of 2 in flight
    assert len(resident) == 3 and [len(g) for g in groups] == [2, 2, 1]
    resident, groups = plan_streaming(blocks, 1, reserve + 100 * size, 0)
    assert len(resident) == 8 and groups == []
    resident, _ = plan_streaming(blocks, 2, reserve + 7 * size, 4 * size)  # the DiT's other weights count too
    assert len(resident) == 0


def test_memory_settings_are_checked():
    with pytest.raises(InvalidRequest, match="cpu-offload"):
        MemoryConfig(cpu_offload="everything")
    with pytest.raises(InvalidRequest, match="layerwise"):
        MemoryConfig(cpu_offload="model", gpu_memory_budget_gib=12)
    with pytest.raises(InvalidRequest, match="offload-group-size"):
        MemoryConfig(cpu_offload="layerwise", offload_group_size=0)
    with pytest.raises(InvalidRequest, match="unknown memory key"):
        memory_config("model", {"budget": 3})
    assert memory_config("layerwise", {"gpu_memory_budget_gib": 12}).gpu_memory_budget_gib == 12
    with pytest.raises(InvalidRequest, match="several GPUs"):
        Generator.from_pretrained(device="cpu", cpu_offload="model", parallel={"num_gpus": 2, "ulysses_degree": 2})


def test_cli_flags_reach_the_config():
    from ditserve.cli.engine_args import engine_config
    from ditserve.cli.main import build_parser

    for command in ("generate", "serve"):
        argv = [command, "--cpu-offload", "layerwise", "--offload-group-size", "4", "--gpu-memory-budget", "12",
                "--text-encoder-device", "cpu", "--vae-tiling", "on", "--vae-slicing"]
        args = build_parser().parse_args(argv + (["--prompt", "x"] if command == "generate" else []))
        assert engine_config(args, "m").memory == MemoryConfig("layerwise", 4, 12.0, "cpu", "on", True)


def test_generate_command_with_every_memory_flag(tmp_path):
    """`ditserve generate` with the memory flags on the demo model: the image it writes is the one the
    plain Python API gives (64² is one VAE tile: tiling on changes nothing), and the perf dump has no
    peak memory on the CPU."""
    import json

    from PIL import Image

    from ditserve.cli.main import main

    out, perf = tmp_path / "out.png", tmp_path / "perf.json"
    prompt = "a red circle on the left, blue background"
    status = main(["generate", "--prompt", prompt, "--seed", "1", "--device", "cpu", "--output", str(out),
                   "--perf-dump-path", str(perf), "--cpu-offload", "layerwise", "--offload-group-size", "2",
                   "--text-encoder-device", "cpu", "--vae-tiling", "on", "--vae-slicing", "--log-level", "error"])
    assert status == 0
    plain = Generator.from_pretrained(device="cpu").generate(prompt, seed=1).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(plain))
    assert "peak_memory_gib" not in json.loads(perf.read_text())
