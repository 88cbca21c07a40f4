"""Locally built tokenizers for the tiny test checkpoints.

Nothing here touches the network. Both tokenizers are deliberately small but
cover arbitrary text, so different prompts give different token ids:

* :func:`save_clip_tokenizer` writes a byte-level BPE ``CLIPTokenizer`` with no
  merges: every byte of the (lower-cased) prompt becomes one token.
* :func:`save_t5_tokenizer` writes a Unigram ``T5TokenizerFast`` whose pieces are
  single characters (bare and with the ``▁`` word prefix) plus a few short words.

Each function writes a folder that ``<Class>.from_pretrained(folder)`` loads,
and returns the vocabulary size to give the matching text encoder.

Note: this module is ``tiny.tokenizers``; it imports the ``tokenizers`` library
absolutely, so it must not be put on ``sys.path`` as a top-level module.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, T5TokenizerFast

logger = logging.getLogger(__name__)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = 512
METASPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker

# Characters the T5 vocabulary knows, each as a bare piece and a "▁"-prefixed one.
_T5_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?;:'\"-()/&"
# A few whole words, so common prompts produce word-level pieces as well.
_T5_WORDS = ("a", "an", "the", "of", "and", "in", "on", "with", "photo", "cat", "dog",
             "red", "blue", "green", "sky", "tree", "house", "painting", "portrait")

# Keys transformers 5 writes into tokenizer_config.json that carry no information
# for a local folder. An empty v5-style list ``extra_special_tokens`` is dropped as
# well: transformers 4.x expects a dict there and fails on a list.
_DROP_CONFIG_KEYS = ("is_local", "local_files_only")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (256 entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _tidy_tokenizer_config(folder: Path) -> None:
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in _DROP_CONFIG_KEYS:
        cfg.pop(key, None)
    if cfg.get("extra_special_tokens") in ([], {}):
        cfg.pop("extra_special_tokens")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def clip_vocab() -> dict[str, int]:
    """256 byte characters, the same with ``</w>``, then BOS and EOS (514 entries)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def save_clip_tokenizer(path: str | Path) -> int:
    """Write a byte-level CLIP tokenizer (no merges) into ``path``; return its vocab size.

    The folder holds ``vocab.json`` + ``merges.txt`` (what a slow/transformers-4
    ``CLIPTokenizer`` reads) and ``tokenizer.json`` + ``tokenizer_config.json``
    (what transformers 5 writes and prefers). BOS is id 512, EOS = PAD = UNK is id 513.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
                                     encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # A tokenizer.json left from an earlier save would take precedence over vocab.json.
    (path / "tokenizer.json").unlink(missing_ok=True)

    tok = CLIPTokenizer.from_pretrained(path, model_max_length=CLIP_MAX_LENGTH)
    tok.save_pretrained(path)
    _tidy_tokenizer_config(path)

    size = len(tok)
    if size != len(vocab) or tok.bos_token_id != vocab[CLIP_BOS] or tok.eos_token_id != vocab[CLIP_EOS]:
        raise RuntimeError(f"tiny CLIP tokenizer came out wrong: len={size}, bos={tok.bos_token_id}, "
                           f"eos={tok.eos_token_id}")
    logger.debug("wrote tiny CLIP tokenizer (vocab %d) to %s", size, path)
    return size


def t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces with log-prob scores: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then the rest.

    Whole words score higher than the characters spelling them, so Unigram picks
    them when present; any other known character is always reachable on its own.
    """
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (METASPACE, -4.0)]
    pieces += [(METASPACE + w, -2.0) for w in _T5_WORDS if len(w) > 1]
    for ch in _T5_CHARS:
        pieces.append((METASPACE + ch, -3.5))
        pieces.append((ch, -3.0))
    names = [p for p, _ in pieces]
    assert len(names) == len(set(names)), "duplicate T5 pieces"
    return pieces


def build_t5_backend() -> Tokenizer:
    """The raw ``tokenizers`` Unigram tokenizer, configured like T5's."""
    tok = Tokenizer(models.Unigram(t5_pieces(), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    tok.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])
    return tok


def save_t5_tokenizer(path: str | Path) -> int:
    """Write a Unigram ``T5TokenizerFast`` into ``path``; return its vocab size.

    transformers 5 rebuilds T5 tokenizers from ``tokenizer.json`` as a Unigram
    model (a WordLevel/BPE ``tokenizer.json`` does not load). No ``<extra_id_*>``
    sentinels are added (``extra_ids=0``), so the vocab size is just the pieces.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = build_t5_backend()
    backend.save(str(path / "tokenizer.json"))

    tok = T5TokenizerFast(tokenizer_file=str(path / "tokenizer.json"), extra_ids=0,
                          model_max_length=T5_MAX_LENGTH)
    tok.save_pretrained(path)
    _tidy_tokenizer_config(path)

    size = len(tok)
    expected = backend.get_vocab_size()
    if size != expected or (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) != (0, 1, 2):
        raise RuntimeError(f"tiny T5 tokenizer came out wrong: len={size} (expected {expected}), "
                           f"pad/eos/unk={tok.pad_token_id}/{tok.eos_token_id}/{tok.unk_token_id}")
    logger.debug("wrote tiny T5 tokenizer (vocab %d) to %s", size, path)
    return size
