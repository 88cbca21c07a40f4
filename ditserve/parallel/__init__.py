"""Parallel inference of one request across ranks: CFG branches, sequence shards (Ulysses, Ring,
USP), tensor-parallel DiT weights, and video decoding split by tiles.

Every technique attaches from outside, reading the model's plan (models/common/plan.py):
- `loading(groups)`: while a pipeline loads, DiTs (parallel/tensor.py) and T5 / UMT5 text encoders
  (parallel/text_tp.py) are built tensor-parallel and each rank reads only its shard of the safetensors;
- `parallelize_pipeline(pipeline, groups)`: each DiT sharded over the sequence (parallel/sequence.py),
  the guidance split over the CFG ranks (parallel/cfg.py), video decoding split over the replica
  (parallel/vae.py).
The ranks themselves are started and driven by runtime/executor.py.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ditserve.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)


def loading(groups: ParallelGroups):
    """A context in which `load_pipeline` builds this rank's tensor-parallel shard of every DiT and
    of the T5 / UMT5 text encoder (parallel/text_tp.py)."""
    if groups.tp.size == 1:
        return contextlib.nullcontext()
    return _tensor_parallel_loading(groups.tp)


@contextlib.contextmanager
def _tensor_parallel_loading(axis):
    from ditserve.parallel.tensor import tensor_parallel_loading
    from ditserve.parallel.text_tp import text_encoder_tp_loading

    with tensor_parallel_loading(axis), text_encoder_tp_loading(axis):
        yield


def parallelize_pipeline(pipeline, groups: ParallelGroups, vae_parallel: bool = False):
    """Apply sequence and CFG parallelism (and, for video, the parallel decode) to a loaded pipeline."""
    from ditserve.parallel.cfg import apply_cfg_parallel
    from ditserve.parallel.sequence import apply_sequence_parallel

    for name in pipeline.dit_names:
        dit = getattr(pipeline, name, None)
        if dit is not None:
            setattr(pipeline, name, apply_sequence_parallel(dit, groups))
    apply_cfg_parallel(pipeline, groups.cfg)
    if vae_parallel and groups.world > 1:
        from ditserve.parallel.vae import apply_parallel_decode

        apply_parallel_decode(pipeline, groups)
    return pipeline
