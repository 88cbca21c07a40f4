"""Server-made outputs, by server-generated id, with a time to live.

No client-chosen name ever reaches the file system: an id is `<kind>_<32 hex>` drawn from
`secrets`, files are named after it inside a folder the server owns, and lookups go through the
in-memory index, so an unknown, malformed or expired id is simply not found.

`OutputStore` backs `response_format=url` for images: its folder is 0700 and its files 0600 (only the
server's user reads them), and it holds at most `max_bytes`, evicting the oldest outputs first.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ditserve.api import EngineError

log = logging.getLogger(__name__)

_ID = re.compile(r"(img|vid|job)_[0-9a-f]{32}")
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4"}
_FILE = re.compile(r"(img|vid)_[0-9a-f]{32}\.(png|jpg|webp|mp4)")


class OutputTooLarge(EngineError):
    """One output is larger than the store's whole quota."""


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class StoredOutput:
    id: str
    path: Path
    media_type: str
    expires_at: float
    size: int = 0


class OutputStore:
    """Files in a server-owned folder (a fresh temp folder unless `root` is given), expiring after
    `ttl_s`, at most `max_bytes` in all (oldest evicted first)."""

    def __init__(self, ttl_s: float, root: str | Path | None = None, clock: Callable[[], float] = time.time,
                 max_bytes: int | None = None):
        self.ttl_s, self.clock, self.max_bytes = ttl_s, clock, max_bytes
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="ditserve-outputs-")) if root is None else Path(root)
        if not self.root.exists():
            self.root.mkdir(parents=True)
            self.root.chmod(0o700)  # not mkdir's mode: the umask would narrow it, never widen
        elif self.root.stat().st_mode & 0o077:
            log.warning("output folder %s is readable by other users; outputs are 0600 but their "
                        "names are listed", self.root)
        self._index: dict[str, StoredOutput] = {}  # insertion order is age order
        self.bytes = 0
        self._remove_leftovers()

    def put(self, data: bytes, media_type: str, kind: str = "img") -> StoredOutput:
        """Store `data`, evicting the oldest outputs to stay within `max_bytes`; OutputTooLarge when it
        alone exceeds it."""
        if self.max_bytes is not None:
            if len(data) > self.max_bytes:
                raise OutputTooLarge(f"an output of {len(data)} bytes exceeds the output store's limit of "
                                     f"{self.max_bytes} bytes (--output-max-bytes); ask for b64_json")
            while self.bytes + len(data) > self.max_bytes:
                self._delete(next(iter(self._index)))
        output_id = new_id(kind)
        path = self.root / f"{output_id}{_EXTENSIONS[media_type]}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        stored = StoredOutput(output_id, path, media_type, self.clock() + self.ttl_s, len(data))
        self._index[output_id] = stored
        self.bytes += len(data)
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
        self.bytes -= stored.size
        stored.path.unlink(missing_ok=True)

    def _remove_leftovers(self) -> None:
        """Outputs an earlier server left in a given folder: no index names them, so none can be
        fetched, but they would fill the disk."""
        if self._owns_root:
            return
        stale = [p for p in self.root.iterdir() if _FILE.fullmatch(p.name) and p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("removed %d outputs an earlier server left in %s", len(stale), self.root)
