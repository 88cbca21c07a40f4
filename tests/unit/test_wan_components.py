"""Wan components against the diffusers pipelines on the tiny folders (float32, CPU): UMT5 prompt
states, CLIP image states, VAE encode (I2V condition, TI2V first frame) and decode to uint8 frames,
whole and tiled; and the tiny fixtures are able to fail."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.encoders.clip_vision import ClipImageEncoder
from ditserve.encoders.umt5 import UMT5Encoder, clean_prompt
from ditserve.vae.wan import (
    Tiles,
    VideoLatentShape,
    decode_wan,
    encode_wan,
    load_wan_vae,
)

PROMPT, NEGATIVE = "a red cat walks on the grass", "blurry, static"
SMALL_TILES = Tiles(height=32, width=32, stride_height=16, stride_width=16)


def picture(seed: int = 0, w: int = 56, h: int = 40) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


_PIPES = {}


def pipe(folder, i2v: bool = False):
    """The diffusers pipeline for a tiny folder (image-to-video class when `i2v`), loaded once."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    cls = diffusers.WanImageToVideoPipeline if i2v else diffusers.WanPipeline
    if (folder, cls) not in _PIPES:
        _PIPES[folder, cls] = cls.from_pretrained(folder)
    return _PIPES[folder, cls]


# --- UMT5 -------------------------------------------------------------------------------------

def test_clean_prompt_as_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in ["  a &amp;amp; b\n\n c\t", "caf\u00c3\u00a9 &lt;b&gt;", "plain"]:
        assert clean_prompt(text) == prompt_clean(text)
    assert clean_prompt("  a &amp;amp; b\n\n c\t") == "a & b c"


@pytest.mark.parametrize("max_length", [512, 8])
@torch.no_grad()  # as in the pipeline's __call__ (with autograd on, SDPA may pick another kernel)
def test_umt5_states_equal_encode_prompt(tiny_wan, max_length):
    folder = tiny_wan("t2v")
    prompts = [PROMPT + " &amp;amp;  on\n a hill", "cat"]
    negatives = [NEGATIVE, ""]
    expected, expected_neg = pipe(folder).encode_prompt(
        prompt=prompts, negative_prompt=negatives, do_classifier_free_guidance=True, max_sequence_length=max_length,
        device="cpu")
    encoder = UMT5Encoder.from_pipeline_folder(folder, "cpu", torch.float32)
    got = encoder(prompts, max_length)
    assert got.shape == (2, max_length, 24)
    assert torch.equal(got, expected) and torch.equal(encoder(negatives, max_length), expected_neg)


@torch.no_grad()
def test_umt5_zeroes_padding_the_model_does_not(tiny_wan):
    encoder = UMT5Encoder.from_pipeline_folder(tiny_wan("t2v"), "cpu", torch.float32)
    tok = encoder.tokenizer(["cat"], padding="max_length", max_length=512, return_tensors="pt")
    n = int(tok.attention_mask.sum())
    raw = encoder.model(tok.input_ids, tok.attention_mask).last_hidden_state
    got = encoder(["cat"])
    assert raw[0, n:].abs().amax() > 0.1  # the encoder's own states past the prompt are not zero
    assert got[0, n:].abs().amax() == 0 and torch.equal(got[0, :n], raw[0, :n])


# --- CLIP vision ------------------------------------------------------------------------------

@torch.no_grad()
def test_clip_image_states_equal_encode_image(tiny_wan):
    folder = tiny_wan("i2v")
    reference = pipe(folder, i2v=True)
    encoder = ClipImageEncoder.from_pipeline_folder(folder, "cpu", torch.float32)
    one = encoder([picture()])
    assert one.shape == (1, 17, 40)  # 4x4 patches + class token, hidden states of the penultimate layer
    assert torch.equal(one, reference.encode_image(picture(), "cpu"))
    two = encoder([picture(1), picture(2, 33, 61)])  # FLF2V passes first and last frame together
    assert torch.equal(two, reference.encode_image([picture(1), picture(2, 33, 61)], "cpu"))
    assert ClipImageEncoder.from_pipeline_folder(tiny_wan("i2v_a14b"), "cpu", torch.float32) is None


# --- VAE --------------------------------------------------------------------------------------

def test_compression_factors(tiny_wan):
    for variant, expected in (("t2v", (4, 4, 8)), ("ti2v", (8, 4, 16))):
        vae_folder = tiny_wan(variant) / "vae"
        shape = VideoLatentShape.read(vae_folder)
        assert (shape.channels, shape.temporal, shape.spatial) == expected
        assert VideoLatentShape.of(load_wan_vae(vae_folder, "cpu", torch.float32)) == shape
    assert VideoLatentShape(16, 4, 8).latents(81, 480, 832) == (16, 21, 60, 104)  # Wan 2.1 at 480p
    assert VideoLatentShape(48, 4, 16).latents(121, 704, 1280) == (48, 31, 44, 80)  # TI2V-5B at 720p
    assert VideoLatentShape(16, 4, 8).num_frames(21) == 81


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
@pytest.mark.parametrize("variant", ["i2v", "ti2v"])
def test_encode_equals_pipeline_condition(tiny_wan, variant, tiled):
    """2.1 I2V: the image as frame 0 of a zero clip (the pipeline's condition after its 4 mask
    channels); TI2V: the image alone (the latents that replace frame 0)."""
    folder = tiny_wan(variant)
    reference = pipe(folder, i2v=True)
    height, width, frames = 64, 64, 5
    image = reference.video_processor.preprocess(picture(), height=height, width=width).float()
    if tiled:
        reference.vae.enable_tiling(32, 32, 16, 16)
    try:
        out = reference.prepare_latents(image, 1, reference.vae.config.z_dim, height, width, frames, torch.float32,
                                        "cpu", torch.Generator().manual_seed(0))
    finally:
        reference.vae.disable_tiling()
    vae = load_wan_vae(folder / "vae", "cpu", torch.float32)
    video = image[:, :, None]
    if variant == "i2v":
        video = torch.cat([video, video.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        mask, expected = out[1][:, :4], out[1][:, 4:]
        assert mask.shape == (1, 4, 2, 8, 8) and mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    else:
        expected = out[1]
    got = encode_wan(vae, video, tiled=tiled, tiles=SMALL_TILES)
    assert torch.equal(got, expected)
    if tiled:
        assert not torch.equal(got, encode_wan(vae, video)) and not vae.use_tiling


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
@pytest.mark.parametrize("variant", ["t2v", "ti2v"])
def test_decode_equals_pipeline_frames(tiny_wan, variant, tiled):
    folder = tiny_wan(variant)
    reference = pipe(folder)
    settings = dict(prompt=PROMPT, height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=1.0)

    def run(output_type):
        return reference(**settings, generator=torch.Generator().manual_seed(0), output_type=output_type).frames

    latents = run("latent")
    if tiled:
        reference.vae.enable_tiling(32, 32, 16, 16)
    try:
        expected = (run("np") * 255).round().astype("uint8")
    finally:
        reference.vae.disable_tiling()
    vae = load_wan_vae(folder / "vae", "cpu", torch.float32)
    got = decode_wan(vae, latents, tiled=tiled, tiles=SMALL_TILES)
    assert got.dtype == np.uint8 and got.shape == (1, 5, 64, 64, 3)
    assert np.array_equal(got, expected)
    assert expected.std() > 10
    if tiled:
        assert not np.array_equal(got, decode_wan(vae, latents))  # tiling really happened
        assert not vae.use_tiling and vae.tile_sample_min_height == 256  # the VAE's own settings are back


# --- the fixtures can fail ----------------------------------------------------------------------

def _swap_rope_rows_and_columns(transformer) -> None:
    """Give rows the column positions and columns the row positions."""
    rope = transformer.rope
    original = rope.forward

    def swapped(hidden_states):
        _, _, f, h, w = hidden_states.shape
        cos, sin = original(hidden_states.transpose(3, 4))
        fix = lambda t: t.view(1, f, w // 2, h // 2, 1, -1).transpose(2, 3).reshape(1, f * (h // 2) * (w // 2), 1, -1)
        return fix(cos), fix(sin)

    rope.forward = swapped


def _shift_timesteps(transformer, shift: float = 1.0) -> None:
    original = transformer.forward
    transformer.forward = lambda *a, timestep, **kw: original(*a, timestep=timestep.float() - shift, **kw)


def _ti2v_without_first_frame_zero(transformer) -> None:
    original = transformer.forward
    transformer.forward = lambda *a, timestep, **kw: original(
        *a, timestep=timestep.amax(dim=1, keepdim=True).expand_as(timestep), **kw)


def _swap_experts(p) -> None:
    p.transformer, p.transformer_2 = p.transformer_2, p.transformer


def _other_clip_image(p) -> None:
    original = p.encode_image
    p.encode_image = lambda image, device=None: original(picture(7), device)


MISTAKES = {
    # name: (variant, image-to-video?, request change, pipeline change)
    "prompt": ("t2v", False, dict(prompt="a blue dog sits"), None),
    "negative-prompt-dropped": ("t2v", False, dict(negative_prompt=None), None),
    "timestep-off-by-one": ("t2v", False, {}, lambda p: _shift_timesteps(p.transformer)),
    "rope-rows-columns-swapped": ("t2v", False, {}, lambda p: _swap_rope_rows_and_columns(p.transformer)),
    "experts-swapped": ("a14b", False, {}, _swap_experts),
    "guidance-scale-2-ignored": ("a14b", False, dict(guidance_scale_2=4.0), None),
    "clip-image": ("i2v", True, {}, _other_clip_image),
    "ti2v-first-frame-timestep": ("ti2v", True, {}, lambda p: _ti2v_without_first_frame_zero(p.transformer)),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_fixtures_can_fail(tiny_wan, mistake):
    """Each mistake a parity test must catch moves diffusers' own pixels far more than 1/255."""
    import diffusers

    variant, i2v, change, sabotage = MISTAKES[mistake]
    folder = tiny_wan(variant)
    cls = diffusers.WanImageToVideoPipeline if i2v else diffusers.WanPipeline
    settings = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64 if variant == "ti2v" else 32, width=64 if
                    variant == "ti2v" else 48, num_frames=5, num_inference_steps=4, guidance_scale=4.0)
    settings |= dict(guidance_scale_2=2.0) if variant == "a14b" else {}
    settings |= dict(image=picture()) if i2v else {}

    def run(p, **kw):
        frames = p(**(settings | kw), generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
        return (frames * 255).round().astype(int)

    good = run(cls.from_pretrained(folder))
    bad_pipe = cls.from_pretrained(folder)
    if sabotage is not None:
        sabotage(bad_pipe)
    diff = np.abs(run(bad_pipe, **change) - good)
    assert diff.mean() > 2 and diff.max() > 20, (mistake, diff.mean(), diff.max())
