"""Our CogVideoX DiT against diffusers' CogVideoXTransformer3DModel on tiny configs of every
checkpoint shape (2B sin-cos, 5B rotary, 5B-I2V learned + rotary, 1.5 temporal patches + ofs), and
the config reader's refusals."""

import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import (
    get_resize_crop_region_for_grid,
)

from ditserve.models.cogvideox.config import CogVideoXConfig
from ditserve.models.cogvideox.model import CogVideoXInputs
from ditserve.models.cogvideox.weights import load_cogvideox_dit

BASE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
            text_embed_dim=20, num_layers=2, sample_width=8, sample_height=6, sample_frames=9, patch_size=2,
            max_text_seq_length=7)
ROPE = dict(use_rotary_positional_embeddings=True)
CASES = {
    "2b": ({}, (2, 3, 4, 6, 8)),
    "2b,other-size": ({}, (2, 2, 4, 8, 4)),
    "5b": (ROPE, (2, 3, 4, 4, 8)),
    "5b,tall": (ROPE, (1, 2, 4, 10, 4)),
    "5b-i2v": (dict(ROPE, use_learned_positional_embeddings=True, in_channels=8), (2, 3, 8, 6, 8)),
    "1.5-i2v": (dict(ROPE, patch_size_t=2, ofs_embed_dim=24, in_channels=8), (2, 4, 8, 6, 8)),
    "1.5": (dict(ROPE, patch_size_t=2), (2, 4, 4, 6, 8)),
    "no-biases": (dict(ROPE, attention_bias=False, norm_elementwise_affine=False, patch_bias=False), (1, 3, 4, 6, 8)),
}


def reference(**kw) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**{**BASE, **kw}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(3.0 * (1 + 0.3 * torch.randn_like(p)) if "norm" in name and name.endswith("weight")
                    else 0.2 * torch.randn_like(p))
    return model


def diffusers_rope(cfg, shape):
    if not cfg.use_rotary_positional_embeddings:
        return None
    p = cfg.patch_size
    gh, gw = shape[3] // p, shape[4] // p
    if cfg.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
        return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), shape[1])
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (gh, gw), shape[1] // cfg.patch_size_t,
                                   grid_type="slice", max_size=(cfg.sample_height // p, cfg.sample_width // p))


@pytest.mark.parametrize("case", list(CASES))
def test_dit_matches_diffusers(tmp_path, case):
    kw, shape = CASES[case]
    ref = reference(**kw)
    ref.save_pretrained(tmp_path)
    ours = load_cogvideox_dit(tmp_path, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(*shape, generator=gen), torch.randn(shape[0], 7, 20, generator=gen)
    t = torch.tensor([999, 437])[: shape[0]]
    extra = {"ofs": x.new_full((1,), 2.0)} if ref.config.ofs_embed_dim else {}
    with torch.no_grad():
        want = ref(x, ctx, t, image_rotary_emb=diffusers_rope(ref.config, shape), return_dict=False, **extra)[0]
        got = ours(CogVideoXInputs(x, t.float(), ctx))
    assert got.shape == want.shape == (*shape[:2], 4, *shape[3:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert want.std() > 1  # sharp enough to fail on a wrong axis or position


@pytest.mark.parametrize("change, named", [
    (dict(activation_fn="gelu"), "activation_fn"), (dict(flip_sin_to_cos=False), "flip_sin_to_cos"),
    (dict(use_learned_positional_embeddings=True), "use_learned_positional_embeddings"),
    (dict(patch_size_t=2), "patch_size_t"), (dict(ROPE, attention_head_dim=20), "attention_head_dim"),
    (dict(ofs_embed_dim=12), "ofs_embed_dim"), (dict(some_new_key=1), "some_new_key"),
])
def test_config_refusals_are_one_line(tmp_path, change, named):
    with pytest.raises(ValueError, match=named) as err:
        CogVideoXConfig.from_dict({**BASE, **change})
    assert "\n" not in str(err.value)


def test_real_config_keys_are_read():
    """CogVideoX-5B's transformer config, as its folder ships it."""
    raw = json.loads('{"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.31.0", '
                     '"activation_fn": "gelu-approximate", "attention_bias": true, "attention_head_dim": 64, '
                     '"dropout": 0.0, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 16, '
                     '"max_text_seq_length": 226, "norm_elementwise_affine": true, "norm_eps": 1e-05, '
                     '"num_attention_heads": 48, "num_layers": 42, "out_channels": 16, "patch_size": 2, '
                     '"sample_frames": 49, "sample_height": 60, "sample_width": 90, '
                     '"spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4, '
                     '"temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, '
                     '"time_embed_dim": 512, "timestep_activation_fn": "silu", '
                     '"use_rotary_positional_embeddings": true}')
    cfg = CogVideoXConfig.from_dict(raw)
    assert cfg.hidden_size == 3072 and cfg.rope_axes == (16, 24, 24) and not cfg.sincos_positions
