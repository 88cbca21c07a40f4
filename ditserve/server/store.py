"""Server-made outputs and asynchronous jobs, by server-generated id, with a time to live.

No client-chosen name ever reaches the file system: an id is `<kind>_<32 hex>` drawn from
`secrets`, files are named after it inside a folder the server owns, and lookups go through the
in-memory index, so an unknown, malformed or expired id is simply not found.

`OutputStore` backs `response_format=url` for images. `JobStore` is the record an asynchronous
job keeps while it runs (OpenAI's `/v1/videos`: create → poll status and progress → fetch the
content); a video job holds a scheduler Ticket and, when done, the ids of its stored outputs.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_ID = re.compile(r"(img|vid|job)_[0-9a-f]{32}")
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4"}


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class StoredOutput:
    id: str
    path: Path
    media_type: str
    expires_at: float


class OutputStore:
    """Files in a server-owned folder (a fresh temp folder unless `root` is given), expiring after `ttl_s`."""

    def __init__(self, ttl_s: float, root: str | Path | None = None, clock: Callable[[], float] = time.time):
        self.ttl_s, self.clock = ttl_s, clock
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="ditserve-outputs-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, StoredOutput] = {}

    def put(self, data: bytes, media_type: str, kind: str = "img") -> StoredOutput:
        output_id = new_id(kind)
        path = self.root / f"{output_id}{_EXTENSIONS[media_type]}"
        path.write_bytes(data)
        stored = StoredOutput(output_id, path, media_type, self.clock() + self.ttl_s)
        self._index[output_id] = stored
        return stored

    def get(self, output_id: str) -> StoredOutput | None:
        """The output, or None if the id is malformed, unknown or expired."""
        if not _ID.fullmatch(output_id):
            return None
        stored = self._index.get(output_id)
        if stored is not None and stored.expires_at <= self.clock():
            self._delete(output_id)
            return None
        return stored

    def sweep(self) -> int:
        """Delete every expired output; returns how many."""
        now = self.clock()
        expired = [i for i, s in self._index.items() if s.expires_at <= now]
        for output_id in expired:
            self._delete(output_id)
        return len(expired)

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        """Delete everything this store wrote (and its folder, when it made it)."""
        for output_id in list(self._index):
            self._delete(output_id)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _delete(self, output_id: str) -> None:
        stored = self._index.pop(output_id)
        stored.path.unlink(missing_ok=True)


@dataclass
class Job:
    """An asynchronous job as OpenAI's video API reports it."""

    id: str
    created_at: float
    expires_at: float
    status: str = "queued"  # queued | in_progress | completed | failed | cancelled
    progress: int = 0  # percent
    error: dict | None = None
    output_ids: list[str] = field(default_factory=list)


class JobStore:
    """Jobs by id, forgotten `ttl_s` after creation (their outputs expire in the OutputStore)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time):
        self.ttl_s, self.clock = ttl_s, clock
        self._jobs: dict[str, Job] = {}

    def create(self) -> Job:
        now = self.clock()
        job = Job(new_id("job"), now, now + self.ttl_s)
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id) if _ID.fullmatch(job_id) else None
        if job is not None and job.expires_at <= self.clock():
            del self._jobs[job_id]
            return None
        return job

    def sweep(self) -> int:
        now = self.clock()
        expired = [i for i, j in self._jobs.items() if j.expires_at <= now]
        for job_id in expired:
            del self._jobs[job_id]
        return len(expired)
