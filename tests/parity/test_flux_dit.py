"""Our FluxDiT equals diffusers' FluxTransformer2DModel for the same weights and inputs."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from ditserve.models.flux.model import FluxInputs
from ditserve.models.flux.weights import load_flux_dit


def _tiny(guidance_embeds: bool) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("guidance_embeds", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_forward_matches_diffusers(tmp_path, guidance_embeds, sharded):
    ref = _tiny(guidance_embeds)
    ref.save_pretrained(tmp_path, max_shard_size="30KB" if sharded else "10GB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists() == sharded
    ours = load_flux_dit(tmp_path, "cpu", torch.float32)

    gen = torch.Generator().manual_seed(1)
    h, w, t = 3, 5, 7
    img = torch.randn(2, h * w, 16, generator=gen)
    txt = torch.randn(2, t, 24, generator=gen)
    pooled = torch.randn(2, 20, generator=gen)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] += torch.arange(h)[:, None]
    img_ids[..., 2] += torch.arange(w)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(t, 3)
    timesteps = torch.tensor([0.7, 0.3])
    guidance = torch.tensor([3.5, 3.5]) if guidance_embeds else None

    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled,
                       timestep=timesteps, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                       return_dict=False)[0]
        got = ours(FluxInputs(img=img, txt=txt, pooled=pooled, timesteps=timesteps,
                              img_ids=img_ids, txt_ids=txt_ids, guidance=guidance))
    assert expected.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mismatched_checkpoint_is_rejected(tmp_path):
    _tiny(True).save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"guidance_embeds": true', '"guidance_embeds": false')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="unused tensors"):
        load_flux_dit(tmp_path, "cpu", torch.float32)
