"""CogVideoX pipelines: ditserve's frames equal diffusers' (float32, CPU) within 1/255 per pixel, per
frame, for every checkpoint shape and both schedulers, with CFG and dynamic CFG; the fixtures are
able to fail; bad input is refused in one line before any model work."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.api import GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig, ModelConfig
from ditserve.runtime.engine import Engine
from ditserve.runtime.loader import inspect_model

PROMPT, NEGATIVE = "a red cat walks on the grass", "blurry, static"
BASE = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=6.0, negative_prompt=NEGATIVE)


def input_image(w=56, h=40, seed=0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def reference(folder, variant, image=None, **kw):
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    cls = diffusers.CogVideoXImageToVideoPipeline if image is not None else diffusers.CogVideoXPipeline
    pipe = cls.from_pretrained(folder)
    extra = {"image": image} if image is not None else {}
    frames = pipe(**kw, **extra, use_dynamic_cfg=variant == "5b_dynamic", generator=torch.Generator().manual_seed(0),
                  output_type="np").frames[0]
    return (frames * 255).round().astype("uint8")


_ENGINES = {}


def engine(folder) -> Engine:
    if folder not in _ENGINES:
        _ENGINES[folder] = Engine.from_config(EngineConfig(ModelConfig(str(folder), "cpu", "float32")))
    return _ENGINES[folder]


_RUNS = {}


def ours(folder, image=None, **kw) -> np.ndarray:
    key = (folder, image is None, tuple(sorted(kw.items())))
    if key not in _RUNS:
        req = GenerationRequest(seed=kw.pop("seed", 0), images=() if image is None else (image,), **kw)
        _RUNS[key] = engine(folder).generate(req).videos[0]
    return _RUNS[key]


CASES = {
    # variant: (request settings, input image?)
    "2b": (BASE, False),  # DDIM, sin-cos positions
    "5b": (dict(BASE, height=48, width=32, guidance_scale=1.0), False),  # DPM, no CFG, rotary grid cropped
    "5b_dynamic": (BASE, False),  # DPM, dynamic CFG
    "i2v": (BASE, True),  # learned + rotary positions, image latents on channels
    "1.5_i2v": (dict(BASE, height=16, width=32), True),  # temporal patches (one latent frame padded), ofs, DPM
}


@pytest.mark.parametrize("variant", list(CASES))
def test_frames_match_diffusers(tiny_cogvideox, variant):
    settings, with_image = CASES[variant]
    folder = tiny_cogvideox(variant)
    image = input_image() if with_image else None
    expected = reference(folder, variant, image, prompt=PROMPT, **settings)
    got = ours(folder, image, prompt=PROMPT, **settings)
    assert got.shape == expected.shape == (settings["num_frames"], settings["height"], settings["width"], 3)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, (variant, diff.max(), diff.mean())
    assert expected.std() > 10 and ((expected == 0) | (expected == 255)).mean() < 0.4  # not flat, not clamped


@pytest.mark.parametrize("change, variant", [
    (dict(prompt="a blue dog sits"), "2b"), (dict(negative_prompt=None), "2b"), (dict(seed=1), "5b"),
    (dict(max_sequence_length=200), "5b"),  # T5 runs unmasked: the padding to 226 tokens matters
])
def test_fixtures_can_fail(tiny_cogvideox, change, variant):
    """Each mistake the parity test must catch moves pixels far more than 1/255."""
    folder = tiny_cogvideox(variant)
    base = ours(folder, prompt=PROMPT, **BASE)
    other = ours(folder, **{"prompt": PROMPT, **BASE, **change})
    assert np.abs(base.astype(int) - other.astype(int)).max() > 20, change


def test_dynamic_cfg_changes_the_video(tiny_cogvideox):
    plain, dynamic = (ours(tiny_cogvideox(v), prompt=PROMPT, **BASE) for v in ("5b", "5b_dynamic"))
    assert np.abs(plain.astype(int) - dynamic.astype(int)).max() > 20


@pytest.mark.parametrize("variant, change, named", [
    ("2b", dict(num_frames=13), r"num_frames must be 8k\+1"),  # the VAE's two-frame batches would not round-trip
    ("2b", dict(max_sequence_length=100), "max_sequence_length"),  # the sin-cos table is laid out for 226
    ("2b", dict(flow_shift=3.0), "flow_shift"), ("2b", dict(sampler="dpm"), "sampler must be one of ddim"),
    ("2b", dict(guidance_scale_2=2.0), "guidance_scale_2"),
    ("i2v", dict(height=48, width=48), "learned positions"), ("i2v", dict(images=()), "image"),
    ("1.5_i2v", dict(height=48, width=48), "positions reach"),
])
def test_bad_input_is_refused_in_one_line(tiny_cogvideox, variant, change, named):
    folder = tiny_cogvideox(variant)
    kw = {**BASE, "prompt": PROMPT, "seed": 0, **change}
    if variant.endswith("i2v") and "images" not in kw:
        kw["images"] = (input_image(),)
    source = inspect_model(folder)  # the folder's configs only: refused at the edge, before any weights load
    with pytest.raises(InvalidRequest, match=named) as err:
        GenerationRequest(**kw).resolve(source.defaults, source.limits)
    assert "\n" not in str(err.value)


def test_cli_writes_the_video_and_refuses_bad_frames(tiny_cogvideox, tmp_path, capsys):
    """`ditserve generate` on a CogVideoX folder: the Python API's video at the folder's 8 fps; 13 frames
    exit 2 with one line."""
    from ditserve.cli.main import main
    from ditserve.runtime.video_io import read_video

    folder, out = tiny_cogvideox("2b"), tmp_path / "v.mp4"
    args = ["generate", "--model-path", str(folder), "--device", "cpu", "--dtype", "float32", "--prompt", PROMPT,
            "--seed", "0", "--num-inference-steps", "2", "--guidance-scale", "1"]
    assert main([*args, "--output", str(out)]) == 0
    frames, rate = read_video(out.read_bytes())
    assert frames.shape == (9, 32, 48, 3) and rate == 8
    api = ours(folder, prompt=PROMPT, num_inference_steps=2, guidance_scale=1.0)
    assert np.abs(frames.mean(axis=(1, 2)) - api.mean(axis=(1, 2))).max() < 6  # the MP4 is lossy
    capsys.readouterr()
    assert main([*args, "--num-frames", "13", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ditserve: error: num_frames must be 8k+1") and "\n" not in err


def test_dynamic_cfg_per_request_is_the_folder_default_of_another(tiny_cogvideox):
    """`use_dynamic_cfg=True` on the plain 5B folder draws what the folder whose ditserve.json turns it
    on draws by default (same weights); on a model without dynamic CFG the field is refused at the edge."""
    per_request = ours(tiny_cogvideox("5b"), prompt=PROMPT, use_dynamic_cfg=True, **BASE)
    assert np.array_equal(per_request, ours(tiny_cogvideox("5b_dynamic"), prompt=PROMPT, **BASE))
    turned_off = ours(tiny_cogvideox("5b_dynamic"), prompt=PROMPT, use_dynamic_cfg=False, **BASE)
    assert np.array_equal(turned_off, ours(tiny_cogvideox("5b"), prompt=PROMPT, **BASE))


def test_dynamic_cfg_is_refused_where_the_model_has_none(tiny_wan):
    source = inspect_model(tiny_wan("t2v"))
    with pytest.raises(InvalidRequest, match="use_dynamic_cfg is CogVideoX's"):
        GenerationRequest(prompt=PROMPT, use_dynamic_cfg=True).resolve(source.defaults, source.limits)
