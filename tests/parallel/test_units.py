"""The parts of the parallel engine that need no process group: degree validation, the rank mesh,
sequence splitting, log-sum-exp merging, shard ranges, the CLI flags."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from ditserve.api import InvalidRequest
from ditserve.config import ParallelConfig
from ditserve.models.common.loading import ParamShard
from ditserve.models.common.rope import Rotary
from ditserve.parallel.args import add_parallel_arguments, parallel_config_from_args, torchrun_command
from ditserve.parallel.attention import attention_lse, merge_partials
from ditserve.parallel.groups import axis_groups, coords, mesh_shape, rank_of
from ditserve.parallel.sequence import Split, take_joint


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_gpus=4, ulysses_degree=2), "--num-gpus 4 must equal cfg 1 x ulysses 2 x ring 1 x tp 1 x replicas 1 = 2"),
    (dict(num_gpus=8, cfg_parallel=True, ring_degree=2), "cfg 2 x ulysses 1 x ring 2 x tp 1 x replicas 1 = 4"),
    (dict(num_gpus=3, tp_size=3, nnodes=2, auth_key_file="k"), "--num-gpus 3 is not a multiple of --nnodes 2"),
    (dict(num_gpus=2, ulysses_degree=0), "--ulysses-degree must be a positive integer, got 0"),
    (dict(num_gpus=2, ulysses_degree=2, nnodes=2), "--nnodes 2 needs --auth-key-file"),
    (dict(num_gpus=2, ulysses_degree=2, node_rank=1), "--node-rank 1 must be in [0, 1)"),
])
def test_degrees_are_checked_with_the_numbers(kwargs, message):
    with pytest.raises(InvalidRequest) as info:
        ParallelConfig(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_group_size_counts_one_replica():
    cfg = ParallelConfig(num_gpus=8, cfg_parallel=True, ulysses_degree=2, num_replicas=2)
    assert (cfg.group_size, cfg.sp_degree, cfg.cfg_degree, cfg.enabled) == (4, 2, 2, True)
    assert not ParallelConfig().enabled


def test_mesh_puts_tensor_parallel_innermost():
    shape = mesh_shape(ParallelConfig(num_gpus=16, cfg_parallel=True, ring_degree=2, ulysses_degree=2, tp_size=2))
    assert shape == (2, 2, 2, 2)
    assert [coords(r, shape) for r in (0, 1, 2, 5, 15)] == [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 1),
                                                            (1, 1, 1, 1)]
    assert all(rank_of(coords(r, shape), shape) == r for r in range(16))
    assert axis_groups(shape, (3,))[:2] == [[0, 1], [2, 3]]  # tp: neighbours
    assert axis_groups(shape, (0,))[0] == [0, 8]  # cfg: the two halves
    sp = axis_groups(shape, (1, 2))  # ring x ulysses; member index = ring * U + ulysses
    assert sp[0] == [0, 2, 4, 6] and len(sp) == 4
    assert sorted(r for g in sp for r in g) == list(range(16))


def test_split_pads_the_last_chunks():
    s = Split(15, 4)
    assert (s.chunk, [s.valid(r) for r in range(4)]) == (4, [4, 4, 4, 3])
    x = torch.arange(15.0)[None, :, None]
    parts = [s.take(x, 1, r) for r in range(4)]
    assert torch.equal(torch.cat(parts, 1)[0, :15, 0], torch.arange(15.0))
    assert parts[3][0, -1, 0] == 0
    assert Split(3, 4).valid(3) == 0  # a rank may hold padding only


def test_joint_tables_are_cut_stream_by_stream():
    """A table over (txt 3, img 5) on 2 ranks: rank 1 holds txt[2:3]+pad and img[3:5]+pad."""
    splits = [Split(3, 2), Split(5, 2)]
    table = torch.arange(8.0)[:, None].expand(8, 4)
    rope = take_joint(Rotary(table, -table), 0, splits, 1)
    assert rope.cos[:, 0].tolist() == [2, 0, 6, 7, 0]
    assert torch.equal(rope.sin, -rope.cos)
    mask = take_joint(torch.ones(2, 8, dtype=torch.bool), 1, splits, 1, fill=False)
    assert mask[0].tolist() == [True, False, True, True, False]
    assert take_joint(None, 1, splits, 0) is None


def test_partial_attentions_merge_to_the_whole():
    """Attention over keys in three chunks, merged by log-sum-exp, equals attention over all keys;
    a chunk whose keys are all masked contributes nothing (and no NaN)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 8, generator=g)
    k, v = torch.randn(2, 12, 3, 8, generator=g), torch.randn(2, 12, 3, 8, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 8:] = False  # the last chunk is all padding
    mask[1, 2] = False
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask[:, None, None, :]).transpose(1, 2)
    out = lse = None
    for a, b in ((0, 4), (4, 8), (8, 12)):
        part, part_lse = attention_lse(q, k[:, a:b], v[:, a:b], mask[:, a:b])
        out, lse = merge_partials(out, lse, part, part_lse)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_param_shard_ranges_cut_each_segment():
    assert ParamShard(0, 1, 2).ranges(8) == [(4, 8)]
    assert ParamShard(1, 1, 2, (4, 16)).ranges(20) == [(2, 4), (12, 20)]
    with pytest.raises(ValueError):
        ParamShard(0, 0, 3).ranges(8)


def _parse(argv):
    p = argparse.ArgumentParser()
    add_parallel_arguments(p)
    return parallel_config_from_args(p.parse_args(argv))


def test_flags_default_num_gpus_to_the_product():
    assert _parse(["--enable-cfg-parallel", "--ulysses-degree", "2"]).num_gpus == 4
    assert _parse([]).num_gpus == 1
    with pytest.raises(InvalidRequest, match="--num-gpus 3 must equal"):
        _parse(["--num-gpus", "3", "--ring-degree", "2"])


def test_torchrun_command_for_a_second_machine():
    cfg = _parse(["--ulysses-degree", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                  "--auth-key-file", "/k"])
    cmd = torchrun_command(cfg, python="python")
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    text = " ".join(cmd)
    assert "--nnodes 2 --node-rank 1 --nproc-per-node 4 --master-addr 10.0.0.1 --master-port 29500" in text
    assert text.endswith("-m ditserve.runtime.ranks --driver 10.0.0.1:29501 --auth-key-file /k")
