"""Shared pytest fixtures.

Tiny checkpoints are built offline (see ``tests/tiny``) once per session, on
first use. To add one, write a builder in ``tests/tiny`` and a session fixture
that calls ``_build_once``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# ``tests/`` on sys.path so ``tiny.*`` imports under any pytest import mode
# (the default "prepend" mode already does this for a rootdir conftest).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def _build_once(tmp_path_factory: pytest.TempPathFactory, name: str, builder, **kwargs) -> Path:
    return builder(tmp_path_factory.mktemp(name, numbered=True), **kwargs)


def _variants(tmp_path_factory: pytest.TempPathFactory, name: str, builder, default: str):
    """A function `variant -> folder` that builds each variant of a family once per session."""
    built: dict[str, Path] = {}

    def get(variant: str = default) -> Path:
        if variant not in built:
            built[variant] = _build_once(tmp_path_factory, f"{name}_{variant}", builder, variant=variant)
        return built[variant]

    return get


# --- tiny FLUX (diffusers format) --------------------------------------------

@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory) -> Path:
    """FLUX.1-dev-like: guidance embedding, dynamic-shift scheduler."""
    from tiny.flux import build_tiny_flux
    return _build_once(tmp_path_factory, "tiny_flux_dev", build_tiny_flux, guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    """FLUX.1-schnell-like: no guidance embedding, shift 1.0, static schedule."""
    from tiny.flux import build_tiny_flux
    return _build_once(tmp_path_factory, "tiny_flux_schnell", build_tiny_flux, guidance_embeds=False)


@pytest.fixture(scope="session")
def tiny_flux_dev_sharded(tmp_path_factory) -> Path:
    """As ``tiny_flux_dev`` but the transformer is split into several safetensors shards."""
    from tiny.flux import build_tiny_flux
    return _build_once(tmp_path_factory, "tiny_flux_dev_sharded", build_tiny_flux,
                       guidance_embeds=True, sharded=True)


# --- tiny Qwen-Image (diffusers format) --------------------------------------

@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> Path:
    """Qwen-Image text-to-image: Qwen2.5-VL text encoder, Qwen VAE, MSRoPE transformer."""
    from tiny.qwen_image import build_tiny_qwen_image
    return _build_once(tmp_path_factory, "tiny_qwen_image", build_tiny_qwen_image, kind="t2i")


@pytest.fixture(scope="session")
def tiny_qwen_image_edit(tmp_path_factory) -> Path:
    """Qwen-Image-Edit: as ``tiny_qwen_image`` plus a ``processor/`` for the input image."""
    from tiny.qwen_image import build_tiny_qwen_image
    return _build_once(tmp_path_factory, "tiny_qwen_image_edit", build_tiny_qwen_image, kind="edit")


@pytest.fixture(scope="session")
def tiny_qwen_image_edit_plus(tmp_path_factory) -> Path:
    """Qwen-Image-Edit-2509-like (``QwenImageEditPlusPipeline``): several input images."""
    from tiny.qwen_image import build_tiny_qwen_image
    return _build_once(tmp_path_factory, "tiny_qwen_image_edit_plus", build_tiny_qwen_image, kind="edit_plus")


@pytest.fixture(scope="session")
def tiny_qwen_image_edit_2511(tmp_path_factory) -> Path:
    """Qwen-Image-Edit-2511-like: Edit Plus with ``zero_cond_t`` (input images modulated at t=0)."""
    from tiny.qwen_image import build_tiny_qwen_image
    return _build_once(tmp_path_factory, "tiny_qwen_image_edit_2511", build_tiny_qwen_image, kind="edit_2511")


@pytest.fixture(scope="session")
def tiny_qwen_image_layered(tmp_path_factory) -> Path:
    """Qwen-Image-Layered-like (``QwenImageLayeredPipeline``): RGBA VAE, layered 3D RoPE, additional t embedding."""
    from tiny.qwen_image import build_tiny_qwen_image
    return _build_once(tmp_path_factory, "tiny_qwen_image_layered", build_tiny_qwen_image, kind="layered")


# --- tiny Wan 2.1 / 2.2 (diffusers format) -------------------------------------

@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """A function `variant -> folder` (t2v, i2v, a14b, i2v_a14b, ti2v), each built once per session."""
    from tiny.wan import build_tiny_wan
    return _variants(tmp_path_factory, "tiny_wan", build_tiny_wan, "t2v")


# --- tiny Stable Diffusion 3 / 3.5 (diffusers format) ---------------------------

@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A function `variant -> folder` (sd3, sd35m, sd35l, no_t5; tests/tiny/sd3.py), each built once."""
    from tiny.sd3 import build_tiny_sd3
    return _variants(tmp_path_factory, "tiny_sd3", build_tiny_sd3, "sd3")


# --- tiny CogVideoX (diffusers format) -------------------------------------------

@pytest.fixture(scope="session")
def tiny_cogvideox(tmp_path_factory):
    """A function `variant -> folder` (2b, 5b, 5b_dynamic, 1.5, i2v, 1.5_i2v; tests/tiny/cogvideox.py), each built once."""
    from tiny.cogvideox import build_tiny_cogvideox
    return _variants(tmp_path_factory, "tiny_cogvideox", build_tiny_cogvideox, "2b")


# --- tiny HunyuanVideo (diffusers format) ------------------------------------------

@pytest.fixture(scope="session")
def tiny_hunyuan_video(tmp_path_factory) -> Path:
    """HunyuanVideo T2V-like: LLaMA + CLIP text, 3D VAE, embedded guidance, shift 7 (tests/tiny/hunyuan_video.py)."""
    from tiny.hunyuan_video import build_tiny_hunyuan_video
    return _build_once(tmp_path_factory, "tiny_hunyuan_video", build_tiny_hunyuan_video)
