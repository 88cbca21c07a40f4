"""The offline tokenizer builders, shared with the demo model's training (``training/tokenizers.py``).

Re-exported here so the tiny fixtures keep importing ``tiny.tokenizers``; the code lives in one place.
"""

from training.tokenizers import (CLIP_BOS, CLIP_EOS, CLIP_MAX_LENGTH, DEFAULT_T5_WORDS, METASPACE,  # noqa: F401
                                 T5_EOS, T5_MAX_LENGTH, T5_PAD, T5_UNK, build_t5_backend, bytes_to_unicode,
                                 clip_vocab, learn_clip_merges, save_clip_tokenizer, save_t5_tokenizer,
                                 t5_pieces)
