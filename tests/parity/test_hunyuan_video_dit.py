"""Our HunyuanVideoDiT equals diffusers' HunyuanVideoTransformer3DModel for the same weights and inputs
(padded text with a mask, embedded guidance or none, temporal patches)."""

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from ditserve.models.hunyuan_video.model import HunyuanVideoInputs, pack, unpack
from ditserve.models.hunyuan_video.weights import load_hunyuan_video_dit

TEXT_DIM, POOLED_DIM = 24, 20


def _tiny(guidance_embeds: bool, patch_size_t: int) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_refiner_layers=2, patch_size=2, patch_size_t=patch_size_t,
        guidance_embeds=guidance_embeds, text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=(4, 6, 6),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("guidance_embeds, patch_size_t", [(True, 1), (False, 2)])
def test_forward_matches_diffusers(tmp_path, guidance_embeds, patch_size_t):
    ref = _tiny(guidance_embeds, patch_size_t)
    ref.save_pretrained(tmp_path)
    ours = load_hunyuan_video_dit(tmp_path, "cpu", torch.float32)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2 * patch_size_t + 1 - (patch_size_t == 2), 6, 8, generator=gen)
    x = x[:, :, : x.shape[2] // patch_size_t * patch_size_t]
    txt = torch.randn(2, 7, TEXT_DIM, generator=gen)
    mask = torch.zeros(2, 7)
    mask[0, :5], mask[1, :2] = 1, 1  # right padding, different lengths
    pooled = torch.randn(2, POOLED_DIM, generator=gen)
    timesteps = torch.tensor([700.0, 300.0])
    guidance = torch.tensor([6000.0, 3500.0]) if guidance_embeds else None

    with torch.no_grad():
        expected = ref(hidden_states=x, timestep=timesteps, encoder_hidden_states=txt, encoder_attention_mask=mask,
                       pooled_projections=pooled, guidance=guidance, return_dict=False)[0]
        grid = ours.grid(x.shape)
        got = ours(HunyuanVideoInputs(img=pack(x, ours.cfg.patch), grid=grid, timesteps=timesteps, txt=txt,
                                      pooled=pooled, txt_mask=mask, guidance=guidance))
        got = unpack(got, grid, ours.cfg.patch)
        unmasked = ours(HunyuanVideoInputs(img=pack(x, ours.cfg.patch), grid=grid, timesteps=timesteps, txt=txt,
                                           pooled=pooled, guidance=guidance))
    assert expected.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (unpack(unmasked, grid, ours.cfg.patch) - expected).abs().max() > 0.1  # the text mask matters


def test_pack_round_trips():
    x = torch.randn(1, 3, 4, 6, 8)
    assert torch.equal(unpack(pack(x, (2, 2, 2)), (2, 3, 4), (2, 2, 2)), x)


def test_unsupported_config_is_refused(tmp_path):
    _tiny(True, 1).save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"image_condition_type": null',
                                                         '"image_condition_type": "token_replace"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="image_condition_type"):
        load_hunyuan_video_dit(tmp_path, "cpu", torch.float32)
