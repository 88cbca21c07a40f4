"""Write the trained parts as a diffusers ``FluxPipeline`` folder, plus ditserve's request defaults."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTokenizer, T5TokenizerFast

from . import config
from .dit import Denoiser, save_tokenizers

log = logging.getLogger(__name__)

README = """# ditserve demo model

A tiny FLUX.1-schnell-shaped text-to-image model trained from scratch by `training/demo` in the
ditserve repository. It draws 64x64 pictures of one filled shape on a flat background, from
prompts of the form `a {color} {shape} on the {position}, {background} background`:

- color, background: red, green, blue, yellow, white, black, orange, purple (CSS named colors)
- shape: circle, square, triangle
- position: left, right, top, bottom, center

It knows nothing else. `ditserve.json` holds the request defaults ditserve uses for it.
"""


def export_pipeline(out: Path, vae: AutoencoderKL, latent_stats: dict, denoiser: Denoiser) -> Path:
    """Save a complete pipeline folder at ``out`` (replacing it); ``latent_stats`` has shift and scale."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_tokenizers(out)
    vae.register_to_config(scaling_factor=float(latent_stats["scale"]), shift_factor=float(latent_stats["shift"]))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config.SCHEDULER),
        vae=vae.cpu().eval(),
        text_encoder=denoiser.clip.cpu().eval(),
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        text_encoder_2=denoiser.t5.cpu().eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(out / "tokenizer_2"),
        transformer=denoiser.dit.cpu().eval(),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained rewrote the tokenizer folders the transformers-5 way; write ours back
    # (same tokenizers, plus the vocab.json/merges.txt that transformers 4 reads).
    save_tokenizers(out)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    # transformers 5 names the class "T5Tokenizer", which in transformers 4 is the slow
    # SentencePiece class; the real FLUX repos name the fast one.
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "ditserve.json").write_text(json.dumps({"defaults": config.REQUEST_DEFAULTS}, indent=2) + "\n",
                                       encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("exported FluxPipeline to %s (%.1f MB)", out, size / 1e6)
    return out
