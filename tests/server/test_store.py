"""Output and job stores: server-made ids only, expiry by time to live, cleanup."""

from __future__ import annotations

from ditserve.server.store import JobStore, OutputStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_outputs_expire_and_are_deleted(tmp_path):
    clock = Clock()
    store = OutputStore(ttl_s=60, root=tmp_path / "out", clock=clock)
    a = store.put(b"png-bytes", "image/png")
    b = store.put(b"jpeg-bytes", "image/jpeg")
    assert a.id != b.id and a.id.startswith("img_") and a.path.parent == tmp_path / "out"
    assert store.get(a.id).path.read_bytes() == b"png-bytes"
    clock.now += 59
    assert store.sweep() == 0 and len(store) == 2
    clock.now += 1
    assert store.get(a.id) is None and not a.path.exists()  # expired on lookup
    assert store.sweep() == 1 and not b.path.exists() and len(store) == 0


def test_only_server_ids_resolve(tmp_path):
    store = OutputStore(ttl_s=60, root=tmp_path)
    (tmp_path / "secret.png").write_bytes(b"x")
    stored = store.put(b"x", "image/webp")
    for name in ("secret", "secret.png", "../secret.png", stored.id + ".webp", stored.id.upper(),
                 stored.path.name, "img_" + "0" * 32):
        assert store.get(name) is None
    assert store.get(stored.id) is not None


def test_close_removes_what_the_store_made(tmp_path):
    owned = OutputStore(ttl_s=60)
    owned.put(b"x", "image/png")
    owned.close()
    assert not owned.root.exists()
    given = OutputStore(ttl_s=60, root=tmp_path)
    (tmp_path / "keep.txt").write_text("the operator's")
    given.put(b"x", "image/png")
    given.close()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_jobs_track_status_and_expire():
    clock = Clock()
    jobs = JobStore(ttl_s=10, clock=clock)
    job = jobs.create()
    assert job.id.startswith("job_") and job.status == "queued" and jobs.get(job.id) is job
    job.status, job.progress = "in_progress", 40
    assert jobs.get(job.id).progress == 40 and jobs.get("job_nope") is None
    clock.now += 10
    assert jobs.get(job.id) is None and jobs.sweep() == 0
