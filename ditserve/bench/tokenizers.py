"""Locally built tokenizers for random-weight benchmarks, the tiny test checkpoints and the demo model.

Nothing here touches the network. Both tokenizers are deliberately small but
cover arbitrary text, so different prompts give different token ids:

* :func:`save_clip_tokenizer` writes a byte-level BPE ``CLIPTokenizer``. With no
  ``words`` it has no merges: every byte of the (lower-cased) prompt becomes one
  token. Given ``words``, it learns BPE merges over them so that each becomes a
  single token, and everything else still falls back to bytes.
* :func:`save_t5_tokenizer` writes a Unigram ``T5TokenizerFast`` whose pieces are
  single characters (bare and with the ``▁`` word prefix) plus whole words (a few
  short ones by default, or the given ``words``).

Each function writes a folder that ``<Class>.from_pretrained(folder)`` loads,
and returns the vocabulary size to give the matching text encoder.

``tests/tiny/tokenizers.py`` re-exports this module; ``training/`` imports it.
"""

from __future__ import annotations

import json
import logging
import string
from collections import Counter
from collections.abc import Iterable
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
DEFAULT_T5_WORDS = ("a", "an", "the", "of", "and", "in", "on", "with", "photo", "cat", "dog",
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


def learn_clip_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) that turn each lower-case ASCII word into one ``word</w>`` token.

    Plain BPE training: repeatedly merge the most frequent adjacent pair (ties broken
    by the pair itself, so the result is deterministic). Applying merges by rank
    reproduces the segmentation found here, so every given word becomes one token.
    """
    seqs = {}
    for word in sorted(set(words)):
        if not word or not (word.isascii() and word.isalpha() and word.islower()):
            raise ValueError(f"CLIP merge words must be lower-case ASCII letters, got {word!r}")
        seqs[word] = list(word[:-1]) + [word[-1] + "</w>"]
    return learn_merges(seqs)


def learn_merges(seqs: dict[str, list[str]]) -> list[tuple[str, str]]:
    """BPE training over pre-split words (`word -> its symbols`): merge the most frequent adjacent
    pair, ties broken by the pair, until every word is one symbol; the merges in rank order."""
    seqs = dict(seqs)
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for seq in seqs.values() for pair in zip(seq, seq[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, seq in seqs.items():
            seqs[word] = _merge_pair(seq, best)


def _merge_pair(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def clip_vocab(merges: Iterable[tuple[str, str]] = ()) -> dict[str, int]:
    """256 byte characters, the same with ``</w>``, BOS and EOS (514 entries), then merged tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def save_clip_tokenizer(path: str | Path, words: Iterable[str] = ()) -> int:
    """Write a byte-level CLIP tokenizer into ``path``; return its vocab size.

    The folder holds ``vocab.json`` + ``merges.txt`` (what a slow/transformers-4
    ``CLIPTokenizer`` reads) and ``tokenizer.json`` + ``tokenizer_config.json``
    (what transformers 5 writes and prefers). BOS is id 512, EOS = PAD = UNK is id 513.
    ``words`` (lower-case ASCII) get BPE merges so each is one token (ids from 514 on).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    merges = learn_clip_merges(words)
    vocab = clip_vocab(merges)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
                                     encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (path / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
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


def t5_pieces(words: Iterable[str] = DEFAULT_T5_WORDS) -> list[tuple[str, float]]:
    """Unigram pieces with log-prob scores: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then the rest.

    Whole words score higher than the characters spelling them, so Unigram picks
    them when present; any other known character is always reachable on its own.
    """
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (METASPACE, -4.0)]
    pieces += [(METASPACE + w, -2.0) for w in dict.fromkeys(words) if len(w) > 1]
    for ch in _T5_CHARS:
        pieces.append((METASPACE + ch, -3.5))
        pieces.append((ch, -3.0))
    names = [p for p, _ in pieces]
    assert len(names) == len(set(names)), "duplicate T5 pieces"
    return pieces


def build_t5_backend(words: Iterable[str] = DEFAULT_T5_WORDS) -> Tokenizer:
    """The raw ``tokenizers`` Unigram tokenizer, configured like T5's."""
    tok = Tokenizer(models.Unigram(t5_pieces(words), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    tok.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])
    return tok


def save_t5_tokenizer(path: str | Path, words: Iterable[str] = DEFAULT_T5_WORDS) -> int:
    """Write a Unigram ``T5TokenizerFast`` into ``path``; return its vocab size.

    transformers 5 rebuilds T5 tokenizers from ``tokenizer.json`` as a Unigram
    model (a WordLevel/BPE ``tokenizer.json`` does not load). No ``<extra_id_*>``
    sentinels are added (``extra_ids=0``), so the vocab size is just the pieces.
    ``words`` become whole-word pieces (``▁word``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = build_t5_backend(words)
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
