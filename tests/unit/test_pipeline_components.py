"""Every pipeline lists all the modules it holds (`components()`: offload and memory reports walk it),
the engine hands every DiT it holds to the speed transforms — both Wan 2.2 A14B experts — and each
DiT's plan names only modules and sites the DiT has."""

from fnmatch import fnmatch

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


def check_plan(dits: list[nn.Module]) -> None:
    """The plan names only what the DiTs (variants of one family) have: block lists and head on each,
    and every block-relative pattern matched by at least one of them (a renamed module would
    otherwise drop out of FP8 or TP silently); attention and QK-RoPE sites on every block."""
    plan = dits[0].plan
    names, linears = set(), set()
    for dit in dits:
        assert type(dit) is type(dits[0])  # one family (a variant may drop a layout from its plan)
        assert all(isinstance(getattr(dit, n), nn.ModuleList) for n in plan.block_lists)
        assert isinstance(getattr(dit, plan.head), nn.Module)
        for block in dit.blocks:
            names |= {n for n, _ in block.named_modules() if n}
            linears |= {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            for site in plan.attention_sites:
                owner, _, attr = site.rpartition(".")
                assert hasattr(block.get_submodule(owner) if owner else block, attr), site
            assert plan.qk_rope_site is None or hasattr(block, plan.qk_rope_site)
    patterns = {"fp8": plan.fp8, "fp8_keep": plan.fp8_keep}
    if plan.tensor is not None:
        patterns |= {"tensor.column": plan.tensor.column, "tensor.row": plan.tensor.row}
    for field, pats in patterns.items():
        pool = names if field == "fp8_keep" else linears
        for pat in pats:
            assert any(fnmatch(n, pat) for n in pool), f"{type(dits[0]).__name__} plan.{field} {pat!r} matches nothing"
    for dit in dits:
        if dit.plan.sequence is not None:
            assert set(dit.plan.sequence.self_attention_sites) <= set(dit.plan.attention_sites)
    for site in plan.token_sites:  # forward chunking (accel/activations.py) would skip a misnamed one
        owner, _, attr = site.rpartition(".")
        held = [getattr(b.get_submodule(owner) if owner else b, attr, None) for d in dits for b in d.blocks
                if not owner or owner in dict(b.named_modules())]
        assert any(callable(h) for h in held), f"{type(dits[0]).__name__} plan.token_sites {site!r} matches nothing"


def dits_of(pipeline) -> list[nn.Module]:
    return [getattr(pipeline, n) for n in pipeline.dit_names if getattr(pipeline, n, None) is not None]


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


def test_wan_i2v_lists_its_image_encoder_and_the_plan_fits_wan(tiny_wan):
    i2v, a14b = load(tiny_wan("i2v")), load(tiny_wan("a14b"))
    assert "image_encoder" in check_components(i2v)
    check_plan(dits_of(i2v) + dits_of(a14b))  # the image key/value projections exist in I2V only


FAMILIES = {  # variants whose DiTs together have every module their plan names
    "flux": [("tiny_flux_dev", None)],
    "qwen_image": [("tiny_qwen_image", None), ("tiny_qwen_image_edit_plus", None), ("tiny_qwen_image_layered", None)],
    "sd3": [("tiny_sd3", "sd35l"), ("tiny_sd3", "sd35m"), ("tiny_sd3", "no_t5")],
    "cogvideox": [("tiny_cogvideox", "5b"), ("tiny_cogvideox", "i2v")],
    "hunyuan_video": [("tiny_hunyuan_video", None)],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_lists_every_module_and_its_plan_fits(request, family):
    dits = []
    for fixture, variant in FAMILIES[family]:
        folder = request.getfixturevalue(fixture)
        pipeline = load(folder(variant) if variant else folder)
        parts = check_components(pipeline)
        assert "transformer" in parts and "vae" in parts
        dits += dits_of(pipeline)
    check_plan(dits)


def test_the_check_finds_a_module_left_out(tiny_flux_dev, monkeypatch):
    pipeline = load(tiny_flux_dev)
    fewer = {k: v for k, v in pipeline.components().items() if k != "text_encoder"}
    monkeypatch.setattr(type(pipeline), "components", lambda self: fewer)
    with pytest.raises(AssertionError, match=r"\['clip.model'\]"):
        check_components(pipeline)
