"""Schemathesis over the live /openapi.json: no 5xx, documented statuses, OpenAI's envelope on errors.

Its own server has tight caps (64x64 pixels, 3 steps, 2 images) so every generated request is cheap,
and its model folder's defaults fit inside them, so requests that leave fields out reach the model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from live_server import start
from schemathesis.specs.openapi.checks import positive_data_acceptance

FUZZ_KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_server(tiny_flux_dev, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    model = shutil.copytree(tiny_flux_dev, folder / "model")
    defaults = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16}
    (model / "ditserve.json").write_text(json.dumps({"defaults": defaults}))
    live = start(model, folder / "server.log", "--max-pixels", "4096",
                 "--max-steps", "3", "--max-num-images", "2", "--max-batch-size", "2", api_key=FUZZ_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("fuzz_schema")


def error_envelope(ctx, response, case):
    """Every 4xx/5xx body is {"error": {message, type, param, code}}."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return None


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_conformance(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, headers=fuzz_server.headers)
    # positive_data_acceptance is left out: a schema-valid request can still be refused with a
    # 400 by the loaded model's limits (a size not a multiple of 16, more steps than --max-steps),
    # and /v1/images/edits refuses every request while no editing family is loaded.
    case.validate_response(response, additional_checks=[error_envelope],
                           excluded_checks=[positive_data_acceptance], headers=fuzz_server.headers)


def test_fuzzing_reached_the_model(fuzz_server):
    """Runs after the conformance test: schemathesis got both generated images and 400s."""
    samples = fuzz_server.metrics()
    route = "route=/v1/images/generations"
    assert samples.get(f"ditserve_requests_total{{{route},status=200}}", 0) > 0
    assert samples.get(f"ditserve_requests_total{{{route},status=400}}", 0) > 0
    server_errors = [name for name in samples if name.startswith("ditserve_requests_total{")
                     and "status=5" in name and "route=/ready," not in name]  # /ready is 503 until loaded
    assert not server_errors
