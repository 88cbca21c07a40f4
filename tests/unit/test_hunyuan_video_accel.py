"""HunyuanVideoDiT under the speed transforms' plan on the CPU: FP8 takes only the blocks' large projections
(not the refiner, the patch embedding or the modulation), and the segmented forward (embed, block groups,
head: what CUDA graphs capture) equals the plain one."""

import torch
from torch import nn

from ditserve.accel.fp8 import FP8Linear, apply_fp8
from ditserve.accel.segments import SegmentedDiT
from ditserve.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoDiT, HunyuanVideoInputs


def tiny_dit() -> HunyuanVideoDiT:
    torch.manual_seed(0)
    cfg = HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=16, attention_head_dim=16,
                             num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=24,
                             pooled_projection_dim=20, rope_axes_dim=(4, 6, 6))
    dit = HunyuanVideoDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit


def test_fp8_swaps_only_block_projections():
    dit = apply_fp8(tiny_dit(), min_features=256)
    swapped = [n for n, m in dit.named_modules() if isinstance(m, FP8Linear)]
    assert swapped and all(n.startswith(("double_blocks", "single_blocks")) for n in swapped)
    assert not any(n.endswith(("mod.lin", "modulation.lin")) for n in swapped)
    assert all(isinstance(m, nn.Linear) and not isinstance(m, FP8Linear) for m in dit.txt_in.modules()
               if isinstance(m, nn.Linear))


def test_segmented_forward_equals_the_plain_one():
    dit = tiny_dit()
    g = torch.Generator().manual_seed(1)
    grid = (2, 2, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    inp = HunyuanVideoInputs(img=torch.randn(2, 12, 16, generator=g), grid=grid, timesteps=torch.tensor([700., 300.]),
                             txt=torch.randn(2, 5, 24, generator=g), pooled=torch.randn(2, 20, generator=g),
                             txt_mask=mask, guidance=torch.tensor([6000., 6000.]),
                             rope=dit.positional_tables(grid, 5, "cpu"))
    with torch.no_grad():
        expected = dit(inp)
        for group_size in (None, 1):
            assert torch.equal(SegmentedDiT(dit, graphs=True, group_size=group_size)(inp), expected)
