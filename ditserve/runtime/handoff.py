"""Videos from rank 0 to the executor through shared memory instead of the socket.

A 832x480x81 video is 97 MB of uint8; pickled through the executor's socket it costs about half a
second per request (measured on the H200 host: benchmarks/results/parallel_overhead_h200.json). When
rank 0 runs on the executor's machine (ranks the executor started), rank 0 copies each video into a
POSIX shared-memory block and sends its name; the executor maps the block, unlinks its name at once
and returns an array over the mapping (no second copy: the pages go back when the array is freed).
Where shared memory is not a /dev/shm file, it copies the array out instead.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

from ditserve.api import GenerationOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharedArray:
    """An array waiting in the shared-memory block `name`."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def share_videos(outputs: list[GenerationOutput]) -> list[GenerationOutput]:
    """`outputs` with every video moved into a shared-memory block (the receiver unlinks it)."""
    return [replace(out, videos=[_share(np.ascontiguousarray(v)) for v in out.videos]) if out.videos else out
            for out in outputs]


def _share(array: np.ndarray) -> SharedArray:
    block = shared_memory.SharedMemory(create=True, size=max(array.nbytes, 1))
    np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
    # the receiver owns the block now: this process must not unlink it when it exits
    resource_tracker.unregister(block._name, "shared_memory")  # noqa: SLF001 - no public switch before 3.13
    block.close()
    return SharedArray(block.name, array.shape, array.dtype.str)


def collect_videos(outputs: list[GenerationOutput]) -> list[GenerationOutput]:
    """The arrays back from their blocks (each block unlinked once read)."""
    return [replace(out, videos=[_collect(v) if isinstance(v, SharedArray) else v for v in out.videos])
            for out in outputs]


def _collect(ref: SharedArray) -> np.ndarray:
    path = Path("/dev/shm") / ref.name.lstrip("/")
    if path.is_file():  # Linux: map the block itself
        with open(path, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), 0)
        os.unlink(path)  # the name goes now; the pages stay until the array (holding `mapping`) is freed
        return np.frombuffer(mapping, np.dtype(ref.dtype), count=math.prod(ref.shape)).reshape(ref.shape)
    block = shared_memory.SharedMemory(name=ref.name)
    try:
        return np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=block.buf).copy()
    finally:
        block.close()
        block.unlink()


def discard_videos(outputs: list[GenerationOutput]) -> None:
    """Unlink the blocks of outputs that could not be sent."""
    for out in outputs:
        for v in out.videos:
            if isinstance(v, SharedArray):
                try:
                    block = shared_memory.SharedMemory(name=v.name)
                    block.close()
                    block.unlink()
                except FileNotFoundError:
                    pass
