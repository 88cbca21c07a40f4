"""ditserve's SD3 / SD3.5 images equal diffusers' StableDiffusion3Pipeline images within 1/255 per
pixel (float32, CPU), on tiny checkpoints: SD3-Medium style, SD3.5-Medium style (MMDiT-X dual
attention + QK RMSNorm), SD3.5-Large style (QK RMSNorm) and a T5-less folder; with and without CFG,
negative prompts, non-square sizes, skip-layer guidance. Then: the fixture can fail (each mistake
below moves pixels far past the tolerance), folder defaults and refusals."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from ditserve import Generator
from ditserve.api import InvalidRequest

MSL = 32  # T5 tokens (the real default is 256; tiny prompts need few)

CASES = [
    # (variant, prompt, negative, height, width, steps, guidance, slg, seed)
    ("sd3", "a red fox in the snow", None, 64, 64, 3, 7.0, None, 0),
    ("sd3", "a lighthouse at dusk", "blurry, low quality", 64, 32, 2, 4.0, None, 7),
    ("sd35m", "a bowl of fruit", None, 64, 64, 3, 5.0, None, 3),
    ("sd35m", "a bowl of fruit", "dark", 80, 48, 2, 1.0, None, 5),
    ("sd35m", "a mountain lake", None, 64, 48, 3, 4.5, dict(skip_guidance_layers=[1], skip_layer_guidance_scale=2.0,
                                                             skip_layer_guidance_start=0.0,
                                                             skip_layer_guidance_stop=0.7), 11),
    ("sd35l", "city at night", "daylight", 48, 64, 2, 3.5, None, 2),
    ("no_t5", "two cats", None, 64, 64, 2, 7.0, None, 99),
]


@pytest.fixture(scope="module")
def loaded(tiny_sd3):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tiny_sd3(variant)
            drop_t5 = dict(text_encoder_3=None, tokenizer_3=None) if variant == "no_t5" else {}
            pipe = StableDiffusion3Pipeline.from_pretrained(path, **drop_t5)
            pipe.set_progress_bar_config(disable=True)
            cache[variant] = (pipe, Generator.from_pretrained(path, device="cpu", dtype=torch.float32))
        return cache[variant]

    return get


def reference(pipe, prompt, negative, h, w, steps, guidance, slg, seed, num_images=1):
    out = pipe(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
               guidance_scale=guidance, max_sequence_length=MSL, num_images_per_prompt=num_images,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **(slg or {}))
    return (out.images * 255).round().astype("uint8")


def ours(gen, prompt, negative, h, w, steps, guidance, slg, seed, num_images=1) -> np.ndarray:
    out = gen.generate(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                       guidance_scale=guidance, seed=seed, max_sequence_length=MSL, num_images=num_images,
                       **(slg or {}))
    return np.stack([np.asarray(im) for im in out.images])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[3]}x{c[4]}-g{c[6]}{'-slg' if c[7] else ''}" for c in CASES])
def test_image_matches_diffusers(loaded, case):
    variant, *args = case
    pipe, gen = loaded(variant)
    expected = reference(pipe, *args)
    assert expected.shape == (1, args[2], args[3], 3)
    assert expected.std() > 10  # a real picture, not a flat one
    assert max_diff(ours(gen, *args), expected) <= 1


def test_skip_layer_guidance_changes_the_image(loaded):
    """The SLG case above is not passing by accident: without SLG, diffusers' image differs."""
    pipe, _ = loaded("sd35m")
    _, prompt, negative, h, w, steps, guidance, slg, seed = next(c for c in CASES if c[7])
    with_slg = reference(pipe, prompt, negative, h, w, steps, guidance, slg, seed)
    without = reference(pipe, prompt, negative, h, w, steps, guidance, None, seed)
    assert max_diff(with_slg, without) > 10


def test_several_images_per_prompt_match_diffusers(loaded):
    pipe, gen = loaded("sd3")
    args = ("three owls", None, 32, 48, 2, 5.0, None, 21)
    expected = reference(pipe, *args, num_images=2)
    got = ours(gen, *args, num_images=2)
    assert max_diff(got, expected) <= 1
    assert max_diff(got[0], got[1]) > 10  # distinct noise per image


def test_batched_requests_match_one_by_one(loaded):
    """Two requests with different prompts, negatives and CFG scales as one batch: each gets its own image."""
    from ditserve.api import GenerationRequest

    _, gen = loaded("sd35m")
    engine = gen.engine
    reqs = [engine.resolve(GenerationRequest(prompt=p, negative_prompt=n, height=48, width=48, num_inference_steps=2,
                                             seed=s, guidance_scale=g, max_sequence_length=MSL))
            for p, n, s, g in [("a cat", None, 1, 4.0), ("a dog", "grey", 2, 7.5)]]
    batched = engine.run_batch(reqs)
    for req, out in zip(reqs, batched):
        assert max_diff(np.asarray(out.images[0]), np.asarray(engine.run_batch([req])[0].images[0])) <= 1


def test_dynamic_shift_scheduler_matches_diffusers(tiny_sd3, tmp_path):
    """A folder whose scheduler shifts by image size (mu from the patch count) and stretches to a terminal
    sigma: the SD3 pipeline's own rule, without the sigmas FLUX's pipeline passes."""
    import json
    import shutil

    folder = shutil.copytree(tiny_sd3("sd3"), tmp_path / "dynamic")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dynamic_shifting": True,
                                  "base_image_seq_len": 16, "max_image_seq_len": 256, "shift_terminal": 0.1}))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    args = ("a fox", None, 48, 80, 3, 5.0, None, 3)
    got = ours(Generator.from_pretrained(folder, device="cpu", dtype=torch.float32), *args)
    assert max_diff(got, reference(pipe, *args)) <= 1


# -- the fixture can fail: each mistake moves pixels far past 1/255 ------------------------------

def _last_hidden_state(self, prompts):
    ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids
    out = self.model(ids, output_hidden_states=True)
    return out.hidden_states[-1], out.text_embeds


def _unprojected_pool(self, prompts):
    ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids
    out = self.model(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.last_hidden_state[torch.arange(len(prompts)), -1, : out.text_embeds.shape[-1]]


def _zeros_for_empty(encode):
    """`encode` with zeros for the empty negative prompt instead of its encoding."""
    def call(self, prompts, max_sequence_length):
        text = encode(self, prompts, max_sequence_length)
        if all(p == "" for p in prompts):
            return type(text)(torch.zeros_like(text.txt), torch.zeros_like(text.pooled))
        return text
    return call


@pytest.mark.parametrize("mistake", ["perturbed_weight", "last_clip_layer", "pooled_without_projection",
                                     "no_t5", "zeros_for_empty_negative"])
def test_a_mistake_is_caught(loaded, monkeypatch, mistake):
    from ditserve.encoders.sd3_text import ClipProjectedEncoder, SD3TextEncoder

    pipe, gen = loaded("sd35m")
    args = ("a red fox in the snow", None, 64, 64, 2, 5.0, None, 0)
    expected = reference(pipe, *args)
    dit = gen.engine.pipeline.dit
    original = dit.pos_table.data.clone()
    if mistake == "perturbed_weight":
        dit.pos_table.data.add_(0.05 * torch.randn_like(original))
    elif mistake == "last_clip_layer":
        monkeypatch.setattr(ClipProjectedEncoder, "__call__", _last_hidden_state)
    elif mistake == "pooled_without_projection":
        monkeypatch.setattr(ClipProjectedEncoder, "__call__", _unprojected_pool)
    elif mistake == "no_t5":  # zeros in T5's place, as for a T5-less folder
        monkeypatch.setattr(gen.engine.pipeline.text, "t5", None)
    else:
        monkeypatch.setattr(SD3TextEncoder, "__call__", _zeros_for_empty(SD3TextEncoder.__call__))
    try:
        assert max_diff(ours(gen, *args), expected) > 4
    finally:
        dit.pos_table.data.copy_(original)


def test_negative_prompt_matters(loaded):
    """With CFG the empty negative prompt is encoded (not zeros, not skipped): a different negative
    prompt changes the picture."""
    pipe, gen = loaded("sd3")
    base = ("a red fox", None, 64, 64, 2, 6.0, None, 4)
    assert max_diff(ours(gen, *base), reference(pipe, "a red fox", "green", *base[2:])) > 4


# -- folder defaults and refusals ------------------------------------------------------------

def test_folder_defaults_and_limits(tiny_sd3):
    from ditserve.runtime.loader import inspect_model

    src = inspect_model(tiny_sd3("sd35m"))
    assert (src.defaults.height, src.defaults.width) == (64, 64)  # sample_size 8 x VAE 8
    assert (src.defaults.guidance_scale, src.defaults.num_inference_steps, src.defaults.max_sequence_length) == \
        (7.0, 28, 256)
    assert src.limits.max_size == 128 and src.limits.size_multiple == 16 and src.limits.guidance_layers == 3


def test_refusals(loaded):
    _, gen = loaded("sd3")
    with pytest.raises(InvalidRequest, match="between 16 and 128"):
        gen.generate("too big", height=144, width=64, num_inference_steps=1)
    with pytest.raises(InvalidRequest, match="skip_guidance_layers"):
        gen.generate("no such layer", num_inference_steps=1, skip_guidance_layers=[3])


def test_batch_key_separates_guided_from_unguided():
    from ditserve.api import GenerationRequest
    from ditserve.pipelines.sd3 import StableDiffusion3Pipeline as Ours

    def key(**kw):
        return Ours.batch_key(GenerationRequest("x", height=64, width=64, num_inference_steps=2, max_sequence_length=8,
                                                **kw))

    assert key(guidance_scale=7.0) == key(guidance_scale=4.0)
    assert key(guidance_scale=7.0) != key(guidance_scale=1.0)
    assert key(guidance_scale=7.0) != key(guidance_scale=7.0, skip_guidance_layers=(1,))


@pytest.mark.parametrize("change,needle", [
    (dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is not supported"),
    (dict(caption_projection_dim=48), "caption_projection_dim 48 must equal"),
    (dict(dual_attention_layers=[5]), "dual_attention_layers [5] are outside"),
])
def test_config_refusals(change, needle):
    from ditserve.models.sd3.config import SD3Config

    base = dict(num_layers=3, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32)
    with pytest.raises(ValueError) as err:
        SD3Config.from_dict({**base, **change})
    assert needle in str(err.value)


@pytest.mark.parametrize("variant", ["sd3", "sd35m"])
def test_dit_in_bfloat16_is_as_close_as_diffusers(tiny_sd3, variant):
    """Our DiT against diffusers' SD3Transformer2DModel in bf16, skip layers too: without QK norm the
    same bits; with it (SD3.5) our RMSNorm rounds once where diffusers' rounds twice, so each lands
    ~2% from the float32 result on this sharp tiny model, ours no further than diffusers'."""
    from diffusers import SD3Transformer2DModel

    from ditserve.models.sd3.model import SD3Inputs
    from ditserve.models.sd3.weights import load_sd3_dit

    folder = tiny_sd3(variant) / "transformer"
    ref = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ref32 = SD3Transformer2DModel.from_pretrained(folder).eval()
    dit = load_sd3_dit(folder, "cpu", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x, txt = torch.randn(2, 16, 6, 10, generator=gen), torch.randn(2, 9, 48, generator=gen)
    pooled, t = torch.randn(2, 40, generator=gen), torch.tensor([950.0, 120.0])
    inp = SD3Inputs(x.bfloat16(), txt.bfloat16(), pooled.bfloat16(), t)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    with torch.no_grad():
        for skip in ((), (1,)):
            layers = list(skip) or None
            want = ref(hidden_states=inp.x, encoder_hidden_states=inp.txt, pooled_projections=inp.pooled,
                       timestep=t, skip_layers=layers).sample
            exact = ref32(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                          skip_layers=layers).sample
            got = dit.forward_skipping(inp, skip) if skip else dit(inp)
            if variant == "sd3":
                assert torch.equal(got, want)
            else:
                assert rel(got, exact) <= 1.25 * rel(want, exact) and rel(got, want) < 2e-2


def test_unsupported_transformer_config_is_one_line(tiny_sd3, tmp_path):
    import json
    import shutil

    from ditserve.runtime.loader import inspect_model

    folder = shutil.copytree(tiny_sd3("sd3"), tmp_path / "l2", ignore=shutil.ignore_patterns("*.safetensors"))
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "qk_norm": "l2"}))
    with pytest.raises(InvalidRequest, match="qk_norm='l2' is not supported"):
        inspect_model(folder)
