"""/v1/images/edits with an editing family (tiny Qwen-Image-Edit): same image as the Python API, bad uploads 400."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from live_server import assert_envelope, start
from PIL import Image

# the edit family resizes its input to about 1024x1024 for the VAE: slow on a CPU, so few requests
EXTRA = {"seed": 2, "num_inference_steps": 2, "max_sequence_length": 32}


QUEUE = 4


@pytest.fixture(scope="module")
def edit_server(tiny_qwen_image_edit, tmp_path_factory):
    live = start(tiny_qwen_image_edit, tmp_path_factory.mktemp("edit") / "server.log",
                 "--max-queue", str(QUEUE), "--max-client-requests", "8", "--max-steps", "1000")
    yield live
    live.stop()


def png(color, size=(48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_edit_equals_python_api(edit_server, tiny_qwen_image_edit):
    from ditserve import Generator

    with openai.OpenAI(base_url=f"{edit_server.url}/v1", api_key="unused", max_retries=0) as client:
        result = client.images.edit(image=("in.png", png((200, 30, 30)), "image/png"), prompt="make it blue",
                                    size="32x32", extra_body=EXTRA)
    assert result.size == "32x32" and len(result.data) == 1
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    source = Image.open(io.BytesIO(png((200, 30, 30))))
    expected = Generator.from_pretrained(tiny_qwen_image_edit, device="cpu", dtype="float32").generate(
        "make it blue", images=[source], height=32, width=32, **EXTRA).images[0]
    assert np.array_equal(served, np.asarray(expected))


BAD_UPLOADS = [
    ({"prompt": "x"}, [], "image", "give 1 input image"),
    ({"prompt": "x"}, [("image", b"not an image")], "image", "not an image"),
    ({"prompt": "x"}, [("image", png("red")[:60])], "image", "corrupt"),
    ({"prompt": "x"}, [("image", png("red")), ("image[]", png("blue"))], "image", "at most 1"),
    ({"prompt": "x"}, [("image", png("red")), ("mask", png("white"))], "mask", "not supported"),
    ({"prompt": "x", "n": "two"}, [("image", png("red"))], "n", "integer"),
    ({"prompt": "x", "colour": "red"}, [("image", png("red"))], "colour", "Unrecognized"),
    ({}, [("image", png("red"))], "prompt", "Missing"),
    # the family's scheduler ends at shift_terminal: a 1-step schedule would be 0/0
    ({"prompt": "x", "num_inference_steps": "1"}, [("image", png("red"))], "num_inference_steps", "between 2"),
]


@pytest.mark.parametrize("fields,files,param,needle", BAD_UPLOADS, ids=[b[3] for b in BAD_UPLOADS])
def test_bad_upload_is_400(edit_server, fields, files, param, needle):
    response = edit_server.http.post("/v1/images/edits", data={**fields, "size": "32x32"},
                                     files=[(name, (f"{name}.png", data, "image/png")) for name, data in files])
    error = assert_envelope(response, 400)
    assert error["param"] == param and needle.lower() in error["message"].lower()


def test_generations_needs_the_image(edit_server):
    error = assert_envelope(edit_server.http.post("/v1/images/generations", json={"prompt": "x", "size": "32x32"}),
                            400)
    assert error["param"] == "image" and "edits images" in error["message"]


BIG = 4000  # a 4000x4000 upload: about 60 KB as a flat PNG, 48 MB of RGB pixels once decoded
MIB = 1 << 20


def edit(client: httpx.AsyncClient, image: bytes, **fields) -> asyncio.Task:
    data = {"prompt": "x", "size": "32x32", "max_sequence_length": "32", **{k: str(v) for k, v in fields.items()}}
    return asyncio.create_task(client.post("/v1/images/edits", data=data,
                                           files=[("image", ("in.png", image, "image/png"))]))


def test_queued_edits_hold_compressed_bytes_and_full_queue_refuses_first(edit_server):
    """Issue 24.7: while edits wait in the queue the server holds their uploads compressed (not 48 MB of
    pixels each), and a full queue answers 429 before an upload is decoded (a corrupt one included)."""
    big = png((90, 140, 200), size=(BIG, BIG))

    async def scenario():
        async with httpx.AsyncClient(base_url=edit_server.url, timeout=300) as client:
            steps = edit_server.metrics()["ditserve_denoise_steps_total"]
            blocker = edit(client, png("red"), num_inference_steps=1000)
            await asyncio.to_thread(edit_server.wait_metric, "ditserve_denoise_steps_total", lambda v: v > steps)
            rss = edit_server.server_rss()
            queued = [edit(client, big, num_inference_steps=2, seed=i) for i in range(QUEUE)]
            await asyncio.to_thread(edit_server.wait_metric, "ditserve_queue_length", lambda v: v == QUEUE)
            growth = edit_server.server_rss() - rss
            full = await edit(client, png("red")[:60])  # corrupt: decoding it would be a 400
            for task in (blocker, *queued):
                task.cancel()
            await asyncio.to_thread(edit_server.wait_metric, "ditserve_running_requests", lambda v: v == 0)
            await asyncio.to_thread(edit_server.wait_metric, "ditserve_queue_length", lambda v: v == 0)
            return growth, full

    growth, full = asyncio.run(scenario())
    assert assert_envelope(full, 429)["code"] == "queue_full"
    one_decoded = BIG * BIG * 3  # the server held all four before: it grew by about 245 MiB
    assert growth < one_decoded, f"the server grew by {growth / MIB:.0f} MiB holding {QUEUE} queued edits"
