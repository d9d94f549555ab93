"""`rugpt serve --replicas 2` on a local Ray instance: the same API and guarantees as one server, and a replica
killed mid-request.

Two replicas of a tiny random model whose steps take 20 ms (so requests are in flight long enough to be
seen), behind Ray's HTTP proxy on 127.0.0.1 at a free port. Every request goes to 127.0.0.1 only, with a
client timeout; the module takes about a minute (Ray starts once). Skipped without Ray Serve
(`pip install 'rugpt[cluster]'`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from _serve_helpers import slow_engine  # noqa: E402
from conftest import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parents[1]
PROMPT = "Мой дядя самых честных правил"
KEYS = [f"sk-test-{i}" for i in range(20)]
STEP_DELAY = 0.02


def slow_app(settings, routers):
    """A replica's app whose engine steps take STEP_DELAY and never end a row early (runs in the replica)."""
    from rugpt.models import load
    from rugpt.serve import create_app

    loaded = load(settings.model, device="cpu")
    return create_app(settings, loaded=loaded, engine=slow_engine(loaded, settings.max_batch, STEP_DELAY),
                      routers=routers)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two replicas on a local Ray instance started for this module; yields (base URL, play db) and stops Ray."""
    import ray

    from rugpt.cli.serve import _play_router
    from rugpt.serve import ServerSettings
    from rugpt.serve.cluster import deploy, shutdown
    from rugpt.serve.cluster_settings import ClusterSettings

    if ray.is_initialized():
        pytest.skip("Ray is already connected in this process")
    saved = dict(os.environ)
    # Replicas are new processes: they import this module (slow_app) and the helpers from the tests' folders.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS / "e2e"), os.environ.get("PYTHONPATH", "")])
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-cluster"), n_positions=512)
    db = tmp_path_factory.mktemp("play") / "adventures.sqlite3"
    settings = ServerSettings(model=str(folder), port=free_port(), max_batch=2, max_waiting=2, api_keys=KEYS,
                              max_inflight_per_key=2, shutdown_grace=1, log_level="warning", play_db=db)
    # max_ongoing = batch + waiting: Ray's own queue in front of the replicas takes what they cannot.
    options = ClusterSettings(replicas=2, cpus_per_replica=0.5, max_ongoing_per_replica=4, max_queued=2)
    try:
        url = deploy(settings, options, routers=[functools.partial(_play_router, db)], build=slow_app)
        warm_up(url)
        yield url
    finally:
        shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def warm_up(url: str) -> None:
    """Until Ray's proxy routes to both replicas (its router learns them a moment after they start)."""
    deadline = time.monotonic() + 60
    with client(url) as http:
        while "rugpt_cluster_replicas 2.0" not in http.get("/metrics").text:
            assert time.monotonic() < deadline, "the replicas did not both answer within 60 s"
            time.sleep(0.5)
        for _ in range(4):
            http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})


def client(url: str, key: str = KEYS[0]) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {key}"})


def stream_lines(response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def test_openai_client_and_streaming_through_the_proxy(cluster):
    sdk = openai.OpenAI(base_url=f"{cluster}/v1", api_key=KEYS[1], max_retries=0, timeout=30)
    [model] = sdk.models.list().data
    completion = sdk.completions.create(model=model.id, prompt=PROMPT, max_tokens=6, temperature=0)
    pieces = [c.choices[0].text for c in sdk.completions.create(
        model=model.id, prompt=PROMPT, max_tokens=6, temperature=0, stream=True) if c.choices]
    chat = sdk.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Привет"}],
                                       max_tokens=5, seed=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cluster}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context"):
        sdk.completions.create(model=model.id, prompt=PROMPT, max_tokens=600)
    assert completion.usage.completion_tokens == 6 and "".join(pieces) == completion.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    with client(cluster, KEYS[1]) as http:
        raw = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        health = http.get("/health")
    assert raw.headers.get_list("x-request-id") == [raw.json()["id"]] and raw.json()["id"].startswith("cmpl-")
    assert raw.headers["x-rugpt-replica"] and health.status_code == 200


def test_a_full_cluster_answers_429_in_openais_shape(cluster):
    async def one(http: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": 40, "stream": i % 2 == 0}
        return await http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {KEYS[i]}"})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster, timeout=60, limits=httpx.Limits(max_connections=20)) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(16))), 90)

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    # How many are taken depends on how fast Ray's router assigns them (it counts those not yet assigned as
    # queued): at least one, never all, and nothing but 200 or 429.
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for r in responses:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] in ("queue_full", "per_key_limit")
            assert int(r.headers["retry-after"]) >= 1
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n")
        else:
            assert r.json()["usage"]["completion_tokens"] == 40


def test_the_per_key_limit_counts_every_replica(cluster):
    key = KEYS[2]
    long = {"prompt": PROMPT, "max_tokens": 150, "stream": True}
    with client(cluster, key) as http:
        with http.stream("POST", "/v1/completions", json=long) as first, \
                http.stream("POST", "/v1/completions", json=long) as second:
            replicas = {first.headers["x-rugpt-replica"], second.headers["x-rugpt-replica"]}
            third = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            other = client(cluster, KEYS[3]).post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            for response in (first, second):
                http.delete(f"/v1/requests/{response.headers['x-request-id']}")
        after = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert len(replicas) == 2  # Ray spread them: one replica alone could not see the limit
    assert third.status_code == 429 and third.json()["error"]["code"] == "per_key_limit"
    assert other.status_code == 200 and after.status_code == 200


def test_cancel_by_id_reaches_the_replica_that_runs_the_request(cluster):
    crossed = 0
    with client(cluster, KEYS[4]) as http:
        for _ in range(4):
            body = {"prompt": PROMPT, "max_tokens": 150, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                cancelled = http.delete(f"/v1/requests/{response.headers['x-request-id']}")
                rest = [line for line in lines if line]
            assert cancelled.status_code == 200 and rest[-1] == "data: [DONE]"
            assert '"finish_reason":"cancelled"' in rest[-2]
            crossed += cancelled.headers["x-rugpt-replica"] != response.headers["x-rugpt-replica"]
            if crossed >= 2:
                break
        stranger = client(cluster, KEYS[5]).delete("/v1/requests/cmpl-no-such-request")
    assert crossed >= 1  # the DELETE went to the other replica, and still cancelled the request
    assert stranger.status_code == 404 and stranger.json()["error"]["code"] == "request_not_found"


def test_metrics_show_every_replica(cluster):
    with client(cluster) as http:
        http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        page = http.get("/metrics").text
    replicas = {line.split('replica="')[1].split('"')[0] for line in page.splitlines() if 'replica="' in line}
    assert len(replicas) == 2 and "rugpt_cluster_replicas 2.0" in page
    assert "rugpt_generated_tokens_total{" in page


def test_adventure_turns_on_two_replicas_stay_consistent(cluster):
    with client(cluster) as http:
        token = http.post("/play/api/adventures", json={"scenario": "fantasy"}).json()["token"]
        headers = {"X-Adventure-Token": token}

        def act(text: str) -> httpx.Response:
            return http.post("/play/api/adventure/act", json={"kind": "do", "text": text}, headers=headers)

        with ThreadPoolExecutor(2) as pool:  # two turns at once (each takes a second or more)
            first = pool.submit(act, "я иду в корчму")
            time.sleep(0.2)  # the first is running: Ray sends the second to the other, idle replica
            second = pool.submit(act, "я зову трактирщика")
            together = [first.result(), second.result()]
        third = act("я сажусь у огня")
        story = http.get("/play/api/adventure", headers=headers).json()
    assert all(r.status_code == 200 for r in [*together, third])
    served_by = {r.headers["x-rugpt-replica"] for r in [*together, third]}
    actions = [t["action"] for t in story["turns"]]
    assert len(actions) == 3 and actions[-1] == "Вы садитесь у огня."  # neither turn overwrote the other
    assert {"Вы идёте в корчму.", "Вы зовёте трактирщика."} <= set(actions)
    assert len(served_by) == 2


def test_a_killed_replica_fails_its_requests_and_is_replaced(cluster):
    import ray
    from ray import serve

    from rugpt.serve.cluster import APP_NAME, DEPLOYMENT, LEDGER, NAMESPACE

    ledger = ray.get_actor(LEDGER, namespace=NAMESPACE)
    pids = ray.get(ledger.replicas.remote(), timeout=10)
    assert len(pids) == 2
    streams: dict[int, str] = {}  # request → the replica streaming it

    def follow(i: int) -> str:
        """How a long request ended: 'done', or what ended it. The first two stream (their replica known at once)."""
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": 200, "stream": i < 2}
        try:
            with client(cluster, KEYS[6 + i]).stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    return f"{response.status_code} {response.json()['error']['code']}"
                if not body["stream"]:
                    return "done" if json.loads(response.read())["usage"]["completion_tokens"] == 200 else "short"
                streams[i] = response.headers["x-rugpt-replica"]
                return "done" if stream_lines(response)[-1] == "data: [DONE]" else "error event"
        except httpx.HTTPError as exc:  # the stream was cut off
            return type(exc).__name__

    with ThreadPoolExecutor(4) as pool:
        futures = []
        for i in range(4):
            futures.append(pool.submit(follow, i))
            time.sleep(0.2)  # one at a time: Ray sends each to the less busy replica
        time.sleep(0.7)  # all four are decoding (200 steps of 20 ms: 4 s or more)
        victim = streams[0]
        os.kill(pids[victim], signal.SIGKILL)
        outcomes = [future.result(timeout=60) for future in futures]  # none hangs
    assert set(streams.values()) == set(pids), (streams, outcomes)  # a stream on each replica
    for i, outcome in enumerate(outcomes):
        if i in streams:
            assert (outcome != "done") if streams[i] == victim else (outcome == "done"), (streams, outcomes)
        else:  # not streamed: finished on the survivor, or a 500 in OpenAI's shape from the victim
            assert outcome in ("done", "500 replica_failed"), outcomes
    deadline = time.monotonic() + 120
    while True:  # Ray replaces the replica; then the cluster serves as before
        status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
        if status.replica_states.get("RUNNING", 0) == 2 and victim not in ray.get(ledger.replicas.remote()):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    with client(cluster) as http:
        answers = [http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) for _ in range(4)]
        page = http.get("/metrics").text
    assert all(a.status_code == 200 for a in answers)
    assert "rugpt_cluster_replicas 2.0" in page
