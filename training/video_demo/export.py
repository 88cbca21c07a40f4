"""Write the trained parts as a diffusers ``WanPipeline`` folder, plus ditserve's request defaults."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
from transformers import T5TokenizerFast

from . import config
from .dit import Denoiser, save_tokenizer

log = logging.getLogger(__name__)

README = """# ditserve video demo model

A tiny Wan 2.1-shaped text-to-video model trained from scratch by `training/video_demo` in the
ditserve repository. It makes 17-frame, 64x64, 8 fps clips of one filled shape moving in a straight
line across a flat background, from prompts of the form
`a {color} {shape} moving {direction}, {background} background`:

- color, background: red, green, blue, yellow, white, black, orange, purple (CSS named colors)
- shape: circle, square, triangle
- direction: left, right, up, down

It knows nothing else. `ditserve.json` holds the request defaults ditserve uses for it (64x64,
17 frames, 8 fps, 20 steps, guidance 5, 16 text tokens). With diffusers, pass the same:
`WanPipeline.from_pretrained(folder)(prompt, height=64, width=64, num_frames=17, guidance_scale=5.0,
max_sequence_length=16, num_inference_steps=20)`.
"""


def export_pipeline(out: Path, vae: AutoencoderKLWan, latent_stats: dict, denoiser: Denoiser) -> Path:
    """Save a complete pipeline folder at ``out`` (replacing it); ``latent_stats`` has the per-channel
    ``mean`` and ``std`` of the latents."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_tokenizer(out)
    vae.register_to_config(latents_mean=[float(v) for v in latent_stats["mean"]],
                           latents_std=[float(v) for v in latent_stats["std"]])
    pipe = WanPipeline(
        tokenizer=T5TokenizerFast.from_pretrained(out / "tokenizer"),
        text_encoder=denoiser.text_encoder.cpu().eval(),
        transformer=denoiser.dit.cpu().eval(),
        vae=vae.cpu().eval(),
        scheduler=UniPCMultistepScheduler(**config.SCHEDULER),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)  # save_pretrained rewrote the folder the transformers-5 way; ours loads in 4 and 5
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]  # as the Wan folders name it
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "ditserve.json").write_text(json.dumps({"defaults": config.REQUEST_DEFAULTS}, indent=2) + "\n",
                                       encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    for path in out.rglob("*"):  # safetensors are written 0600; a package's files are for every user
        path.chmod(0o755 if path.is_dir() else 0o644)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("exported WanPipeline to %s (%.1f MB)", out, size / 1e6)
    return out
