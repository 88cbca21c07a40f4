"""Output and job stores: server-made ids only, expiry by time to live, cleanup."""

from __future__ import annotations

import stat

import pytest

from ditserve.server.store import OutputStore, OutputTooLarge


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


def test_quota_evicts_oldest_first(tmp_path):
    store = OutputStore(ttl_s=60, root=tmp_path / "out", max_bytes=10)
    a, b, c = (store.put(bytes(4), "image/png") for _ in range(3))  # 12 bytes: a had to go
    assert store.get(a.id) is None and not a.path.exists()
    assert store.get(b.id) and store.get(c.id) and store.bytes == 8
    d = store.put(bytes(10), "image/png")  # takes the whole quota
    assert [store.get(x.id) for x in (b, c)] == [None, None] and store.get(d.id) and store.bytes == 10
    with pytest.raises(OutputTooLarge, match="b64_json"):
        store.put(bytes(11), "image/png")
    assert store.get(d.id) is not None  # a refused output evicts nothing
    assert sum(p.stat().st_size for p in store.root.iterdir()) == 10


def test_folder_and_files_are_private(tmp_path):
    store = OutputStore(ttl_s=60, root=tmp_path / "new" / "out")
    stored = store.put(b"x", "image/png")
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o600
    owned = OutputStore(ttl_s=60)
    assert stat.S_IMODE(owned.root.stat().st_mode) == 0o700
    owned.close()


def test_an_earlier_servers_outputs_are_removed(tmp_path):
    (tmp_path / ("img_" + "a" * 32 + ".png")).write_bytes(b"old")
    (tmp_path / ("vid_" + "b" * 32 + ".mp4")).write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the operator's")
    (tmp_path / ("img_" + "c" * 31 + ".png")).write_bytes(b"not ours")
    OutputStore(ttl_s=60, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_" + "c" * 31 + ".png", "notes.txt"]
