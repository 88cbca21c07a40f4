"""Our WanDiT equals diffusers' WanTransformer3DModel for the same weights and inputs (float32, CPU)."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from ditserve.models.wan.model import WanInputs
from ditserve.models.wan.weights import load_wan_dit


def _tiny(tmp_path, sharded=False, **kw):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=20, freq_dim=32, ffn_dim=48, num_layers=2,
                                cross_attn_norm=True, rope_max_seq_len=64, **kw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "10GB")
    return ref, load_wan_dit(tmp_path, "cpu", torch.float32)


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v-image-tokens"])
@pytest.mark.parametrize("per_token", [False, True], ids=["timestep", "per-token-timesteps"])
def test_forward_matches_diffusers(tmp_path, image, per_token):
    ref, ours = _tiny(tmp_path, sharded=image, **(dict(image_dim=24, added_kv_proj_dim=32) if image else {}))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 6, 10, generator=g)  # odd frame count, non-square
    ctx = torch.randn(2, 512, 20, generator=g)
    img = torch.randn(2, 5, 24, generator=g) if image else None
    t = torch.rand(2, 3 * 3 * 5, generator=g) * 1000 if per_token else torch.tensor([900.0, 250.0])
    with torch.no_grad():
        expected = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                       return_dict=False)[0]
        got = ours(WanInputs(x, t, ctx, img))
    assert expected.abs().mean() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_config_is_refused(tmp_path):
    _tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["qk_norm"] = "rms_norm"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="qk_norm"):
        load_wan_dit(tmp_path, "cpu", torch.float32)
