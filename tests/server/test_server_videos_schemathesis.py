"""Schemathesis over a video model's /openapi.json: POST /v1/videos as JSON and as a form (with random
`input_reference` bytes), the job routes with random ids and queries: no 5xx, documented statuses,
OpenAI's envelope on errors (issue 14: bad input is a 400 before any model work; issue 24: no 5xx).

Its own server on the tiny Wan folder has tight caps, and the folder's defaults fit inside them, so
the jobs that generated requests create stay cheap.
"""

from __future__ import annotations

import json
import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from live_server import start
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_server_schemathesis import error_envelope

FUZZ_KEY = "fuzz-key"
pytestmark = pytest.mark.slow  # a server process and a few hundred requests: ~1 min on 2 CPU cores


@pytest.fixture(scope="module")
def video_fuzz_server(tiny_wan, tmp_path_factory):
    folder = tmp_path_factory.mktemp("video_fuzz")
    model = shutil.copytree(tiny_wan("t2v"), folder / "model")
    defaults = {"height": 32, "width": 48, "num_inference_steps": 2, "num_frames": 5}
    (model / "ditserve.json").write_text(json.dumps({"defaults": defaults}))
    live = start(model, folder / "server.log", "--max-pixels", "4096", "--max-steps", "3", "--max-queue", "4",
                 "--data-dir", str(folder / "jobs"), "--job-timeout", "20", api_key=FUZZ_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def video_fuzz_schema(video_fuzz_server):
    return schemathesis.openapi.from_url(f"{video_fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("video_fuzz_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_video_openapi_conformance(case, video_fuzz_server):
    response = case.call(base_url=video_fuzz_server.url, headers=video_fuzz_server.headers)
    # positive_data_acceptance left out: a schema-valid job can still be refused by the model's limits
    # (frames not 4k+1, a size past --max-pixels), and the image routes refuse every request here.
    case.validate_response(response, additional_checks=[error_envelope],
                           excluded_checks=[positive_data_acceptance], headers=video_fuzz_server.headers)


def test_video_fuzzing_reached_the_model(video_fuzz_server):
    """Runs after the conformance test: jobs were created and refused, and nothing answered 5xx."""
    samples = video_fuzz_server.metrics()
    route = "route=/v1/videos"
    assert samples.get(f"ditserve_requests_total{{{route},status=200}}", 0) > 0
    assert samples.get(f"ditserve_requests_total{{{route},status=400}}", 0) > 0
    server_errors = [name for name in samples if name.startswith("ditserve_requests_total{")
                     and "status=5" in name and "route=/ready," not in name]
    assert not server_errors, server_errors
    failed = samples.get("ditserve_video_jobs{status=failed}", 0)
    assert failed == 0, video_fuzz_server.log_text()  # every accepted job was one the model could run
