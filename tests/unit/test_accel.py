"""Speed transforms on the CPU: what can run here runs, GPU-only paths fall back cleanly."""

import torch
from torch import nn

from ditserve.accel import accelerate_dit
from ditserve.accel.segments import SegmentedDiT, flatten, unflatten
from ditserve.accel.fp8 import E4M3_MAX, FP8Linear, apply_fp8, quantize_rows
from ditserve.config import AccelConfig
from ditserve.models.flux import FluxConfig, FluxDiT
from ditserve.models.flux.model import FluxInputs


def tiny_dit() -> FluxDiT:
    torch.manual_seed(0)
    cfg = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                     num_attention_heads=16, joint_attention_dim=24, pooled_projection_dim=20,
                     guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return FluxDiT(cfg).eval()


def tiny_inputs() -> FluxInputs:
    g = torch.Generator().manual_seed(1)
    return FluxInputs(img=torch.randn(1, 6, 16, generator=g), txt=torch.randn(1, 4, 24, generator=g),
                      pooled=torch.randn(1, 20, generator=g), timesteps=torch.tensor([0.5]),
                      img_ids=torch.zeros(6, 3), txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5]))


def test_quantize_rows_round_trip_within_e4m3_precision():
    x = torch.randn(64, 256) * torch.logspace(-2, 2, 64)[:, None]  # rows of very different scale
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert float(q.float().abs().amax()) <= E4M3_MAX
    back = q.float() * scale
    rel = (back - x).norm(dim=1) / x.norm(dim=1)
    assert float(rel.max()) < 0.05  # e4m3 has a 3-bit mantissa: a few percent per row at most


def test_apply_fp8_swaps_only_large_block_projections():
    dit = apply_fp8(tiny_dit(), min_features=256)
    swapped = [n for n, m in dit.named_modules() if isinstance(m, FP8Linear)]
    assert swapped and all(n.startswith(("double_blocks", "single_blocks")) for n in swapped)
    assert not any(n.endswith(("mod.lin", "modulation.lin")) for n in swapped)
    assert isinstance(dit.img_in, nn.Linear)


def test_apply_fp8_carries_fast_accumulation_to_every_layer():
    """AccelConfig.fp8_fast_accum reaches `_scaled_mm` through each FP8Linear (the GEMM itself runs on
    the GPU: tests/gpu compares it with the promoted sum)."""
    for fast in (False, True):
        layers = [m for m in apply_fp8(tiny_dit(), min_features=256, fast_accum=fast).modules()
                  if isinstance(m, FP8Linear)]
        assert layers and all(m.fast_accum is fast for m in layers)


def test_cpu_accelerate_is_a_no_op_without_compile():
    dit = tiny_dit()
    assert accelerate_dit(dit, AccelConfig(quantization="fp8"), torch.device("cpu")) is dit
    assert not any(isinstance(m, FP8Linear) for m in dit.modules())


def test_segmented_dit_equals_the_plain_forward_and_falls_back_on_cpu():
    """Embed, block groups, head run one after another give the plain forward's output, whatever
    the grouping; on the CPU no graph is captured."""
    dit = tiny_dit()
    inp = tiny_inputs()
    with torch.no_grad():
        expected = dit(inp)
        for group_size in (None, 1):
            wrapped = SegmentedDiT(dit, graphs=True, group_size=group_size)
            assert torch.equal(wrapped(inp), expected)
            assert wrapped.cfg is dit.cfg and wrapped.blocks == dit.blocks
            assert all(not fn.graphs for fn in wrapped.group_fns)
    assert len(SegmentedDiT(dit, group_size=1).groups) == len(dit.blocks)


def test_segment_hook_between_block_groups_sees_the_step_context():
    """The hook after each block group (where a step cache skips or a parallel wrapper talks) gets
    the hidden state and the step context; what it returns is what the next segment runs on."""
    from ditserve.models.common.dit import Hidden, StepContext

    dit = tiny_dit()
    inp = tiny_inputs()
    wrapped = SegmentedDiT(dit, graphs=False, group_size=1)
    seen = []

    def between(h: Hidden, k: int, ctx: StepContext) -> Hidden:
        seen.append((k, ctx.step))
        return Hidden((h.streams[0] * 0, h.streams[1]), h.consts) if k == 1 else h

    wrapped.between = between
    with torch.no_grad():
        out = wrapped(inp, StepContext(step=3, num_steps=4))
        vec = dit.embed(inp).consts[0]
        zeroed = dit.final_layer(torch.zeros(1, 6, dit.cfg.hidden_size), vec)  # the last group's image zeroed
    assert seen == [(0, 3), (1, 3)]
    torch.testing.assert_close(out, zeroed)


def test_flatten_round_trips_nested_inputs():
    inp = tiny_inputs()
    tensors, spec = flatten(inp)
    assert len(tensors) == 7  # guidance set, rope None
    back = unflatten(spec, tensors)
    assert type(back) is FluxInputs and back.img is inp.img and back.rope is None
    assert flatten(tiny_inputs())[1] == spec  # same shapes and dtypes: the same graph key


def test_attention_backend_selection_and_fallbacks():
    import pytest

    from ditserve.accel.attention import apply_attention, select_attention
    from ditserve.models.common.attention import sdpa_attention

    cpu = torch.device("cpu")
    assert select_attention("auto", cpu) is sdpa_attention
    assert select_attention("fa3", cpu) is sdpa_attention  # GPU-only kernels fall back on CPU
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_attention("xformers", cpu)
    dit = tiny_dit()

    def marked(q, k, v, mask=None):
        marked.calls += 1
        return sdpa_attention(q, k, v, mask)

    marked.calls = 0
    apply_attention(dit, marked)
    inp = tiny_inputs()
    with torch.no_grad():
        dit(inp)
    assert marked.calls == len(dit.blocks)


def _block_updates(dit: FluxDiT, seed: int = 0) -> list[torch.Tensor]:
    """Each block's update to the image stream from small streams (so bf16 rounding of the residual
    sum does not swamp the update), as the bench's block guard measures it."""
    g = torch.Generator().manual_seed(seed)
    dtype = dit.img_in.weight.dtype
    img = (torch.randn(1, 64, dit.cfg.hidden_size, generator=g) * 0.01).to(dtype)
    txt = (torch.randn(1, 8, dit.cfg.hidden_size, generator=g) * 0.01).to(dtype)
    vec = torch.randn(1, dit.cfg.hidden_size, generator=g).to(dtype)
    ids = torch.cat([torch.zeros(8, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0),
                                                                   torch.arange(8.0), indexing="ij"), -1).view(64, 3)])
    rope = dit.positional_tables(ids[8:], ids[:8])
    with torch.no_grad():
        return [block(img, txt, vec, rope)[0] - img for block in dit.blocks]


def test_fp8_linear_is_the_dequantised_matmul():
    """FP8Linear (torch._scaled_mm runs on the CPU too) computes exactly what its quantised operands
    say: (q_x * s_x) @ (q_w * s_w)^T + b, up to the bf16 rounding of the output. Rows of very
    different scale, so a wrong scale layout (per-row vs per-column, transposed) would show."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 384).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-1, 1, 384, dtype=torch.bfloat16)[:, None])
    fp8 = FP8Linear(linear)
    x = (torch.randn(2, 40, 256) * torch.logspace(-2, 2, 40)[None, :, None]).to(torch.bfloat16)
    q_x, s_x = quantize_rows(x.reshape(-1, 256))
    expected = (q_x.float() * s_x) @ (fp8.weight_fp8.float() * fp8.weight_scale.t()).t() + linear.bias.float()
    with torch.no_grad():
        got = fp8(x).reshape(-1, 384).float()
    rel = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(rel.max()) < 1e-2
    exact = linear(x).reshape(-1, 384).float()
    assert 1e-3 < float(((got - exact).norm() / exact.norm())) < 6e-2  # e4m3 rounding, a few percent


def test_fp8_blocks_stay_close_to_bf16_blocks():
    """Whole blocks with FP8 linears: each update moves by the e4m3 rounding through a few matmuls
    (measured 7.1% and 5.4% here; bf16 vs float32 is 0.8%), not more."""
    torch.manual_seed(0)
    cfg = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                     num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=20,
                     guidance_embeds=True, axes_dims_rope=(16, 24, 24))
    dit = FluxDiT(cfg).eval().to(torch.bfloat16)
    expected = _block_updates(dit)
    got = _block_updates(apply_fp8(dit, min_features=256))
    assert sum(isinstance(m, FP8Linear) for m in dit.modules()) == 10  # qkv, proj, 2 MLP per stream; 2 single
    for e, g in zip(expected, got):
        rel = float((g.float() - e.float()).norm() / e.float().norm())
        assert 1e-2 < rel < 0.12, rel


def test_fp8_attention_backend_leaves_wan_cross_attention_to_sdpa():
    """accelerate_dit sets the fp8 op at Wan's self-attention only; the cross-attention (video queries,
    text keys) keeps SDPA. Every other backend, and every site of a family without cross-attention,
    takes them all."""
    from ditserve.accel.attention import backend_sites
    from ditserve.models.flux.plan import FLUX_PLAN
    from ditserve.models.wan.plan import WAN_PLAN

    assert backend_sites(WAN_PLAN, "fp8") == ("attn1.attn_op",)
    assert backend_sites(WAN_PLAN, "sage") == WAN_PLAN.attention_sites == ("attn1.attn_op", "attn2.attn_op")
    assert backend_sites(FLUX_PLAN, "fp8") == FLUX_PLAN.attention_sites


def test_accelerate_dit_sets_the_fp8_op_at_wan_self_attention_only(monkeypatch):
    import ditserve.accel.attention as attention
    from ditserve.accel import accelerate_dit
    from ditserve.config import AccelConfig
    from ditserve.models.common.attention import sdpa_attention
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT

    def marked(q, k, v, mask=None):
        return sdpa_attention(q, k, v, mask)

    monkeypatch.setattr(attention, "select_attention", lambda name, device: marked)
    dit = WanDiT(WanConfig.from_dict(dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                          in_channels=4, out_channels=4, text_dim=20, freq_dim=32, ffn_dim=48,
                                          num_layers=2, cross_attn_norm=True, rope_max_seq_len=64)))
    accelerate_dit(dit, AccelConfig(attention="fp8"), torch.device("cpu"))
    assert all(b.attn1.attn_op is marked and b.attn2.attn_op is not marked for b in dit.blocks)


def test_wide_row_compile_is_accepted_by_inductor_and_keeps_the_output(monkeypatch):
    """`row_fusion` compiles with the wide-row heuristic (accel/compile.py): inductor takes it as its
    choices class (its cache key asks for the class's uuid) and the compiled blocks equal eager's within
    float32 compile noise. Which reductions become persistent shows only on the GPU (tests/gpu)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    from ditserve.accel.compile import WIDE_ROW

    monkeypatch.setattr(inductor, "inductor_choices_class", None)  # restored after the test
    monkeypatch.setattr(inductor, "coordinate_descent_tuning", inductor.coordinate_descent_tuning)
    monkeypatch.setattr(inductor, "epilogue_fusion", inductor.epilogue_fusion)
    dit, inp = tiny_dit(), tiny_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = dit(inp)
        fast = accelerate_dit(dit, AccelConfig(compile=True, row_fusion=True), torch.device("cpu"))
        got = fast(inp)
    torch._dynamo.reset()
    assert inductor.inductor_choices_class().uuid() == f"ditserve-wide-rows-{WIDE_ROW}"
    accelerate_dit(tiny_dit(), AccelConfig(compile=True), torch.device("cpu"))  # compiles lazily: nothing runs
    assert inductor.inductor_choices_class is None  # a later compile without row fusion: the default heuristic
    assert float((got - expected).norm() / expected.norm()) < 1e-5
