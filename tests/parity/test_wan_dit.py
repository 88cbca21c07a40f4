"""Our WanDiT equals diffusers' WanTransformer3DModel for the same weights and inputs (float32, CPU)
for every Wan checkpoint shape; the loader reads sharded folders, keeps in float32 what diffusers
keeps, maps every tensor of the real checkpoint shapes, and refuses what it cannot honour."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from ditserve.models.common.dit import run_block
from ditserve.models.wan import WanConfig, WanDiT, WanInputs
from ditserve.models.wan.weights import load_wan_dit, wan_key_map

BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=20, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64)
I2V = dict(in_channels=12, image_dim=24, added_kv_proj_dim=32)

# variant: (config changes, latents [B, C, F, H, W], image tokens or None, per-token timesteps)
VARIANTS = {
    "t2v-odd-frames-non-square": ({}, (2, 4, 3, 6, 10), None, False),
    "i2v-image-tokens": (I2V, (2, 12, 5, 8, 6), (2, 257, 24), False),
    "flf2v-first-last-tokens": (dict(I2V, pos_embed_seq_len=14), (2, 12, 2, 4, 4), (4, 7, 24), False),
    "ti2v-per-token-timesteps": (dict(in_channels=8, out_channels=8), (2, 8, 3, 4, 6), None, True),
    "temporal-patch-2": (dict(patch_size=(2, 2, 2)), (1, 4, 4, 4, 6), None, False),
    "no-cross-norm-out-none-eps": (dict(cross_attn_norm=False, out_channels=None, eps=1e-5), (1, 4, 1, 4, 4), None,
                                   False),
}


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with sharp attention (norm gains about 3), so the comparison means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(3.0 * (1 + 0.3 * noise) if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model


def saved_reference(path, sharded: bool = False, **changes) -> WanTransformer3DModel:
    ref = sharpen(WanTransformer3DModel(**(BASE | changes)).eval())
    ref.save_pretrained(path, max_shard_size="20KB" if sharded else "10GB")
    return ref


def random_inputs(latents_shape, image_shape, per_token: bool, text_dim: int = 20, seed: int = 1,
                  patch=(1, 2, 2)) -> WanInputs:
    g = torch.Generator().manual_seed(seed)
    b, _, f, h, w = latents_shape
    x = torch.randn(*latents_shape, generator=g)
    ctx = torch.randn(b, 512, text_dim, generator=g)
    ctx[:, 9:] = 0  # padded text positions are zeros, as the UMT5 encoder hands them over
    img = torch.randn(*image_shape, generator=g) if image_shape else None
    if per_token:  # TI2V: timestep 0 on the first latent frame's tokens, t elsewhere
        grid = (f // patch[0], h // patch[1], w // patch[2])
        mask = torch.ones(grid)
        mask[0] = 0
        t = mask.flatten()[None] * torch.tensor([[937.0], [250.0]])[:b]
    else:
        t = torch.tensor([999, 250])[:b]  # int64, as the UniPC schedule hands them over
    return WanInputs(x, t, ctx, img)


def reference_call(ref, inp: WanInputs) -> torch.Tensor:
    return ref(hidden_states=inp.latents, timestep=inp.timesteps, encoder_hidden_states=inp.context,
               encoder_hidden_states_image=inp.image, return_dict=False)[0]


def assert_matches(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    assert expected.std() > 0.3, "degenerate comparison"
    assert got.shape == expected.shape
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= rel, f"max error {err:.2e} of the output's range"


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_forward_matches_diffusers(tmp_path, variant):
    changes, shape, image, per_token = VARIANTS[variant]
    ref = saved_reference(tmp_path, sharded=image is not None, **changes)
    if image is not None:
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_wan_dit(tmp_path, "cpu", torch.float32)
    inp = random_inputs(shape, image, per_token, patch=ours.cfg.patch_size)
    assert_matches(ours(inp), reference_call(ref, inp))


@torch.no_grad()
def test_embed_blocks_head_and_precomputed_rope(tmp_path):
    ref = saved_reference(tmp_path, **I2V)
    ours = load_wan_dit(tmp_path, "cpu", torch.float32)
    inp = random_inputs((2, 12, 3, 6, 4), (2, 257, 24), False)
    h = ours.embed(inp)
    assert len(h.streams) == 1 and h.streams[0].shape == (2, 3 * 3 * 2, 32)
    context, mod, rope = h.consts[:3]
    assert context.shape == (2, 257 + 512, 32) and mod.shape == (2, 6, 32) and mod.dtype == torch.float32
    assert rope.cos.shape == (18, 16)
    for block in ours.blocks:
        h = run_block(block, h)
    expected = reference_call(ref, inp)
    assert_matches(ours.head(h), expected)
    inp.rope = ours.positional_tables(ours.grid(inp.latents.shape))
    assert_matches(ours(inp), expected)


def test_rotary_table_matches_diffusers():
    ref = WanTransformer3DModel(**BASE)
    ours = WanDiT(WanConfig.from_dict(BASE))
    assert ours.cfg.rope_axes == (8, 4, 4)
    x = torch.zeros(1, 4, 5, 8, 14)  # grid (5, 4, 7): the row and column tables must not swap
    cos, sin = ref.rope(x)
    table = ours.positional_tables(ours.grid(x.shape))
    assert torch.equal(table.cos, cos[0, :, 0]) and torch.equal(table.sin, sin[0, :, 0])


@torch.no_grad()
def test_every_attention_goes_through_the_plan_sites(tmp_path):
    saved_reference(tmp_path, **I2V)
    ours = load_wan_dit(tmp_path, "cpu", torch.float32)
    calls = []

    def counting_op(q, k, v):
        calls.append(k.shape[1])
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    for block in ours.blocks:
        for site in ours.plan.attention_sites:
            owner, attr = site.rsplit(".", 1)
            setattr(block.get_submodule(owner), attr, counting_op)
    ours(random_inputs((1, 12, 1, 4, 4), (1, 257, 24), False))
    assert calls == [4, 512, 257] * 2  # per block: self (4 tokens), text, image
    # the plan's FP8 patterns cover exactly the big projections of every block
    from fnmatch import fnmatch
    linears = {n for n, m in ours.blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n in linears if any(fnmatch(n, p) for p in ours.plan.fp8)} == linears
    assert ours.plan.qk_rope_site is None and getattr(ours, ours.plan.head) is ours.head_out


@pytest.mark.parametrize("variant", ["t2v", "i2v", "a14b", "i2v_a14b", "ti2v"])
@torch.no_grad()
def test_tiny_folders_match_diffusers(tiny_wan, variant):
    """Every transformer of the tiny pipeline folders, through our loader, on random inputs."""
    folder = tiny_wan(variant)
    experts = ["transformer", "transformer_2"] if variant in ("a14b", "i2v_a14b") else ["transformer"]
    outputs = []
    for name in experts:
        ref = WanTransformer3DModel.from_pretrained(folder / name).eval()
        ours = load_wan_dit(folder / name, "cpu", torch.float32)
        cfg = ours.cfg
        image = (2, 17, cfg.image_dim) if cfg.image_dim else None
        inp = random_inputs((2, cfg.in_channels, 3, 4, 6), image, variant == "ti2v", text_dim=cfg.text_dim)
        outputs.append(ours(inp))
        assert_matches(outputs[-1], reference_call(ref, inp))
    if len(outputs) == 2:  # the experts differ: picking the wrong one shows
        assert (outputs[0] - outputs[1]).abs().mean() > 0.1


@torch.no_grad()
def test_bfloat16_keeps_what_diffusers_keeps_in_float32(tiny_wan):
    folder = tiny_wan("i2v") / "transformer"
    ref = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ours = load_wan_dit(folder, "cpu", torch.bfloat16)
    theirs = dict(ref.named_parameters())
    kept = []
    for name, p in ours.named_parameters():
        (source,) = wan_key_map(ours.cfg)[name]
        assert p.dtype == theirs[source].dtype and torch.equal(p, theirs[source]), name
        kept += [name] if p.dtype == torch.float32 else []
    assert {"time_in.in_layer.weight", "layers.0.scale_shift_table", "head_out.scale_shift_table",
            "layers.1.norm2.weight", "image_in.norm1.weight", "image_in.norm2.bias"} <= set(kept)
    inp = random_inputs((2, 12, 3, 4, 6), (2, 17, 40), False, text_dim=24)
    inp.latents, inp.context, inp.image = (t.bfloat16() for t in (inp.latents, inp.context, inp.image))
    got, expected = ours(inp).float(), reference_call(ref, inp).float()
    assert got.dtype == expected.dtype
    # bit-equal on this CPU; bf16 itself is about 2e-2 from float32 here
    assert (got - expected).norm() / expected.norm() < 2e-3


# The real checkpoints' transformer configs (diffusers format): every key honoured, every tensor mapped.
REAL = dict(patch_size=[1, 2, 2], attention_head_dim=128, cross_attn_norm=True, eps=1e-6, freq_dim=256,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096, image_dim=None,
            added_kv_proj_dim=None, pos_embed_seq_len=None, _class_name="WanTransformer3DModel",
            _diffusers_version="0.35.0.dev0")
REAL_CONFIGS = {
    "Wan2.1-T2V-1.3B": dict(num_attention_heads=12, num_layers=30, ffn_dim=8960, in_channels=16, out_channels=16),
    "Wan2.1-T2V-14B / Wan2.2-T2V-A14B": dict(num_attention_heads=40, num_layers=40, ffn_dim=13824, in_channels=16,
                                             out_channels=16),
    "Wan2.1-I2V-14B-480P/720P": dict(num_attention_heads=40, num_layers=40, ffn_dim=13824, in_channels=36,
                                     out_channels=16, image_dim=1280, added_kv_proj_dim=5120),
    "Wan2.1-FLF2V-14B-720P": dict(num_attention_heads=40, num_layers=40, ffn_dim=13824, in_channels=36,
                                  out_channels=16, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514),
    "Wan2.2-I2V-A14B": dict(num_attention_heads=40, num_layers=40, ffn_dim=13824, in_channels=36, out_channels=16),
    "Wan2.2-TI2V-5B": dict(num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_checkpoint_shapes_map_every_tensor(name):
    raw = REAL | REAL_CONFIGS[name]
    cfg = WanConfig.from_dict(raw)
    with torch.device("meta"):
        ref = WanTransformer3DModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
        ours = WanDiT(cfg)
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    key_map = wan_key_map(cfg)
    assert sorted(s for srcs in key_map.values() for s in srcs) == sorted(theirs)
    for ours_name, p in ours.named_parameters():
        assert p.shape == theirs[key_map[ours_name][0]], ours_name


def test_architectures_json_configs_load():
    from ditserve.bench.common import arch_kwargs, architectures

    wan = [k for k in architectures() if k.startswith("wan")]
    assert wan
    for key in wan:
        WanConfig.from_dict(arch_kwargs(architectures()[key]["transformer"]))


@pytest.mark.parametrize("change, needle", [
    (dict(window_size=[-1, -1]), "window_size"),
    (dict(qk_norm="rms_norm"), "qk_norm"),
    (dict(qk_norm=None), "qk_norm"),
    (dict(image_dim=24), "added_kv_proj_dim"),
    (dict(image_dim=24, added_kv_proj_dim=24), "added_kv_proj_dim"),
    (dict(patch_size=[2, 2]), "patch_size"),
])
def test_config_refusals_are_one_line_naming_the_key(tmp_path, change, needle):
    saved_reference(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        load_wan_dit(tmp_path, "cpu", torch.float32)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_grid_past_rope_max_seq_len_is_refused():
    ours = WanDiT(WanConfig.from_dict(BASE | dict(rope_max_seq_len=8)))
    ours.positional_tables((8, 8, 8))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        ours.positional_tables((2, 9, 4))


def _add_tensor(folder, key: str) -> None:
    """Add a tensor in a shard of its own, as a checkpoint that carries it would."""
    shard = f"extra-{key}.safetensors"
    save_file({key: torch.ones(32)}, str(folder / shard))
    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][key] = shard
    index_file.write_text(json.dumps(index))


@torch.no_grad()
def test_unused_image_query_norm_is_ignored_other_extras_refused(tmp_path):
    ref = saved_reference(tmp_path, sharded=True, **I2V)
    _add_tensor(tmp_path, "blocks.0.attn2.norm_added_q.weight")  # as some Wan 2.1 I2V checkpoints carry
    inp = random_inputs((1, 12, 1, 4, 4), (1, 257, 24), False)
    assert_matches(load_wan_dit(tmp_path, "cpu", torch.float32)(inp), reference_call(ref, inp))
    _add_tensor(tmp_path, "blocks.0.attn2.norm_other.weight")
    with pytest.raises(ValueError, match="norm_other"):
        load_wan_dit(tmp_path, "cpu", torch.float32)
