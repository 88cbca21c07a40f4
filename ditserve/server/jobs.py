"""Durable video jobs (OpenAI's `/v1/videos`): one SQLite file in WAL mode, outputs as files beside it.

A job row holds what the API reports (status, progress, timestamps, error) and what is needed to run
it again (the request's fields as JSON, the input image's bytes as a file), so jobs outlive client
connections and server restarts. At start-up, jobs a previous server left queued or in progress are
put back in the queue (status `queued`, progress 0): they run again from the start. Content files
are written to a temporary name and renamed, so a crash never leaves half a video under a job's name.
The files stay within `max_bytes` (`--data-max-bytes`): when a job's content is stored, the oldest
finished jobs are deleted first, as expired ones are.
No client-chosen name reaches the file system: ids are `video_<32 hex>` and checked before any lookup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ditserve.api import EngineError

log = logging.getLogger(__name__)

ID = re.compile(r"video_[0-9a-f]{32}")
STATUSES = ("queued", "in_progress", "completed", "failed")
VARIANTS = {"video": "mp4", "thumbnail": "webp", "spritesheet": "jpg"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    expires_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    seed INTEGER,
    request TEXT NOT NULL,
    error TEXT,
    timings TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id);
"""


@dataclass
class Job:
    """One row: the API fields, the request to run (JSON-able fields), and its input image file."""

    id: str
    created_at: int
    expires_at: int
    model: str
    size: str
    seconds: str
    request: dict
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    seed: int | None = None
    error: dict | None = None
    timings: dict | None = field(default=None)


def new_id() -> str:
    return f"video_{secrets.token_hex(16)}"


class JobStore:
    """Jobs in `root/jobs.sqlite3`, content in `root/<id>.<ext>`; thread-safe (one connection, a lock)."""

    def __init__(self, root: str | Path, ttl_s: float, clock: Callable[[], float] = time.time,
                 max_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ttl_s, self.clock, self.max_bytes = ttl_s, clock, max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- rows -----------------------------------------------------------------------------------

    def create(self, model: str, size: str, seconds: str, request: dict, image: bytes | None = None) -> Job:
        now = int(self.clock())
        job = Job(new_id(), now, now + int(self.ttl_s), model, size, seconds, request, seed=request.get("seed"))
        if image is not None:
            self._write(self.input_path(job.id), image)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, created_at, expires_at, status, progress, model, size, seconds, seed, request)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.created_at, job.expires_at, job.status, 0, model, size, seconds, job.seed,
                 json.dumps(request)))
        return job

    def get(self, job_id: str) -> Job | None:
        if not ID.fullmatch(job_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ? AND expires_at > ?",
                                   (job_id, int(self.clock()))).fetchone()
        return None if row is None else _job(row, self._columns())

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[Job], bool]:
        """Jobs by creation time (`order` asc|desc), starting after job `after`; and whether more follow."""
        cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        now, args = int(self.clock()), []
        where = "expires_at > ?"
        args.append(now)
        if after is not None:
            anchor = self.get(after)
            if anchor is None:
                raise KeyError(after)
            where += f" AND (created_at, id) {cmp} (?, ?)"
            args += [anchor.created_at, anchor.id]
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY created_at {direction}, "
                                    f"id {direction} LIMIT ?", (*args, limit + 1)).fetchall()
            columns = self._columns()
        return [_job(r, columns) for r in rows[:limit]], len(rows) > limit

    def update(self, job_id: str, **fields) -> None:
        """Set columns of a job (dicts are stored as JSON)."""
        values = [json.dumps(v) if isinstance(v, dict) else v for v in fields.values()]
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))

    def delete(self, job_id: str) -> bool:
        with self._lock:
            gone = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
        for path in self._files(job_id):
            path.unlink(missing_ok=True)
        return gone

    def recover(self) -> list[Job]:
        """Jobs an earlier server left queued or in progress, put back in the queue (oldest first)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'queued', progress = 0 WHERE status = 'in_progress'")
            rows = self._db.execute("SELECT * FROM jobs WHERE status = 'queued' AND expires_at > ? "
                                    "ORDER BY created_at, rowid", (int(self.clock()),)).fetchall()
            columns = self._columns()
        return [_job(r, columns) for r in rows]

    def sweep(self) -> int:
        """Delete expired jobs and their files; returns how many."""
        with self._lock:
            expired = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE expires_at <= ?",
                                                      (int(self.clock()),)).fetchall()]
        for job_id in expired:
            self.delete(job_id)
        return len(expired)

    def make_room(self, job_id: str) -> list[str]:
        """Delete the oldest finished jobs (not `job_id`) until all files fit `max_bytes`; returns their
        ids. JobTooLarge when `job_id`'s own files exceed it (they are left for the caller to drop)."""
        if self.max_bytes is None:
            return []
        own = sum(_size(p) for p in self._files(job_id))
        if own > self.max_bytes:
            raise JobTooLarge(f"the video's files are {own} bytes, more than the server keeps for all jobs "
                              f"({self.max_bytes} bytes, --data-max-bytes)")
        used = sum(_size(p) for p in self.root.iterdir() if _JOB_FILE.fullmatch(p.name))
        with self._lock:
            finished = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('completed', 'failed') AND id != ? "
                "ORDER BY created_at, rowid", (job_id,)).fetchall()]
        evicted = []
        for old in finished:
            if used <= self.max_bytes:
                break
            used -= sum(_size(p) for p in self._files(old))
            self.delete(old)
            evicted.append(old)
        if evicted:
            log.info("deleted %d oldest finished video job(s) to stay within %d bytes", len(evicted), self.max_bytes)
        return evicted

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | dict(rows)

    # -- files ----------------------------------------------------------------------------------

    def input_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.input"

    def content_path(self, job_id: str, variant: str) -> Path:
        return self.root / f"{job_id}.{VARIANTS[variant]}"

    def put_content(self, job_id: str, variant: str, data: bytes) -> None:
        self._write(self.content_path(job_id, variant), data)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _files(self, job_id: str) -> list[Path]:
        return [self.input_path(job_id), *(self.content_path(job_id, v) for v in VARIANTS)]

    def _columns(self) -> list[str]:
        return [d[1] for d in self._db.execute("PRAGMA table_info(jobs)").fetchall()]


class JobTooLarge(EngineError):
    """One job's files exceed the store's whole byte budget."""


_JOB_FILE = re.compile(r"video_[0-9a-f]{32}\.(input|" + "|".join(VARIANTS.values()) + ")")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _job(row: tuple, columns: list[str]) -> Job:
    values = dict(zip(columns, row))
    for name in ("request", "error", "timings"):
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Job(**values)
