"""An API fuzzer (schemathesis) against the app's own OpenAPI spec, in-process only: no answer is a 5xx, and
every answer's status, content type and body are the ones the spec documents for its route.

Schemathesis builds requests from the spec — valid ones (positive) and near misses (negative) — and sends
them through its ASGI client, with the app's lifespan (the decode thread) run once around them. Bounded:
a fixed number of examples, small token budgets, no network.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from _serve_helpers import make_app  # noqa: E402

# About 150 requests in all: valid ones to the two generation routes, where a request's values reach the
# decode loop (this is how top_p=5e-324 was found), and near misses to every route.
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 50}


CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def check(case) -> None:
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path} {case.body!r} → {response.text}"
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis keeps every value of a header
    if response.status_code >= 400 and content_type.startswith("application/json"):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    # A documented status, content type and body shape for whatever came back (issue 15): no client reading
    # the spec meets an answer it was not told about.
    case.validate_response(response, checks=CONFORMANCE)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_the_spec_describes_gets_a_5xx(tiny, mode):
    from schemathesis.python import asgi

    app = make_app(tiny, max_batch=4, default_max_tokens=4, max_tokens_limit=8, max_n=2, request_timeout=20)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    if mode is GenerationMode.POSITIVE:
        schema = schema.include(method="POST")

    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(schema.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        check(case)

    try:
        fuzz()
    finally:
        asgi.shutdown_lifespans()  # stops the decode thread, as the app's shutdown does
