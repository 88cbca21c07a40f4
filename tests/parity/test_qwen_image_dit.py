"""Our QwenImageDiT equals diffusers' QwenImageTransformer2DModel for the same weights and inputs."""

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from ditserve.models.common.rope import rope_tables
from ditserve.models.qwen_image.model import QwenImageInputs, image_ids, text_ids
from ditserve.models.qwen_image.weights import load_qwen_image_dit

AXES = (4, 6, 6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                      axes_dims_rope=AXES)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("qwen_dit")
    ref.eval().save_pretrained(path, max_shard_size="40KB")  # sharded, to exercise the index
    return ref, path


# (image grids: target first, then edit conditions), per-sample valid text lengths
CASES = [
    ([(3, 5)], [7, 7]),
    ([(4, 4)], [7, 3]),
    ([(2, 6), (5, 3)], [7, 5]),
    ([(3, 3), (6, 4), (2, 2)], [1, 7]),
]


@pytest.mark.parametrize("grids,lengths", CASES, ids=[f"{len(g)}img-{'-'.join(map(str, n))}" for g, n in CASES])
def test_forward_matches_diffusers(saved, grids, lengths):
    ref, path = saved
    ours = load_qwen_image_dit(path, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(len(grids) * 10 + lengths[1])
    n_img, n_txt = sum(h * w for h, w in grids), max(lengths)
    img = torch.randn(2, n_img, 16, generator=gen)
    txt = torch.randn(2, n_txt, 24, generator=gen)
    mask = torch.arange(n_txt)[None] < torch.tensor(lengths)[:, None]
    timesteps = torch.tensor([0.9, 0.25])
    padded = not bool(mask.all())
    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=txt, timestep=timesteps,
                       encoder_hidden_states_mask=mask.long() if padded else None,
                       img_shapes=[[(1, h, w) for h, w in grids]] * 2, return_dict=False)[0]
        got = ours(QwenImageInputs(img=img, txt=txt, timesteps=timesteps, img_ids=image_ids(grids),
                                   txt_ids=text_ids(grids, n_txt), txt_mask=mask if padded else None))
    assert expected.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grids", [[(3, 5)], [(4, 7), (6, 2)], [(1, 1), (9, 8)]])
def test_msrope_tables_match_diffusers(grids):
    """cos/sin of our positions equal diffusers' complex QwenEmbedRope frequencies."""
    rope = QwenEmbedRope(theta=10000, axes_dim=list(AXES), scale_rope=True)
    vid, txt = rope([[(1, h, w) for h, w in grids]], device=torch.device("cpu"), max_txt_seq_len=6)
    expected = torch.cat([txt, vid])  # [S, head_dim / 2] complex, text first as in the joint sequence
    rope = rope_tables(torch.cat([text_ids(grids, 6), image_ids(grids)]), AXES, 10000.0)
    cos, sin = rope.cos, rope.sin
    torch.testing.assert_close(cos[:, ::2], expected.real, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[:, ::2], expected.imag, rtol=0, atol=1e-5)


def test_padding_mask_keeps_valid_tokens_exact(saved):
    """A sample padded with junk text under the mask gives the image it gives unpadded."""
    _, path = saved
    ours = load_qwen_image_dit(path, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(3)
    grids = [(4, 3)]
    img, txt = torch.randn(1, 12, 16, generator=gen), torch.randn(1, 5, 24, generator=gen)
    junk = torch.randn(1, 4, 24, generator=gen) * 10
    mask = torch.tensor([[True] * 5 + [False] * 4])
    t = torch.tensor([0.5])
    with torch.no_grad():
        alone = ours(QwenImageInputs(img, txt, t, image_ids(grids), text_ids(grids, 5)))
        padded = ours(QwenImageInputs(img, torch.cat([txt, junk], 1), t, image_ids(grids),
                                      text_ids(grids, 9), mask))
        unmasked = ours(QwenImageInputs(img, torch.cat([txt, junk], 1), t, image_ids(grids),
                                        text_ids(grids, 9)))
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert (unmasked - alone).abs().max() > 1e-2  # the junk matters unless masked


def test_mask_reaches_attention_op(saved):
    """Ops get the mask keyword only when there is padding (ops without mask support still run)."""
    _, path = saved
    ours = load_qwen_image_dit(path, "cpu", torch.float32)
    seen = []

    def op(q, k, v, **kw):
        seen.append(kw.get("mask") is not None)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=kw["mask"][:, None, None] if "mask" in kw else None).transpose(1, 2)

    for block in ours.blocks:
        block.attn_op = op
    grids, t = [(2, 2)], torch.tensor([0.5])
    with torch.no_grad():
        ours(QwenImageInputs(torch.randn(1, 4, 16), torch.randn(1, 3, 24), t, image_ids(grids), text_ids(grids, 3)))
        ours(QwenImageInputs(torch.randn(1, 4, 16), torch.randn(1, 3, 24), t, image_ids(grids), text_ids(grids, 3),
                             torch.tensor([[True, True, False]])))
    assert seen == [False, False, True, True]


VARIANTS = {  # config flags -> batch size (diffusers adds the extra embedding to [t, 0] only at batch 1)
    "zero_cond_t": ({"zero_cond_t": True}, 2),
    "layered": ({"use_additional_t_cond": True, "use_layer3d_rope": True}, 2),
    "all": ({"zero_cond_t": True, "use_additional_t_cond": True, "use_layer3d_rope": True}, 1),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    flags, batch = VARIANTS[request.param]
    torch.manual_seed(1)
    ref = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                      axes_dims_rope=AXES, **flags)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("qwen_dit_variant")
    ref.eval().save_pretrained(path)
    return ref, load_qwen_image_dit(path, "cpu", torch.float32), batch


@pytest.mark.parametrize("grids", [[(3, 5), (4, 2)], [(2, 3), (2, 3), (5, 4), (3, 3)]], ids=["2grids", "4grids"])
def test_variants_match_diffusers(variant, grids):
    """zero_cond_t (per-token modulation), the additional timestep embedding and layered 3D RoPE."""
    ref, ours, batch = variant
    gen = torch.Generator().manual_seed(len(grids))
    n_img, n_txt = sum(h * w for h, w in grids), 6
    img, txt = torch.randn(batch, n_img, 16, generator=gen), torch.randn(batch, n_txt, 24, generator=gen)
    mask = torch.ones(batch, n_txt, dtype=torch.bool)
    mask[-1, 4:] = False
    timesteps = torch.tensor([0.9, 0.25][:batch])
    extra = {"additional_t_cond": torch.zeros(batch, dtype=torch.long)} if ref.config.use_additional_t_cond else {}
    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=txt, timestep=timesteps,
                       encoder_hidden_states_mask=mask.long(), img_shapes=[[(1, h, w) for h, w in grids]] * batch,
                       return_dict=False, **extra)[0]
        img_ids, txt_ids = ours.positions(grids, n_txt)
        got = ours(QwenImageInputs(img=img, txt=txt, timesteps=timesteps, img_ids=img_ids, txt_ids=txt_ids,
                                   txt_mask=mask, target_len=grids[0][0] * grids[0][1]))
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_zero_cond_t_modulates_input_images_at_timestep_0(variant):
    """The input-image tokens' modulation is what makes zero_cond_t differ: giving every token t
    (target_len = all tokens) changes the output, and the generated image's own tokens see it."""
    ref, ours, batch = variant
    if not ref.config.zero_cond_t:
        pytest.skip("zero_cond_t only")
    grids = [(3, 3), (3, 3)]
    gen = torch.Generator().manual_seed(5)
    img, txt = torch.randn(batch, 18, 16, generator=gen), torch.randn(batch, 4, 24, generator=gen)
    img_ids, txt_ids = ours.positions(grids, 4)
    t = torch.full((batch,), 0.7)
    with torch.no_grad():
        zero = ours(QwenImageInputs(img, txt, t, img_ids, txt_ids, target_len=9))
        all_t = ours(QwenImageInputs(img, txt, t, img_ids, txt_ids, target_len=18))
    assert (zero[:, :9] - all_t[:, :9]).abs().max() > 1e-2


@pytest.mark.parametrize("key,value", [("guidance_embeds", True), ("patch_size", 1)])
def test_unsupported_keys_are_refused_naming_the_key(saved, tmp_path, key, value):
    import json
    import shutil

    _, path = saved
    shutil.copytree(path, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{key}={value!r} is not supported"):
        load_qwen_image_dit(tmp_path / "t", "cpu", torch.float32)


def test_config_keys_cover_the_installed_diffusers_signature():
    import inspect

    from ditserve.models.qwen_image.config import KEYS

    params = set(inspect.signature(QwenImageTransformer2DModel.__init__).parameters) - {"self"}
    assert set(KEYS) == params


def test_variants_run_under_segments_and_fp8(variant):
    """The acceleration plan still applies with per-token modulation: embed / block groups / head as
    segments give the plain forward; FP8 block linears (modulation kept) stay close to it."""
    from ditserve.accel.fp8 import FP8Linear, apply_fp8
    from ditserve.accel.segments import SegmentedDiT

    _, ours, batch = variant
    grids = [(2, 4), (3, 2)]
    gen = torch.Generator().manual_seed(9)
    img_ids, txt_ids = ours.positions(grids, 5)
    inp = QwenImageInputs(torch.randn(batch, 14, 16, generator=gen), torch.randn(batch, 5, 24, generator=gen),
                          torch.full((batch,), 0.6), img_ids, txt_ids, target_len=8)
    with torch.no_grad():
        expected = ours(inp)
        assert torch.equal(SegmentedDiT(ours, graphs=True, group_size=1)(inp), expected)
        import copy
        fp8 = apply_fp8(copy.deepcopy(ours), min_features=16)
        assert any(isinstance(m, FP8Linear) for m in fp8.modules())
        assert not any(isinstance(m, FP8Linear) for n, m in fp8.named_modules() if n.endswith("mod.lin"))
        got = fp8(inp)
    assert float((got - expected).norm() / expected.norm()) < 0.2


def test_sequence_parallel_shards_the_modulation_index_with_the_image_tokens():
    """The plan marks the index "per_token": each rank gets its image tokens' entries (padded)."""
    from ditserve.models.qwen_image.plan import QWEN_IMAGE_PLAN
    from ditserve.parallel.sequence import Split, shard_const

    assert QWEN_IMAGE_PLAN.sequence.consts[3] == "per_token"
    index = (torch.arange(15) >= 9).long().expand(2, -1)
    parts = [shard_const("per_token", index, [], [Split(15, 2)], rank) for rank in range(2)]
    assert [p.shape for p in parts] == [(2, 8), (2, 8)]
    assert torch.equal(torch.cat(parts, dim=1)[:, :15], index)
