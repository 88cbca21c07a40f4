"""Does a folder's VAE keep the shape in its latents? A small CNN probe trained on the posterior means of
training-combo clips (each latent frame, 16 x 8 x 8, a sample) predicts circle / square / triangle on
held-out-combo clips. Beside the checker on decoded frames (`sharpen.reconstruction_shape_accuracy`), it
tells whether a lost shape is the encoder's fault (a new VAE and DiT) or the decoder's (`sharpen`).

    python -m training.video_demo.probe --model-path ditserve/demo/video_model --clips 1200   # ~2 min, CPU
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from torch import nn

from training.demo.scenes import SHAPES

from . import config
from .scenes import NUM_FRAMES, render_clips, sample_clips, split_combos
from .vae import clips_to_tensor

log = logging.getLogger(__name__)


@torch.no_grad()
def latent_frames(vae: AutoencoderKLWan, clips, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Every latent frame of the clips' posterior means [N * frames, C, h, w] and its shape's index."""
    z = torch.cat([vae.encode(clips_to_tensor(render_clips(clips[i:i + batch], NUM_FRAMES))).latent_dist.mean
                   for i in range(0, len(clips), batch)])
    labels = torch.tensor([SHAPES.index(c.combo.shape) for c in clips]).repeat_interleave(z.shape[2])
    return z.transpose(1, 2).flatten(0, 1), labels


@torch.no_grad()
def generated_latent_frames(model_path: Path, vae: AutoencoderKLWan, seeds: tuple[int, ...],
                            prompts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every latent frame the folder's pipeline generates for each held-out prompt (the first
    ``prompts`` of them) and seed, in the VAE's latent units (as `latent_frames`), and its prompt's
    shape index."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    request = {k: v for k, v in config.REQUEST_DEFAULTS.items() if k != "fps"}
    frames, labels = [], []
    for combo in split_combos(config.SEED, config.NUM_HELD_OUT)[1][:prompts]:
        for seed in seeds:
            z = pipe(combo.caption, generator=torch.Generator().manual_seed(seed), output_type="latent",
                     **request).frames * std + mean
            frames.append(z.transpose(1, 2).flatten(0, 1))
            labels += [SHAPES.index(combo.shape)] * z.shape[2]
    return torch.cat(frames), torch.tensor(labels)


def probe(model_path: Path, num_clips: int, steps: int = 1500, seed: int = 0,
          generated_seeds: tuple[int, ...] = ()) -> dict:
    torch.manual_seed(seed)
    vae = AutoencoderKLWan.from_pretrained(model_path / "vae").float().eval()
    train_combos, held = split_combos(config.SEED, config.NUM_HELD_OUT)
    x, y = latent_frames(vae, sample_clips(config.SEED + 11, num_clips, train_combos))
    x_test, y_test = latent_frames(vae, sample_clips(config.SEED + 1, 96, held))  # `sharpen`'s check clips and more
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    net = nn.Sequential(nn.Conv2d(x.shape[1], 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1),
                        nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, len(SHAPES)))
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = (net(x_test).argmax(1) == y_test).float()
    result = {"clips": num_clips, "held_out_accuracy": float(right.mean()),
              **{s: float(right[y_test == i].mean()) for i, s in enumerate(SHAPES)}}
    log.info("shape from the latents, held-out clips: %.1f%% (%s)", 100 * result["held_out_accuracy"],
             ", ".join(f"{s} {100 * result[s]:.1f}%" for s in SHAPES))
    if generated_seeds:
        x_gen, y_gen = generated_latent_frames(model_path, vae, generated_seeds)
        with torch.no_grad():
            right = (net((x_gen - mean) / std).argmax(1) == y_gen).float()
        result["generated_accuracy"] = float(right.mean())
        log.info("shape from the DiT's latents, held-out prompts x seeds %s: %.1f%%", list(generated_seeds),
                 100 * result["generated_accuracy"])
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, default=Path(__file__).resolve().parents[2] / "ditserve/demo/video_model")
    p.add_argument("--clips", type=int, default=1200, help="training-combo clips to fit the probe on")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--generated", action="store_true", help="also score the latents the folder's DiT generates")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --generated: seeds per held-out prompt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return probe(args.model_path, args.clips, args.steps, generated_seeds=tuple(args.seeds) if args.generated else ())


if __name__ == "__main__":
    main()
