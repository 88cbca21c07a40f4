"""The durable video-job store: SQLite rows and content files that survive a restart."""

import stat

import pytest

from ditserve.server.jobs import JobStore


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def make(tmp_path, clock=None, ttl=100):
    return JobStore(tmp_path / "data", ttl_s=ttl, clock=clock or Clock())


def test_create_get_update_and_reopen(tmp_path):
    clock = Clock()
    store = make(tmp_path, clock)
    job = store.create("wan", "832x480", "4", {"prompt": "a cat", "seed": 7}, image=b"png-bytes")
    assert job.id.startswith("video_") and job.status == "queued" and job.seed == 7
    store.update(job.id, status="completed", progress=100, completed_at=int(clock.now), timings={"total_s": 1.5})
    store.put_content(job.id, "video", b"mp4-bytes")
    store.close()

    again = make(tmp_path, clock)  # a new server on the same folder
    got = again.get(job.id)
    assert (got.status, got.progress, got.request, got.timings) == ("completed", 100, {"prompt": "a cat", "seed": 7},
                                                                    {"total_s": 1.5})
    assert again.content_path(job.id, "video").read_bytes() == b"mp4-bytes"
    assert again.input_path(job.id).read_bytes() == b"png-bytes"
    mode = stat.S_IMODE(again.content_path(job.id, "video").stat().st_mode)
    assert mode == 0o600 and not [p for p in again.root.iterdir() if p.name.endswith(".tmp")]
    assert stat.S_IMODE(again.root.stat().st_mode) == 0o700
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_data_dir_defaults_to_the_per_user_cache(tmp_path, monkeypatch):
    from ditserve.config.server import ServerConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ServerConfig().jobs_dir() == str(tmp_path / "cache" / "ditserve" / "jobs")
    assert ServerConfig(data_dir=str(tmp_path / "d")).jobs_dir() == str(tmp_path / "d")


def test_unknown_and_malformed_ids_are_not_found(tmp_path):
    store = make(tmp_path)
    for bad in ("video_" + "0" * 32, "../jobs.sqlite3", "video_XYZ", ""):
        assert store.get(bad) is None


def test_list_pages_in_both_orders(tmp_path):
    clock = Clock()
    store = make(tmp_path, clock)
    ids = []
    for i in range(5):
        clock.now += 1
        ids.append(store.create("m", "64x64", "1", {"i": i}).id)
    page, more = store.list(None, 2, "desc")
    assert [j.id for j in page] == ids[::-1][:2] and more
    page, more = store.list(page[-1].id, 2, "desc")
    assert [j.id for j in page] == ids[::-1][2:4] and more
    page, more = store.list(page[-1].id, 2, "desc")
    assert [j.id for j in page] == [ids[0]] and not more
    page, more = store.list(ids[1], 10, "asc")
    assert [j.id for j in page] == ids[2:] and not more
    with pytest.raises(KeyError):
        store.list("video_" + "f" * 32, 2, "asc")


def test_restart_requeues_unfinished_jobs(tmp_path):
    clock = Clock()
    store = make(tmp_path, clock)
    queued, running, done = (store.create("m", "64x64", "1", {"n": i}) for i in range(3))
    store.update(running.id, status="in_progress", progress=40)
    store.update(done.id, status="completed", progress=100)
    store.close()
    again = make(tmp_path, clock)
    assert [j.id for j in again.recover()] == [queued.id, running.id]
    assert again.get(running.id).progress == 0 and again.get(done.id).status == "completed"
    assert again.counts() == {"queued": 2, "in_progress": 0, "completed": 1, "failed": 0}


def test_expired_jobs_and_files_are_swept(tmp_path):
    clock = Clock()
    store = make(tmp_path, clock, ttl=10)
    job = store.create("m", "64x64", "1", {}, image=b"x")
    store.put_content(job.id, "video", b"v")
    clock.now += 10
    assert store.get(job.id) is None  # expired: not served even before the sweep
    assert store.sweep() == 1
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith("jobs.sqlite3")) == []


def test_delete_removes_row_and_files(tmp_path):
    store = make(tmp_path)
    job = store.create("m", "64x64", "1", {})
    store.put_content(job.id, "thumbnail", b"t")
    assert store.delete(job.id) and store.get(job.id) is None
    assert not store.content_path(job.id, "thumbnail").exists() and not store.delete(job.id)


def test_byte_cap_deletes_the_oldest_finished_jobs(tmp_path):
    """--data-max-bytes: storing a job's content deletes the oldest finished jobs (files and rows) until
    everything fits; queued and running jobs keep their inputs; one job alone past the cap is refused."""
    from ditserve.server.jobs import JobTooLarge

    clock = Clock()
    store = JobStore(tmp_path / "data", ttl_s=100, clock=clock, max_bytes=300)
    ids = []
    for status in ("completed", "failed", "queued", "completed"):
        clock.now += 1
        job = store.create("m", "64x64", "1", {}, image=b"i" * 20)
        store.put_content(job.id, "video", b"v" * 80)
        store.update(job.id, status=status)
        ids.append(job.id)
    assert store.make_room(ids[-1]) == [ids[0]]  # 400 bytes: the oldest finished job goes
    assert store.get(ids[0]) is None and not store.content_path(ids[0], "video").exists()
    current = store.create("m", "64x64", "1", {})
    store.put_content(current.id, "video", b"v" * 150)  # 450 bytes: the failed one goes, never the queued one
    assert store.make_room(current.id) == [ids[1], ids[3]]
    assert store.get(ids[2]).status == "queued" and store.input_path(ids[2]).exists()
    huge = store.create("m", "64x64", "1", {})
    store.put_content(huge.id, "video", b"v" * 301)
    with pytest.raises(JobTooLarge, match="--data-max-bytes"):
        store.make_room(huge.id)
    assert store.get(current.id) is not None  # nothing was deleted for it
