"""Build a tiny, randomly initialised HunyuanVideo checkpoint in diffusers format, offline.

The folder (``model_index.json``, ``scheduler/``, ``text_encoder/`` (LlamaModel), ``tokenizer/``
(LlamaTokenizerFast), ``text_encoder_2/`` (CLIPTextModel), ``tokenizer_2/``, ``vae/``
(AutoencoderKLHunyuanVideo) and ``transformer/``) loads in ``diffusers.HunyuanVideoPipeline``.

Shapes that matter to code under test:

* tokenizer: a byte-fallback BPE LLaMA tokenizer (right padding) whose merges make the prompt
  template's system text about 100 tokens long, so diffusers' fixed ``crop_start`` of 95 lands just
  before the user header and the prompt survives the 256 + 95 token limit; the template's header
  tokens are special tokens, as in LLaMA 3.
* LLaMA: 4 layers of width 32, so ``hidden_states[-3]`` (after layer 2) differs from the last layer.
* VAE: 4 blocks -> 8x spatial, 4x temporal, 4 latent channels; frames 4k + 1, sides multiples of 16.
* transformer: 2 heads x 16, RoPE axes (4, 6, 6), weights redrawn from N(0, 0.2) with the q/k norm
  gains x3 (sharp attention), so a wrong prompt, layer or mask shows in the pixels.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
    DEFAULT_PROMPT_TEMPLATE,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
)

from ditserve.bench.tokenizers import learn_merges

from .tokenizers import (
    CLIP_BOS,
    CLIP_EOS,
    CLIP_MAX_LENGTH,
    clip_vocab,
    save_clip_tokenizer,
)

logger = logging.getLogger(__name__)

SEED = 0
INIT_STD = 0.2
TEXT_DIM = 32
LLAMA_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PROMPT_WORDS = ("a", "red", "cat", "walks", "on", "the", "grass", "blue", "dog", "sits", "blurry,", "static")
PREFIX_TOKENS = 110  # at most this many tokens before the prompt (diffusers crops 95)

SCHEDULER = dict(num_train_timesteps=1000, shift=7.0, use_dynamic_shifting=False)  # HunyuanVideo's
TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                   num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                   text_embed_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, rope_axes_dim=(4, 6, 6))
VAE = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
           scaling_factor=0.476986)


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training (most frequent pair first, ties by the pair) until every word is one token."""
    return learn_merges({w: list(w) for w in sorted(set(words))})


def _llama_tokenizer(merges: list[tuple[str, str]], chars: list[str]) -> LlamaTokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)  # byte fallback: any text tokenises
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>", additional_special_tokens=list(LLAMA_SPECIAL))


def save_llama_tokenizer(path: Path) -> int:
    """Write the tiny LLaMA tokenizer into ``path`` (right padding); return its size."""
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    plain = template
    for token in LLAMA_SPECIAL:
        plain = plain.replace(token, " ")
    words = ["\u2581" + w for w in plain.split() + list(PROMPT_WORDS)]
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,"))
    merges = _bpe_merges(words)
    prefix = template.split("{}")[0]
    n = len(merges)  # the fewest merges that bring the template's prefix under PREFIX_TOKENS
    lo, hi = 0, len(merges)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_llama_tokenizer(merges[:mid], chars)(prefix).input_ids) <= PREFIX_TOKENS:
            hi = mid
        else:
            lo = mid + 1
    n = lo
    tok = _llama_tokenizer(merges[:n], chars)
    tok.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["padding_side"] = "right"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return len(tok)


def _llama(vocab_size: int) -> LlamaModel:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         rms_norm_eps=1e-5, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(SEED + 1)
    model = LlamaModel(config).eval()
    with torch.no_grad():  # a final norm far from identity: hidden_states[-3] vs the last layer shows
        model.norm.weight.uniform_(0.5, 2.0)
    return model


def _clip(vocab_size: int) -> CLIPTextModel:
    vocab = clip_vocab()
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37,
                            projection_dim=TEXT_DIM, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
                            bos_token_id=vocab[CLIP_BOS], eos_token_id=vocab[CLIP_EOS], pad_token_id=vocab[CLIP_EOS])
    torch.manual_seed(SEED + 2)
    return CLIPTextModel(config).eval()


def _vae() -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(SEED + 3)
    return AutoencoderKLHunyuanVideo(**VAE).eval()


def _transformer() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(SEED + 4)
    model = HunyuanVideoTransformer3DModel(**TRANSFORMER, guidance_embeds=True).eval()
    gen = torch.Generator("cpu").manual_seed(SEED + 5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * INIT_STD)
            if "norm_q" in name or "norm_k" in name or "norm_added_q" in name or "norm_added_k" in name:
                param.mul_(3 / INIT_STD / 4).add_(3)  # gains around 3: sharp attention
    return model


def build_tiny_hunyuan_video(path: str | Path) -> Path:
    """Write a tiny HunyuanVideo pipeline folder to ``path`` and return it."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    llama_size = save_llama_tokenizer(path / "tokenizer")
    clip_size = save_clip_tokenizer(path / "tokenizer_2")
    pipe = HunyuanVideoPipeline(
        text_encoder=_llama(llama_size), tokenizer=LlamaTokenizer.from_pretrained(path / "tokenizer"),
        transformer=_transformer(), vae=_vae(), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        text_encoder_2=_clip(clip_size), tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    save_llama_tokenizer(path / "tokenizer")  # our files back over save_pretrained's rewrite
    save_clip_tokenizer(path / "tokenizer_2")
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer"] = ["transformers", "LlamaTokenizerFast"]  # as the real folders name it
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    logger.info("built tiny HunyuanVideo at %s", path)
    return path
