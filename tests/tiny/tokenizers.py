"""The offline tokenizer builders (``ditserve/bench/tokenizers.py``), shared with the benchmarks and the
demo model's training.

Re-exported here so the tiny fixtures keep importing ``tiny.tokenizers``; the code lives in one place.
"""

from ditserve.bench.tokenizers import (CLIP_BOS, CLIP_EOS, CLIP_MAX_LENGTH, DEFAULT_T5_WORDS,  # noqa: F401
                                      METASPACE, T5_EOS, T5_MAX_LENGTH, T5_PAD, T5_UNK, build_t5_backend, bytes_to_unicode,
                                      clip_vocab, learn_clip_merges, save_clip_tokenizer, save_t5_tokenizer,
                                      t5_pieces)
