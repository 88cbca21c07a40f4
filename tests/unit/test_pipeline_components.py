"""Every pipeline lists all the modules it holds (`components()`: offload and memory reports walk it),
and the engine hands every DiT it holds to the speed transforms — both Wan 2.2 A14B experts."""

import pytest
from torch import nn

from ditserve.config import EngineConfig, ModelConfig
from ditserve.runtime import engine as engine_module
from ditserve.runtime.engine import Engine


def held_modules(obj, depth: int = 3, seen=None) -> list[tuple[str, nn.Module]]:
    """The nn.Modules an object holds in its attributes, looking through plain helper objects (text
    encoder wrappers and the like) `depth` levels deep; a module is not opened."""
    seen = set() if seen is None else seen
    found = []
    for name, value in vars(obj).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, nn.Module):
            found.append((name, value))
        elif depth > 0 and hasattr(value, "__dict__") and not isinstance(value, type) \
                and type(value).__module__.startswith("ditserve."):
            found += [(f"{name}.{n}", m) for n, m in held_modules(value, depth - 1, seen)]
    return found


def check_components(pipeline) -> dict:
    parts = pipeline.components()
    assert all(isinstance(m, nn.Module) for m in parts.values()), parts
    listed = {id(sub) for m in parts.values() for sub in m.modules()}
    missing = [name for name, module in held_modules(pipeline) if id(module) not in listed]
    assert not missing, f"{type(pipeline).__name__} holds modules components() does not list: {missing}"
    for name in pipeline.dit_names:
        dit = getattr(pipeline, name, None)
        assert dit is None or any(dit is m for m in parts.values()), name
    return parts


def load(folder):
    return Engine.from_config(EngineConfig(ModelConfig(str(folder), "cpu", "float32"))).pipeline


def test_engine_accelerates_and_caches_both_wan_experts(tiny_wan, monkeypatch):
    accelerated, cached = [], []

    def spy(record, real):
        def wrapped(dit, *args, **kwargs):
            record.append(dit)
            return real(dit, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(engine_module, "accelerate_dit", spy(accelerated, engine_module.accelerate_dit))
    monkeypatch.setattr(engine_module, "cache_dit", spy(cached, engine_module.cache_dit))
    pipeline = load(tiny_wan("a14b"))
    assert pipeline.dit_names == ("dit", "dit_2") and pipeline.dit is not pipeline.dit_2
    for record in (accelerated, cached):
        assert len(record) == 2 and {id(d) for d in record} == {id(pipeline.dit), id(pipeline.dit_2)}
    parts = check_components(pipeline)
    assert {"transformer", "transformer_2", "text_encoder", "vae"} <= set(parts)


def test_wan_i2v_lists_its_image_encoder(tiny_wan):
    parts = check_components(load(tiny_wan("i2v")))
    assert "image_encoder" in parts


@pytest.mark.parametrize("family", ["flux", "qwen_image", "qwen_image_edit_plus", "qwen_image_layered", "sd3",
                                    "sd3_no_t5", "cogvideox", "cogvideox_i2v", "hunyuan_video"])
def test_every_family_lists_every_module(request, family):
    folder = {
        "flux": lambda: request.getfixturevalue("tiny_flux_dev"),
        "qwen_image": lambda: request.getfixturevalue("tiny_qwen_image"),
        "qwen_image_edit_plus": lambda: request.getfixturevalue("tiny_qwen_image_edit_plus"),
        "qwen_image_layered": lambda: request.getfixturevalue("tiny_qwen_image_layered"),
        "sd3": lambda: request.getfixturevalue("tiny_sd3")("sd35l"),
        "sd3_no_t5": lambda: request.getfixturevalue("tiny_sd3")("no_t5"),
        "cogvideox": lambda: request.getfixturevalue("tiny_cogvideox")("5b"),
        "cogvideox_i2v": lambda: request.getfixturevalue("tiny_cogvideox")("i2v"),
        "hunyuan_video": lambda: request.getfixturevalue("tiny_hunyuan_video"),
    }[family]()
    parts = check_components(load(folder))
    assert "transformer" in parts and "vae" in parts


def test_the_check_finds_a_module_left_out(tiny_flux_dev, monkeypatch):
    pipeline = load(tiny_flux_dev)
    fewer = {k: v for k, v in pipeline.components().items() if k != "text_encoder"}
    monkeypatch.setattr(type(pipeline), "components", lambda self: fewer)
    with pytest.raises(AssertionError, match=r"\['clip.model'\]"):
        check_components(pipeline)
