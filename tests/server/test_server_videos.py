"""`/v1/videos` on a tiny Wan checkpoint, driven by the official `openai` client: durable jobs with
progress, pagination, content, cancellation by DELETE, restart, bad input."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from live_server import API_KEY, assert_envelope, start
from openai import OpenAI
from PIL import Image

from ditserve.runtime.video_io import read_video

FLAGS = ("--max-queue", "8", "--max-steps", "2000", "--max-client-requests", "8", "--max-upload-bytes", "1000000")
FIELDS = {"id", "object", "model", "status", "progress", "created_at", "completed_at", "expires_at", "size",
          "seconds", "prompt", "error", "remixed_from_video_id", "seed", "timings"}
SMALL = {"size": "48x32", "num_inference_steps": "2", "num_frames": "5", "seed": "3"}


@pytest.fixture(scope="module")
def video_server(tiny_wan, tmp_path_factory):
    data = tmp_path_factory.mktemp("video_data")
    live = start(tiny_wan("t2v"), data / "server.log", *FLAGS, "--data-dir", str(data / "jobs"), api_key=API_KEY)
    live.data = data
    yield live
    live.stop()


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_create_and_poll_then_download(video_server, tiny_wan):
    c = client(video_server)
    video = c.videos.create_and_poll(prompt="a cat walks", seconds="1", poll_interval_ms=100,  # extensions as text
                                     extra_body={**SMALL, "fps": "4", "negative_prompt": "blurry",
                                                 "guidance_scale": "4.5", "guidance_scale_2": "3"})
    assert video.status == "completed" and video.progress == 100 and video.object == "video"
    assert video.size == "48x32" and video.seconds == "1" and video.error is None
    raw = video_server.http.get(f"/v1/videos/{video.id}").json()  # OpenAI's Video object, plus seed and timings
    assert set(raw) == FIELDS and raw["remixed_from_video_id"] is None and raw["seed"] == 3
    assert raw["created_at"] <= raw["completed_at"] < raw["expires_at"] and raw["model"] == video.model
    assert raw["timings"]["steps"] and "decode" in raw["timings"]["stages"]
    metrics = video_server.metrics()  # jobs by status, queue depth, job and step durations
    assert metrics["ditserve_video_jobs{status=completed}"] >= 1 and "ditserve_queue_length" in metrics
    assert metrics["ditserve_video_job_seconds_count{status=completed}"] >= 1
    assert metrics["ditserve_step_seconds_count"] >= 1
    data = c.videos.download_content(video.id).read()
    frames, rate = read_video(data)
    assert frames.shape == (5, 32, 48, 3) and rate == 4  # 1 s at 4 fps -> 4k+1 = 5 frames
    thumb = Image.open(io.BytesIO(c.videos.download_content(video.id, variant="thumbnail").read()))
    assert thumb.size == (48, 32)
    sheet = Image.open(io.BytesIO(c.videos.download_content(video.id, variant="spritesheet").read()))
    assert sheet.size == (5 * 48, 32)

    from ditserve import Generator
    from ditserve.api import GenerationRequest

    engine = Generator.from_pretrained(tiny_wan("t2v"), device="cpu", dtype="float32").engine
    same = dict(prompt="a cat walks", seed=3, num_frames=5, fps=4, height=32, width=48, num_inference_steps=2)
    api = engine.generate(GenerationRequest(**same, negative_prompt="blurry", guidance_scale=4.5,
                                            guidance_scale_2=3.0)).videos[0]
    plain = engine.generate(GenerationRequest(**same)).videos[0]  # the extensions left out
    first = np.asarray(thumb.convert("RGB")).astype(int)
    assert np.abs(first - api[0]).mean() < 12  # first frame, WebP-lossy
    error, without = (np.abs(frames.astype(int) - v).mean() for v in (api, plain))  # H.264-lossy
    assert error < 0.75 * without, (error, without)  # the extension fields, sent as text, were applied


def test_progress_moves_and_delete_cancels_within_a_step(video_server):
    c = client(video_server)
    long = c.videos.create(prompt="a long one", extra_body={**SMALL, "num_inference_steps": "900"})
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = c.videos.retrieve(long.id)
        seen.add((job.status, job.progress))
        if len({p for s, p in seen if s == "in_progress"}) >= 2:
            break
        time.sleep(0.1)
    moving = sorted(p for s, p in seen if s == "in_progress")
    assert len(moving) >= 2 and 0 < moving[-1] < 100, seen  # progress moves while it runs
    not_yet = video_server.http.get(f"/v1/videos/{long.id}/content")
    assert assert_envelope(not_yet, 400)["code"] == "video_not_ready"
    steps = video_server.metrics()["ditserve_denoise_steps_total"]
    deleted = c.videos.delete(long.id)
    assert deleted.deleted and deleted.id == long.id
    # the worker stops within a step and takes the next job
    short = c.videos.create_and_poll(prompt="next", poll_interval_ms=100, extra_body=SMALL)
    assert short.status == "completed"
    assert video_server.metrics()["ditserve_denoise_steps_total"] - steps < 60
    with pytest.raises(Exception) as info:
        c.videos.retrieve(long.id)
    assert getattr(info.value, "status_code", None) == 404


def test_json_body_and_a_job_outlives_its_client(video_server):
    """A JSON body (numbers as numbers) works as the form does; `seconds` at `fps` becomes 4k+1 frames;
    the job belongs to no connection: its client goes away and it still completes."""
    with httpx.Client(base_url=video_server.url, headers=video_server.headers, timeout=60) as gone:
        created = gone.post("/v1/videos", json={"prompt": "a cat", "seconds": "1.5", "fps": 2, "size": "48x32",
                                                "num_inference_steps": 2, "seed": 5, "negative_prompt": "blurry",
                                                "guidance_scale": 4.5, "guidance_scale_2": 3.0})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["status"] == "queued" and job["seconds"] == "1.5" and job["seed"] == 5
    deadline = time.monotonic() + 120
    while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = video_server.http.get(f"/v1/videos/{job['id']}").json()
    assert job["status"] == "completed", job
    frames, rate = read_video(video_server.http.get(f"/v1/videos/{job['id']}/content").content)
    assert frames.shape[0] == 5 and rate == 2  # 1.5 s x 2 fps = 3 intervals -> 4 (4k) -> 5 frames
    number = video_server.http.post("/v1/videos", json={"prompt": "a cat", "seconds": 2})  # OpenAI's is a string
    assert assert_envelope(number, 400)["param"] == "seconds"


def wait_until_idle(server) -> None:
    for status in ("queued", "in_progress"):
        server.wait_metric(f"ditserve_video_jobs{{status={status}}}", lambda v: v == 0)


def test_full_queue_and_one_clients_share_are_429(video_server):
    """--max-queue counts video jobs (429 queue_full with Retry-After), and one client address cannot
    take the whole queue (429 client_limit, issue 24.6); a deleted job gives its client's share back."""
    wait_until_idle(video_server)

    def create(address: str, i: int) -> httpx.Response:
        return video_server.http.post("/v1/videos", data={"prompt": f"wait {i}", **SMALL},
                                      headers={"X-Forwarded-For": address})

    worker, created = video_server.worker(), []
    worker.suspend()  # jobs stay queued (one sent to the stopped worker) until it resumes
    try:
        for i in range(8):  # the client's share: --max-client-requests 8
            r = create("10.0.0.1", i)
            assert r.status_code == 200, r.text
            created.append(r.json()["id"])
        video_server.wait_metric("ditserve_running_requests", lambda v: v == 1)
        share = create("10.0.0.1", 8)
        r = create("10.0.0.2", 9)  # 7 queued + this one: the queue (--max-queue 8) is full
        assert r.status_code == 200, r.text
        created.append(r.json()["id"])
        full = create("10.0.0.3", 10)
    finally:
        for video_id in created:
            video_server.http.delete(f"/v1/videos/{video_id}")
        worker.resume()
    video_server.wait_metric("ditserve_running_requests", lambda v: v == 0)
    for response, code in ((share, "client_limit"), (full, "queue_full")):
        assert assert_envelope(response, 429)["code"] == code
        assert int(response.headers["retry-after"]) >= 1
    again = create("10.0.0.1", 11)  # the deleted jobs released the client's share
    assert again.status_code == 200, again.text
    video_server.http.delete(f"/v1/videos/{again.json()['id']}")
    wait_until_idle(video_server)


def test_openapi_declares_the_video_routes(video_server):
    """/openapi.json (and /docs) describe POST /v1/videos' body as JSON or a form with the image, and
    the Video object the routes answer with."""
    schema = video_server.http.get("/openapi.json").json()
    post = schema["paths"]["/v1/videos"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"} and post["security"] == [{"bearerAuth": []}]
    assert content["multipart/form-data"]["schema"]["properties"]["input_reference"]["format"] == "binary"
    assert content["application/json"]["schema"]["properties"]["size"]["anyOf"][0]["pattern"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/VideoObject")
    assert set(schema["components"]["schemas"]["VideoObject"]["properties"]) == FIELDS
    docs = video_server.http.get("/docs").text
    assert "POST /v1/videos" in docs and "input_reference" in docs and "num_frames" in docs


def test_list_pages(video_server):
    c = client(video_server)
    ids = [c.videos.create(prompt=f"clip {i}", extra_body=SMALL).id for i in range(3)]
    first = c.videos.list(limit=2, order="asc")
    everything = [v.id for v in c.videos.list(limit=100, order="asc").data]
    assert [v.id for v in first.data] == everything[:2] and first.has_more
    later = c.videos.list(limit=100, order="asc", after=first.data[-1].id)
    assert [v.id for v in later.data] == everything[2:]
    assert set(ids) <= set(everything)
    newest = c.videos.list(limit=1).data[0]
    assert newest.id == everything[-1]
    raw = video_server.http.get("/v1/videos", params={"limit": 2, "order": "asc"}).json()
    assert raw["object"] == "list" and [raw["first_id"], raw["last_id"]] == everything[:2] and raw["has_more"]
    for bad, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "video_" + "f" * 32}, "after"),
                       ({"limit": "x"}, "limit")):
        assert assert_envelope(video_server.http.get("/v1/videos", params=bad), 400)["param"] == param
    bad_variant = video_server.http.get(f"/v1/videos/{everything[0]}/content", params={"variant": "gif"})
    assert assert_envelope(bad_variant, 400)["param"] == "variant"


@pytest.mark.parametrize("body, param", [
    ({"size": "50x32"}, "size"), ({"num_frames": "6"}, "num_frames"), ({"seconds": "-1"}, "seconds"),
    ({"seconds": "9999"}, "num_frames"), ({"num_inference_steps": "zero"}, "num_inference_steps"),
    ({"sampler": "ddim"}, "sampler"), ({"model": "sora-2"}, "model"), ({"unknown": "1"}, "unknown"),
    ({"fps": "1.5"}, "fps"), ({"guidance_scale": "nan"}, "guidance_scale"),
])
@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_bad_input_is_400_before_any_job(video_server, body, param, as_json):
    def jobs() -> float:  # every job in the store, whatever its status (earlier jobs may still move on)
        return sum(v for k, v in video_server.metrics().items() if k.startswith("ditserve_video_jobs{"))

    before = jobs()
    fields = {"json": {"prompt": "x", **body}} if as_json else {"data": {"prompt": "x", **body}}
    r = video_server.http.post("/v1/videos", **fields)
    error = assert_envelope(r, 404 if param == "model" else 400)
    assert param in (error["param"] or "") or param in error["message"]
    assert jobs() == before


def test_an_image_for_a_text_to_video_model_and_unknown_ids(video_server):
    png = io.BytesIO()
    Image.new("RGB", (48, 32)).save(png, format="PNG")
    r = video_server.http.post("/v1/videos", data={"prompt": "x"},
                               files={"input_reference": ("a.png", png.getvalue(), "image/png")})
    assert assert_envelope(r, 400)["param"] == "image"
    assert_envelope(video_server.http.get("/v1/videos/video_" + "0" * 32), 404)
    assert_envelope(video_server.http.get("/v1/videos/../../etc/passwd"), 404)
    assert_envelope(video_server.http.post("/v1/videos/video_x/remix", json={"prompt": "y"}), 400)
    big = video_server.http.post("/v1/videos", data={"prompt": "x"},  # past --max-upload-bytes 1000000
                                 files={"input_reference": ("a.png", b"\0" * 1_100_000, "image/png")})
    assert assert_envelope(big, 413)["code"] == "request_too_large"
    text = video_server.http.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert "application/json or multipart/form-data" in assert_envelope(text, 415)["message"]
    # and the image endpoints say this model makes videos
    assert "video" in assert_envelope(video_server.http.post("/v1/images/generations", json={"prompt": "x"}),
                                      400)["message"]


def test_completed_jobs_survive_a_restart(tiny_wan, tmp_path):
    """A restart serves completed jobs and their content; jobs the stopped server left running or queued
    are back in the queue (documented in server/jobs.py and the README) and run again, oldest first;
    past --data-max-bytes the oldest finished job is deleted to make room."""
    data = tmp_path / "jobs"
    first = start(tiny_wan("t2v"), tmp_path / "a.log", *FLAGS, "--data-dir", str(data), "--drain-timeout", "1",
                  api_key=API_KEY)
    try:
        c = client(first)
        done = c.videos.create_and_poll(prompt="keep me", poll_interval_ms=100, extra_body=SMALL)
        content = c.videos.download_content(done.id).read()
        running = c.videos.create(prompt="interrupted", extra_body={**SMALL, "num_inference_steps": "1000",
                                                                    "size": "96x64", "num_frames": "17"})
        waiting = c.videos.create(prompt="waiting", extra_body=SMALL)
        deadline = time.monotonic() + 60
        while c.videos.retrieve(running.id).status != "in_progress" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.videos.retrieve(waiting.id).status == "queued"
    finally:
        first.stop()  # SIGINT: a 1 s drain, then it stops with the long job still running
    assert "denoise: 1000 steps" not in first.log_path.read_text()  # the worker stopped it at shutdown
    done_bytes = sum(f.stat().st_size for f in data.glob(f"{done.id}.*"))
    second = start(tiny_wan("t2v"), tmp_path / "b.log", *FLAGS, "--data-dir", str(data),
                   "--data-max-bytes", str(done_bytes * 3 // 2), api_key=API_KEY)  # room for about one more
    try:
        c = client(second)
        again = c.videos.retrieve(done.id)
        assert again.status == "completed" and (again.model_extra or {}).get("seed") == 3
        assert c.videos.download_content(done.id).read() == content
        started = second.log_path.read_text()
        assert "2 unfinished video job(s)" in started
        assert f"video jobs: in {data}, kept 3600 s, at most {done_bytes * 3 // 2} bytes" in started
        assert c.videos.retrieve(waiting.id).status == "queued"
        second.wait_metric("ditserve_denoise_steps_total", lambda v: v > 0)  # the interrupted one runs again
        assert c.videos.retrieve(running.id).status == "in_progress"
        c.videos.delete(running.id)
        assert c.videos.poll(waiting.id, poll_interval_ms=100).status == "completed"
        assert c.videos.download_content(waiting.id).read()
        assert_envelope(second.http.get(f"/v1/videos/{done.id}"), 404)  # the oldest, deleted for room
        assert not list(data.glob(f"{done.id}.*"))
    finally:
        second.stop()


def test_image_to_video_and_the_job_time_limit(tiny_wan, tmp_path):
    """An input_reference animates with an image-to-video model; a job past --job-timeout fails with
    code `timeout` (queue time not counted) and the worker moves on; a job past --output-ttl is swept with
    its files."""
    live = start(tiny_wan("i2v"), tmp_path / "i2v.log", *FLAGS, "--data-dir", str(tmp_path / "jobs"),
                 "--job-timeout", "3", "--output-ttl", "6", api_key=API_KEY)
    try:
        c = client(live)
        png = io.BytesIO()
        Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8")).save(png, format="PNG")
        video = c.videos.create_and_poll(prompt="it moves", input_reference=("in.png", png.getvalue(), "image/png"),
                                         poll_interval_ms=100, extra_body=SMALL)
        assert video.status == "completed"
        assert read_video(c.videos.download_content(video.id).read())[0].shape == (5, 32, 48, 3)
        slow = c.videos.create(prompt="too slow", input_reference=("in.png", png.getvalue(), "image/png"),
                               extra_body={**SMALL, "num_inference_steps": "990", "size": "96x64", "num_frames": "17"})
        # queued behind the slow one until it times out: its own time limit counts from its start
        after = c.videos.create(prompt="next", input_reference=("in.png", png.getvalue(), "image/png"), extra_body=SMALL)
        after = c.videos.poll(after.id, poll_interval_ms=100)
        assert after.status == "completed", after.error
        slow = c.videos.retrieve(slow.id)
        assert slow.status == "failed" and slow.error.code == "timeout" and "of starting" in slow.error.message
        files = list((tmp_path / "jobs").glob(f"{video.id}.*"))
        assert {f.suffix for f in files} == {".input", ".mp4", ".webp", ".jpg"}
        deadline = time.monotonic() + 30  # the sweep runs every ttl/2 s
        while any(f.exists() for f in files) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(f.exists() for f in files)
        assert_envelope(live.http.get(f"/v1/videos/{video.id}"), 404)
    finally:
        live.stop()
