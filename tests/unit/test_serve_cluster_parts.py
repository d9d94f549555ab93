"""`rugpt serve --replicas N` without Ray: the settings' mapping onto Ray Serve, the ledger, the proxy's error
shapes, and the replica middleware over two in-process apps that share one ledger (as two replicas would)."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi")

from _serve_helpers import asgi_client, make_app, run  # noqa: E402
from rugpt.errors import UsageError  # noqa: E402
from rugpt.serve import ServerSettings  # noqa: E402
from rugpt.serve.cluster_ledger import Ledger  # noqa: E402
from rugpt.serve.cluster_middleware import (  # noqa: E402
    ClusterMiddleware,
    cancel_here,
    families_of,
    render_merged,
)
from rugpt.serve.cluster_proxy import OpenAIShapedProxy  # noqa: E402
from rugpt.serve.cluster_settings import ClusterSettings, cluster_from_options  # noqa: E402

PROMPT = "Мой дядя самых честных правил"


# --- settings -------------------------------------------------------------------------------------------------


def test_fixed_replicas_map_onto_ray_serve_options():
    server = ServerSettings(max_batch=8, max_waiting=16, shutdown_grace=2)
    options = ClusterSettings(replicas=3, cpus_per_replica=2).deployment_options(server)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 8 + 16 + 8 and options["max_queued_requests"] == 16
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 1.0}
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.0}
    assert ClusterSettings(cpus_per_replica=2.5).torch_threads() == 2


def test_autoscaling_bounds_map_onto_autoscaling_config():
    server = ServerSettings(max_batch=4, max_waiting=0)
    options = ClusterSettings(replicas=2, min_replicas=1, max_replicas=5, max_ongoing_per_replica=6,
                              max_queued=3).deployment_options(server)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5, "initial_replicas": 2,
                                             "target_ongoing_requests": 4}
    assert options["max_ongoing_requests"] == 6 and options["max_queued_requests"] == 3
    assert ClusterSettings(max_replicas=3).replica_bounds() == (1, 3)
    assert ClusterSettings(replicas=1).deployment_options(server)["max_queued_requests"] == 1  # Ray needs ≥ 1


def test_cluster_options_are_checked_with_the_option_named():
    assert cluster_from_options({"replicas": None, "ray_address": None}) is None
    assert cluster_from_options({"replicas": 2}).replicas == 2
    with pytest.raises(UsageError, match="--min-replicas 4 is more than --max-replicas 2"):
        cluster_from_options({"min_replicas": 4, "max_replicas": 2})
    with pytest.raises(UsageError, match="^--replicas: "):
        cluster_from_options({"replicas": 0})


def test_without_ray_the_cli_says_how_to_install_it_and_exits_2(monkeypatch, tmp_path):
    from rugpt.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    result = CliRunner().invoke(app, ["serve", "--replicas", "2", "--play-db", str(tmp_path / "p.sqlite3")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'rugpt[cluster]'" in lines[0] and "Ray Serve" in lines[0]


# --- the ledger -----------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ledger_counts_a_key_across_holders_and_frees_a_silent_holders_leases():
    clock = Clock()
    ledger = Ledger(ttl=5, clock=clock)
    ledger.report("a", 11, {})
    ledger.report("b", 12, {})
    assert ledger.acquire("a", "l1", "key", 2) and ledger.acquire("b", "l2", "key", 2)
    assert not ledger.acquire("b", "l3", "key", 2)  # the limit holds across holders
    assert ledger.acquire("b", "l3", "other", 2)
    ledger.release("a", "l1")
    assert ledger.acquire("b", "l4", "key", 2)
    clock.now = 3
    ledger.report("a", 11, {})
    clock.now = 6  # b has been silent for 6 s: its process died
    assert ledger.replicas() == {"a": 11} and ledger.in_flight("key") == 0


def test_a_restarted_ledger_gets_leases_back_from_reports():
    ledger = Ledger()
    ledger.report("a", 11, {"l1": "key", "l2": "key"})
    assert ledger.in_flight("key") == 2 and not ledger.acquire("b", "l3", "key", 2)
    ledger.report("a", 11, {})  # a known holder's later report does not overwrite newer leases
    assert ledger.in_flight("key") == 2


def test_ledger_locks_wait_for_release_and_for_a_dead_holder():
    clock = Clock()
    ledger = Ledger(ttl=5, clock=clock)

    async def scenario():
        first = await ledger.lock("adventure", "a", timeout=1)
        assert first is not None
        assert await ledger.lock("adventure", "b", timeout=0) is None
        waiter = asyncio.ensure_future(ledger.lock("adventure", "b", timeout=30))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        ledger.unlock("adventure", "not-the-id")  # only the holder's id unlocks
        ledger.unlock("adventure", first)
        second = await asyncio.wait_for(waiter, 1)
        clock.now = 10  # b died holding it: the next caller gets it once b's reports stop
        ledger.report("c", 13, {})
        third = await ledger.lock("adventure", "c", timeout=1)
        return second, third

    second, third = run(scenario(), timeout=10)
    assert second and third and second != third


# --- Ray's proxy answers ----------------------------------------------------------------------------------------


def _proxied(app_status: int, content_type: str, body: bytes, path: str = "/v1/completions", headers=()):
    seen: dict = {}

    async def inner(scope, receive, send):
        seen["request_id"] = dict(scope["headers"]).get(b"x-request-id")
        await send({"type": "http.response.start", "status": app_status,
                    "headers": [(b"content-type", content_type.encode()), (b"retry-after", b"1"),
                                (b"x-request-id", b"cmpl-app"), (b"X-Request-ID", b"ray-uuid")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def call():
        transport = httpx.ASGITransport(app=OpenAIShapedProxy(inner))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.post(path, headers=dict(headers))

    return run(call()), seen


def test_rays_backpressure_is_answered_in_openais_error_shape():
    ray_text = b"Request dropped due to backpressure (num_queued_requests=2, max_queued_requests=2)."
    response, _ = _proxied(429, "text/plain; charset=utf-8", ray_text)
    error = response.json()["error"]
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full" and "backpressure" in error["message"]
    assert response.headers.get_list("x-request-id") == ["cmpl-app"]
    died, _ = _proxied(500, "text/plain", b"ActorDiedError")
    assert died.status_code == 500 and died.json()["error"]["code"] == "replica_failed"


def test_a_replica_that_dies_before_answering_gets_an_openai_shaped_500():
    async def raising(scope, receive, send):
        raise RuntimeError("ActorDiedError")

    async def silent(scope, receive, send):  # what Ray's proxy does when the replica died mid-request
        return None

    async def call(inner):
        transport = httpx.ASGITransport(app=OpenAIShapedProxy(inner))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.post("/v1/completions")

    for inner in (raising, silent):
        response = run(call(inner))
        assert response.status_code == 500 and response.json()["error"]["code"] == "replica_failed"


def test_the_apps_own_answers_pass_unchanged_and_request_ids_are_rugpts():
    body = json.dumps({"error": {"message": "per key", "type": "rate_limit_error", "param": None, "code": "x"}})
    response, seen = _proxied(429, "application/json", body.encode(), path="/v1/chat/completions")
    assert response.json()["error"]["code"] == "x"
    assert seen["request_id"].startswith(b"chatcmpl-") and len(seen["request_id"]) == len("chatcmpl-") + 24
    _, seen = _proxied(200, "application/json", b"{}", headers={"x-request-id": "client-chosen-1"})
    assert seen["request_id"] == b"client-chosen-1"
    _, seen = _proxied(200, "text/plain", b"ok", path="/metrics")
    assert seen["request_id"] is None  # Ray names other requests itself


# --- the replica middleware over two in-process "replicas" -------------------------------------------------------


class MemoryLink:
    """A ClusterLink over apps of this process sharing one ledger: what Ray gives replicas, in memory."""

    def __init__(self, replica_id: str, ledger: Ledger, peers: list):
        self.replica_id, self.ledger, self.peers = replica_id, ledger, peers
        ledger.report(replica_id, 0, {})

    async def acquire(self, lease, key_hash, limit):
        return self.ledger.acquire(self.replica_id, lease, key_hash, limit)

    def release(self, lease):
        self.ledger.release(self.replica_id, lease)

    async def cancel_everywhere(self, request_id, key_hash):
        return any([cancel_here(app.state.scheduler, request_id, key_hash) for app in self.peers])

    async def metrics_everywhere(self):
        return [(name, families_of(app.state.metrics.registry)) for name, app in zip("ab", self.peers, strict=True)]

    async def lock(self, name, timeout):
        return await self.ledger.lock(name, self.replica_id, timeout)

    def unlock(self, name, lock_id):
        self.ledger.unlock(name, lock_id)


@pytest.fixture
def two_replicas(tiny):
    keys = ["sk-one", "sk-two"]
    settings = {"api_keys": keys, "max_inflight_per_key": 2}
    apps = [make_app(tiny, max_batch=2, step_delay=0.02, **settings) for _ in range(2)]
    ledger = Ledger()
    for name, app in zip("ab", apps, strict=True):
        link = MemoryLink(name, ledger, apps)
        app.add_middleware(ClusterMiddleware, link=link, settings=ServerSettings(max_batch=2, **settings))
    return apps


def test_per_key_limit_cancel_and_metrics_span_the_replicas(two_replicas):
    a, b = two_replicas
    one = {"authorization": "Bearer sk-one"}

    async def scenario():
        async with asgi_client(a, timeout=30) as ca, asgi_client(b, timeout=30) as cb:
            long = {"prompt": PROMPT, "max_tokens": 100}
            named = one | {"x-request-id": "req-first-1"}
            first = asyncio.ensure_future(ca.post("/v1/completions", json=long, headers=named))
            second = asyncio.ensure_future(cb.post("/v1/completions", json=long, headers=one))
            await asyncio.sleep(0.5)
            refused = await ca.post("/v1/completions", json=long, headers=one)
            other_key = await cb.post("/v1/completions", json=long | {"max_tokens": 2},
                                      headers={"authorization": "Bearer sk-two"})
            stranger = await cb.delete("/v1/requests/req-first-1", headers={"authorization": "Bearer sk-two"})
            cancelled = await cb.delete("/v1/requests/req-first-1", headers=one)  # b cancels a's request
            first_done = await asyncio.wait_for(first, 10)
            second.cancel()
            page = (await cb.get("/metrics", headers=one)).text  # behind the key, as on one server
            return refused, other_key, stranger, cancelled, first_done, page

    refused, other_key, stranger, cancelled, first_done, page = run(scenario(), timeout=60)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "per_key_limit"
    assert refused.headers["retry-after"] == "1" and refused.headers["x-rugpt-replica"] == "a"
    assert other_key.status_code == 200
    assert stranger.status_code == 404  # a stranger's DELETE finds nothing, as on one server
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.headers["x-rugpt-replica"] == "b"
    assert first_done.json()["choices"][0]["finish_reason"] == "cancelled"
    assert 'rugpt_rejections_total{reason="per_key_limit",replica="a"} 1.0' in page
    assert 'replica="b"' in page and "rugpt_cluster_replicas 2.0" in page
    assert 'rugpt_cancellations_total{cause="client",replica="a"} 1.0' in page


def test_merged_metrics_label_each_replica(tiny):
    apps = [make_app(tiny), make_app(tiny)]
    apps[0].state.metrics.tokens.inc(5)
    page = render_merged([(name, families_of(app.state.metrics.registry)) for name, app in zip("xy", apps,
                                                                                                strict=True)]).decode()
    assert 'rugpt_generated_tokens_total{replica="x"} 5.0' in page
    assert 'rugpt_generated_tokens_total{replica="y"} 0.0' in page
    assert page.count("# TYPE rugpt_generated_tokens_total counter") == 1
