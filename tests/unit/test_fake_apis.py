"""The fake APIs and the fake schema registry answer over real HTTP as the contracts say, record what they
receive and misbehave exactly as scripted; the bridge's own tests lean on all of that, so it is pinned here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.fake_apis import (
    DownMode,
    FakeApiControl,
    FakeApiServer,
    Fault,
    _TokenBucket,
    contains_key,
    not_yet_chosen,
)
from tests.support.fake_registry import CONTENT_TYPE, FakeSchemaRegistry

OL_KEY = "ol-secret"
HL_KEY = "hl-secret"
PIPELINE = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
CONFIG = {"outputColumnName": "output", "inferenceIdColumnName": "inferenceId"}
TRANSPORT_BROKEN = (httpx.RemoteProtocolError, httpx.ReadError)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer(openlayer_key=OL_KEY, humanloop_key=HL_KEY) as server:
        yield server


class ManualClock:
    """A clock for the fake's rate limits and not-yet windows that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1024.0  # exact in binary, so the sums of the steps below are too

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def timed_fake(clock: ManualClock) -> Iterator[FakeApiServer]:
    """A fake whose rate limits and not-yet windows run on `clock`."""
    with FakeApiServer(openlayer_key=OL_KEY, humanloop_key=HL_KEY, clock=clock) as server:
        yield server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as http:
        yield http


def publish(client: httpx.Client, fake: FakeApiServer, rows: list[Any] | None = None) -> httpx.Response:
    return client.post(
        f"{fake.openlayer_base_url}/inference-pipelines/{PIPELINE}/data-stream",
        json={"rows": rows if rows is not None else [{"output": "42", "inferenceId": "i-1"}], "config": CONFIG},
        headers={"Authorization": f"Bearer {OL_KEY}"},
    )


def update_row(
    client: httpx.Client, fake: FakeApiServer, body: Any, params: dict[str, str] | None = None
) -> httpx.Response:
    return client.put(
        f"{fake.openlayer_base_url}/inference-pipelines/{PIPELINE}/rows",
        params={"inferenceId": "i-1"} if params is None else params,
        json=body,
        headers={"Authorization": f"Bearer {OL_KEY}"},
    )


def update_log(
    client: httpx.Client, fake: FakeApiServer, body: Any, params: dict[str, str] | None = None
) -> httpx.Response:
    # bytes go out as they are, so tests can send what no JSON encoder would produce
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.patch(
        f"{fake.humanloop_base_url}/logs",
        params={"reference_id": "conv-1"} if params is None else params,
        content=raw,
        headers={"X-API-KEY": HL_KEY, "Content-Type": "application/json"},
    )


def assert_openlayer_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["code"] == status
    assert isinstance(body["error"], str)
    assert body["error"]


# -- contracts -----------------------------------------------------------------------------------------


def test_publish_success_is_recorded(fake: FakeApiServer, client: httpx.Client) -> None:
    response = publish(client, fake)

    assert response.status_code == 200
    assert response.json() == {"success": True}
    (received,) = fake.requests("publish")
    assert received.method == "POST"
    assert received.path == f"/openlayer/v1/inference-pipelines/{PIPELINE}/data-stream"
    assert received.headers["authorization"] == f"Bearer {OL_KEY}"
    assert received.headers["content-type"] == "application/json"
    assert received.json == {"rows": [{"output": "42", "inferenceId": "i-1"}], "config": CONFIG}
    assert orjson.loads(received.body) == received.json
    assert received.status == 200
    assert received.fault is None
    assert fake.requests("update_row") == []


def test_update_row_success(fake: FakeApiServer, client: httpx.Client) -> None:
    body = {"row": {"ground_truth": "yes"}, "config": {"groundTruthColumnName": "ground_truth"}}

    response = update_row(client, fake, body)

    assert response.status_code == 200
    assert response.json() == {"success": True}
    (received,) = fake.requests("update_row")
    assert received.method == "PUT"
    assert received.query == {"inferenceId": "i-1"}
    assert received.json == body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"row": {f"c{i}": i for i in range(100)}}, id="100-keys-no-config"),
        pytest.param({"row": {"a": 1}, "config": None}, id="null-config"),
    ],
)
def test_update_row_accepts_the_documented_edges(
    fake: FakeApiServer, client: httpx.Client, body: dict[str, Any]
) -> None:
    assert update_row(client, fake, body).status_code == 200


def test_update_log_answers_a_log_response(fake: FakeApiServer, client: httpx.Client) -> None:
    response = update_log(client, fake, {"output": "Paris", "duration": 1.42})

    assert response.status_code == 200
    log = response.json()
    assert log["id"].startswith("data_")
    assert log["config"]["type"] == "generic"
    assert log["evaluation_results"] == []
    assert log["observability_status"] in {"pending", "running", "completed", "failed"}
    assert datetime.fromisoformat(log["updated_at"]).tzinfo is not None
    assert log["reference_id"] == "conv-1"
    assert (log["output"], log["duration"]) == ("Paris", 1.42)
    assert "error" not in log
    again = update_log(client, fake, {"error": "boom"}).json()
    assert again["id"] == log["id"]
    assert again["error"] == "boom"
    assert update_log(client, fake, {}).status_code == 200


def test_openlayer_rejects_missing_and_wrong_keys(fake: FakeApiServer, client: httpx.Client) -> None:
    url = f"{fake.openlayer_base_url}/inference-pipelines/{PIPELINE}/data-stream"
    body = {"rows": [], "config": CONFIG}

    assert_openlayer_error(client.post(url, json=body), 401)
    assert_openlayer_error(client.post(url, json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_openlayer_error(client.post(url, json=body, headers={"Authorization": OL_KEY}), 401)
    assert [r.status for r in fake.requests()] == [401, 401, 401]


def test_humanloop_rejects_a_wrong_key(fake: FakeApiServer, client: httpx.Client) -> None:
    url = f"{fake.humanloop_base_url}/logs"

    wrong = client.patch(url, params={"reference_id": "r"}, json={}, headers={"X-API-KEY": "nope"})
    missing = client.patch(url, params={"reference_id": "r"}, json={})

    assert (wrong.status_code, missing.status_code) == (401, 401)
    assert "detail" in wrong.json()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"{not json", 400, id="not-json"),
        pytest.param(b"", 400, id="empty"),
        pytest.param(b"[]", 422, id="not-object"),
        pytest.param(b'{"config": {}}', 422, id="no-rows"),
        pytest.param(b'{"rows": [{}]}', 422, id="no-config"),
        pytest.param(b'{"rows": {}, "config": {}}', 422, id="rows-not-array"),
        pytest.param(b'{"rows": [1], "config": {}}', 422, id="row-not-object"),
        pytest.param(b'{"rows": [{}], "config": []}', 422, id="config-not-object"),
    ],
)
def test_publish_validation(fake: FakeApiServer, client: httpx.Client, body: bytes, status: int) -> None:
    response = client.post(
        f"{fake.openlayer_base_url}/inference-pipelines/{PIPELINE}/data-stream",
        content=body,
        headers={"Authorization": f"Bearer {OL_KEY}", "Content-Type": "application/json"},
    )

    assert_openlayer_error(response, status)
    (received,) = fake.requests()
    assert (received.status, received.fault) == (status, None)


@pytest.mark.parametrize(
    ("body", "params", "status"),
    [
        pytest.param({"row": {f"c{i}": i for i in range(101)}}, None, 422, id="101-keys"),
        pytest.param({"row": {}}, None, 422, id="empty-row"),
        pytest.param({"config": {}}, None, 422, id="no-row"),
        pytest.param({"row": {"a": 1}, "config": "x"}, None, 422, id="config-not-object"),
        pytest.param({"row": {"a": 1}}, {}, 400, id="no-inference-id"),
        pytest.param({"row": {"a": 1}}, {"inferenceId": ""}, 400, id="empty-inference-id"),
    ],
)
def test_update_row_validation(
    fake: FakeApiServer, client: httpx.Client, body: Any, params: dict[str, str] | None, status: int
) -> None:
    assert_openlayer_error(update_row(client, fake, body, params), status)


@pytest.mark.parametrize(
    ("body", "params", "loc", "kind"),
    [
        pytest.param({"output": "x"}, {}, ["query", "reference_id"], "missing", id="no-reference-id"),
        pytest.param({"outputs": "x"}, None, ["body", "outputs"], "extra_forbidden", id="unknown-key"),
        pytest.param({"output": 3}, None, ["body", "output"], "string_type", id="output-not-string"),
        pytest.param({"error": None}, None, ["body", "error"], "string_type", id="null-error"),
        pytest.param({"duration": "1.5"}, None, ["body", "duration"], "float_type", id="duration-string"),
        pytest.param({"duration": True}, None, ["body", "duration"], "float_type", id="duration-bool"),
        pytest.param([], None, ["body"], "model_attributes_type", id="not-object"),
        pytest.param(b"", None, ["body"], "missing", id="no-body"),
        pytest.param(b"{", None, ["body", 0], "json_invalid", id="not-json"),
    ],
)
def test_update_log_validation_is_fastapi_shaped(
    fake: FakeApiServer,
    client: httpx.Client,
    body: Any,
    params: dict[str, str] | None,
    loc: list[str],
    kind: str,
) -> None:
    response = update_log(client, fake, body, params)

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert error["type"] == kind
    assert isinstance(error["msg"], str)


def test_unknown_pipeline_is_404_when_an_allow_list_is_set(client: httpx.Client) -> None:
    with FakeApiServer(openlayer_key=OL_KEY, pipelines=["known"]) as fake:
        base = f"{fake.openlayer_base_url}/inference-pipelines"
        auth = {"Authorization": f"Bearer {OL_KEY}"}
        body: dict[str, Any] = {"rows": [{}], "config": {}}

        assert client.post(f"{base}/known/data-stream", json=body, headers=auth).status_code == 200
        assert_openlayer_error(client.post(f"{base}/{PIPELINE}/data-stream", json=body, headers=auth), 404)


# -- faults --------------------------------------------------------------------------------------------


def test_scripted_faults_answer_in_order_then_success(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.script("publish", [Fault(status=503, headers={"Retry-After": "1"}), Fault(status=429)])

    first, second, third = (publish(client, fake) for _ in range(3))

    assert first.status_code == 503
    assert first.headers["Retry-After"] == "1"
    assert_openlayer_error(first, 503)
    assert second.status_code == 429
    assert third.json() == {"success": True}
    assert [(r.status, r.fault) for r in fake.requests()] == [
        (503, "script:503"),
        (429, "script:429"),
        (200, None),
    ]
    assert fake.pending_script("publish") == 0


def test_scripts_are_per_endpoint(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.script("update_log", [Fault(status=500)])

    assert publish(client, fake).status_code == 200
    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200
    failed = update_log(client, fake, {"output": "x"})
    assert failed.status_code == 500
    assert "detail" in failed.json()


def test_fault_with_a_custom_body(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.script("publish", [Fault(status=502, body="<html>bad gateway</html>"), Fault(status=409, body={"x": 1})])

    gateway = publish(client, fake)
    conflict = publish(client, fake)

    assert (gateway.status_code, gateway.text) == (502, "<html>bad gateway</html>")
    assert gateway.headers["content-type"].startswith("text/plain")
    assert (conflict.status_code, conflict.json()) == (409, {"x": 1})


def test_reset_fault_breaks_the_connection(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.script("update_row", [Fault(reset=True)])

    with pytest.raises(TRANSPORT_BROKEN):
        update_row(client, fake, {"row": {"a": 1}})

    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200
    assert [(r.status, r.fault) for r in fake.requests()] == [(0, "script:reset"), (200, None)]


def test_delay_fault_makes_the_client_time_out(fake: FakeApiServer) -> None:
    fake.script("update_log", [Fault(status=200, delay_s=5.0)])

    with httpx.Client(timeout=0.2) as impatient, pytest.raises(httpx.ReadTimeout):
        update_log(impatient, fake, {"output": "x"})

    (received,) = fake.requests()
    assert received.fault == "script:200"


def test_slow_success_is_judged_normally(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.script("publish", [Fault(status=None, delay_s=0.05)])

    response = publish(client, fake)

    assert response.json() == {"success": True}
    assert fake.requests()[0].fault == "script:slow 0.05s"


def test_random_faults_follow_rate_and_seed(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.set_random_faults("publish", rate=1.0, choices=[Fault(status=500)])
    assert publish(client, fake).status_code == 500
    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200

    fake.set_random_faults("publish", rate=0.0)
    assert publish(client, fake).status_code == 200

    def statuses(server: FakeApiServer) -> list[int]:
        server.set_random_faults(None, rate=0.5, choices=[Fault(status=503), Fault(status=502)], seed=7)
        return [publish(client, server).status_code for _ in range(20)]

    with FakeApiServer(openlayer_key=OL_KEY) as twin:
        sequence = statuses(fake)
        assert sequence == statuses(twin)
    assert {200, 502, 503} == set(sequence)


def test_reject_when_rejects_marked_records_every_time(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.reject_when("publish", contains_key("__poison__"))

    poisoned = [{"output": "x", "__poison__": True}]
    assert_openlayer_error(publish(client, fake, poisoned), 422)
    assert_openlayer_error(publish(client, fake, poisoned), 422)
    assert publish(client, fake).status_code == 200
    assert [r.fault for r in fake.requests()] == ["rule:422", "rule:422", None]


def test_reject_when_runs_after_authentication(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.reject_when(None, lambda body: True, Fault(status=400))

    response = client.patch(f"{fake.humanloop_base_url}/logs", params={"reference_id": "r"}, json={})

    assert response.status_code == 401
    assert update_log(client, fake, {}).status_code == 400


def test_down_with_status_mode_answers_503_everywhere(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.set_down(None, True, mode=DownMode.STATUS)

    assert publish(client, fake).status_code == 503
    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 503
    assert update_log(client, fake, {}).status_code == 503

    fake.set_down(None, False)
    assert publish(client, fake).status_code == 200


def test_down_with_reset_and_hang_modes_break_connections(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.set_down("publish", True, mode=DownMode.RESET)
    with pytest.raises(TRANSPORT_BROKEN):
        publish(client, fake)

    fake.set_down("publish", True, mode=DownMode.HANG, hold_s=0.05)
    with pytest.raises(TRANSPORT_BROKEN):
        publish(client, fake)

    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200
    assert [r.fault for r in fake.requests("publish")] == ["down:reset", "down:reset"]


def test_latency_applies_to_every_call(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.set_latency(3600.0)  # longer than the test may run: only end_delays() lets these calls go on
    answers: list[httpx.Response] = []
    with httpx.Client(timeout=60.0) as patient:  # a bound for liveness only: end_delays() ends the wait
        calls = [
            threading.Thread(target=lambda: answers.append(publish(patient, fake))),
            threading.Thread(target=lambda: answers.append(update_log(patient, fake, {}))),
        ]
        for call in calls:
            call.start()
        fake.wait_for_delayed_calls(2)

        assert fake.count() == 0  # neither was judged yet: the latency comes before everything else
        assert fake.end_delays() == 2
        for call in calls:
            call.join()

    assert sorted(a.status_code for a in answers) == [200, 200]
    assert fake.delayed_calls() == 0
    fake.set_latency(0.001)  # a latency also ends by itself
    assert publish(client, fake).status_code == 200
    assert fake.end_delays() == 0


def test_clear_and_reset(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.script("publish", [Fault()])
    fake.set_latency(0.01)
    publish(client, fake)
    fake.clear()
    assert fake.requests() == []
    assert fake.count() == 0

    fake.script("publish", [Fault()])
    fake.set_down("update_row")
    fake.reset()
    assert publish(client, fake).status_code == 200
    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200
    assert fake.count("publish") == 1


def test_wait_for_requests(fake: FakeApiServer, client: httpx.Client) -> None:
    publish(client, fake)
    update_log(client, fake, {})
    assert [r.endpoint for r in fake.requests(since=1)] == ["update_log"]
    assert fake.requests("publish", since=1) == []

    assert len(fake.wait_for_requests(1, "update_log", timeout=1.0)) == 1
    with pytest.raises(TimeoutError):
        fake.wait_for_requests(2, where=lambda r: r.status == 500, timeout=0.05)


def test_counts_without_recording(client: httpx.Client) -> None:
    with FakeApiServer(openlayer_key=OL_KEY, record=False) as fake:
        publish(client, fake)
        publish(client, fake)

        assert fake.requests() == []
        assert fake.count("publish") == 2


async def test_serves_an_async_client_from_its_own_loop(fake: FakeApiServer) -> None:
    async with httpx.AsyncClient(timeout=5.0) as http:
        response = await http.patch(
            f"{fake.humanloop_base_url}/logs",
            params={"reference_id": "async"},
            json={"output": "ok"},
            headers={"X-API-KEY": HL_KEY},
        )

    assert response.json()["reference_id"] == "async"


def test_rejects_unknown_endpoint_names(fake: FakeApiServer) -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        fake.set_down("nope", True)  # type: ignore[arg-type]


def test_latency_changes_mid_run_for_the_next_call(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.set_latency(3600.0)  # longer than the test may run: only end_delays() lets this call go on
    slow: list[httpx.Response] = []
    with httpx.Client(timeout=60.0) as patient:  # a bound for liveness only: end_delays() ends the wait
        thread = threading.Thread(target=lambda: slow.append(publish(patient, fake, [{"call": "slow"}])))
        thread.start()
        fake.wait_for_delayed_calls(1)  # the slow call has arrived and is waiting out its latency

        fake.set_latency(0.0)
        assert publish(client, fake, [{"call": "fast"}]).status_code == 200
        assert fake.delayed_calls() == 1  # the slow call keeps the latency it arrived with
        assert fake.end_delays() == 1
        thread.join()

    assert slow[0].status_code == 200
    assert [r.json["rows"] for r in fake.requests()] == [[{"call": "fast"}], [{"call": "slow"}]]


# -- rate limit ----------------------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    now = 1024.0  # times exact in binary, so the sums below are too
    bucket = _TokenBucket(rate=4.0, capacity=4.0, now=now)

    assert [bucket.take(now) for _ in range(5)] == [True] * 4 + [False]
    assert bucket.take(now + 0.125) is False  # half a token
    assert bucket.take(now + 0.25) is True
    assert bucket.take(now + 0.25) is False
    assert [bucket.take(now + 60.0) for _ in range(5)] == [True] * 4 + [False]  # never more than capacity


def test_rate_limit_answers_429_with_retry_after_when_the_bucket_is_empty(
    fake: FakeApiServer, client: httpx.Client
) -> None:
    fake.set_rate_limit("openlayer", rate=0.5, capacity=3)

    answers = [publish(client, fake), update_row(client, fake, {"row": {"a": 1}}), publish(client, fake)]
    refused = publish(client, fake)
    refused_update = update_row(client, fake, {"row": {"a": 1}})

    assert [a.status_code for a in answers] == [200, 200, 200]  # one bucket for both Openlayer endpoints
    assert_openlayer_error(refused, 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused_update.status_code == 429
    assert update_log(client, fake, {}).status_code == 200  # Humanloop has no limit here
    assert [r.fault for r in fake.requests()] == [None, None, None, "ratelimit:429", "ratelimit:429", None]


def test_rate_limit_per_api_refills_and_can_be_removed(
    timed_fake: FakeApiServer, clock: ManualClock, client: httpx.Client
) -> None:
    fake = timed_fake
    fake.set_rate_limit(None, rate=1.0, capacity=2)
    assert [update_log(client, fake, {}).status_code for _ in range(2)] == [200] * 2
    refused = update_log(client, fake, {})
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert isinstance(refused.json()["detail"], str)  # Humanloop's error shape
    assert publish(client, fake).status_code == 200  # Openlayer's bucket is its own

    clock.advance(0.5)
    assert update_log(client, fake, {}).status_code == 429  # half a token
    clock.advance(0.5)
    assert update_log(client, fake, {}).status_code == 200  # a whole token again
    assert update_log(client, fake, {}).status_code == 429

    fake.set_rate_limit("humanloop", rate=None)
    assert [update_log(client, fake, {}).status_code for _ in range(20)] == [200] * 20


def test_rate_limit_comes_after_an_outage_and_before_authentication(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.set_rate_limit("humanloop", rate=0.01, capacity=1)
    fake.set_down("update_log")
    assert update_log(client, fake, {}).status_code == 503  # an outage takes no token
    fake.set_down("update_log", False)
    url = f"{fake.humanloop_base_url}/logs"
    assert client.patch(url, params={"reference_id": "r"}, json={}).status_code == 401  # takes the one token
    assert client.patch(url, params={"reference_id": "r"}, json={}).status_code == 429


# -- not yet -------------------------------------------------------------------------------------------


def test_not_yet_ids_answer_404_until_their_time_is_up(
    timed_fake: FakeApiServer, clock: ManualClock, client: httpx.Client
) -> None:
    fake = timed_fake
    fake.set_not_yet(share=1.0, seconds=2.0, seed=1)

    row = update_row(client, fake, {"row": {"a": 1}})
    log = update_log(client, fake, {"output": "x"})
    assert publish(client, fake).status_code == 200  # a publish addresses no existing id

    assert_openlayer_error(row, 404)
    assert "i-1" in row.json()["error"]
    assert log.status_code == 404
    assert "conv-1" in log.json()["detail"]
    clock.advance(1.0)
    assert update_row(client, fake, {"row": {"a": 1}}, params={"inferenceId": "i-2"}).status_code == 404
    clock.advance(0.5)
    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 404  # 1.5 s after i-1 was first seen
    clock.advance(0.5)
    assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200  # 2 s: asking again did not restart it
    assert update_log(client, fake, {"output": "x"}).status_code == 200
    assert update_row(client, fake, {"row": {"a": 1}}, params={"inferenceId": "i-2"}).status_code == 404  # 1 s
    clock.advance(1.0)
    assert update_row(client, fake, {"row": {"a": 1}}, params={"inferenceId": "i-2"}).status_code == 200
    faults = [r.fault for r in fake.requests()]
    assert faults == ["notyet:404", "notyet:404", None, "notyet:404", "notyet:404", None, None, "notyet:404", None]


def test_not_yet_picks_a_share_of_ids_by_seed(fake: FakeApiServer, client: httpx.Client) -> None:
    ids = [f"ref-{i}" for i in range(400)]
    chosen = {i for i in ids if not_yet_chosen(i, 0.3, 7)}
    assert 0.2 < len(chosen) / len(ids) < 0.4
    assert chosen == {i for i in ids if not_yet_chosen(i, 0.3, 7)}
    assert chosen != {i for i in ids if not_yet_chosen(i, 0.3, 8)}
    assert not any(not_yet_chosen(i, 0.0, 7) for i in ids)

    fake.set_not_yet(share=0.3, seconds=60, seed=7)
    statuses = {i: update_log(client, fake, {}, params={"reference_id": i}).status_code for i in ids[:40]}
    assert {i for i, status in statuses.items() if status == 404} == chosen & set(ids[:40])
    assert set(statuses.values()) == {200, 404}

    fake.set_not_yet(share=0.0, seconds=60)
    assert all(update_log(client, fake, {}, params={"reference_id": i}).status_code == 200 for i in ids[:40])


def test_not_yet_comes_after_authentication_and_validation(fake: FakeApiServer, client: httpx.Client) -> None:
    fake.set_not_yet(share=1.0, seconds=60)
    url = f"{fake.humanloop_base_url}/logs"

    assert client.patch(url, params={"reference_id": "r"}, json={}).status_code == 401
    assert update_log(client, fake, {"bad": 1}).status_code == 422
    assert update_log(client, fake, {}).status_code == 404


# -- keys ----------------------------------------------------------------------------------------------


def test_keys_change_at_runtime(fake: FakeApiServer, client: httpx.Client) -> None:
    url = f"{fake.openlayer_base_url}/inference-pipelines/{PIPELINE}/data-stream"
    body = {"rows": [], "config": CONFIG}

    fake.set_keys(openlayer=[], humanloop=[])  # a revoked key: nothing is accepted
    assert_openlayer_error(publish(client, fake), 401)
    assert update_log(client, fake, {}).status_code == 401

    fake.set_keys(openlayer="ol-new")
    assert_openlayer_error(publish(client, fake), 401)  # the old key stays refused
    assert client.post(url, json=body, headers={"Authorization": "Bearer ol-new"}).status_code == 200
    assert client.post(url, json=body, headers={"Authorization": "ol-new"}).status_code == 401
    assert update_log(client, fake, {}).status_code == 401  # Humanloop's keys were left as they were

    fake.set_keys(openlayer=[OL_KEY, "ol-new"], humanloop=HL_KEY)  # both, as during a rotation
    assert publish(client, fake).status_code == 200
    assert client.post(url, json=body, headers={"Authorization": "Bearer ol-new"}).status_code == 200
    assert update_log(client, fake, {}).status_code == 200

    fake.set_keys(openlayer="x", humanloop="y")
    fake.reset()
    assert publish(client, fake).status_code == 200
    assert update_log(client, fake, {}).status_code == 200


# -- control API ---------------------------------------------------------------------------------------


def test_control_api_drives_faults_and_reports_requests(fake: FakeApiServer, client: httpx.Client) -> None:
    with FakeApiControl(fake.base_url) as control:
        assert control.healthy()
        control.script("publish", [Fault(status=503, headers={"Retry-After": "2"})])
        control.apply(
            {"action": "reject_key", "endpoint": "update_row", "key": "bad"},
            {"action": "down", "endpoint": "update_log", "mode": "status"},
        )

        assert publish(client, fake).headers["Retry-After"] == "2"
        assert publish(client, fake).status_code == 200
        assert update_row(client, fake, {"row": {"bad": 1}}).status_code == 422
        assert update_log(client, fake, {}).status_code == 503

        recorded = control.requests("publish")
        assert [r["status"] for r in recorded] == [503, 200]
        assert recorded[1]["body"]["rows"] == [{"output": "42", "inferenceId": "i-1"}]
        assert recorded[1]["headers"]["authorization"] == f"Bearer {OL_KEY}"
        assert control.counts() == {"publish": 2, "update_row": 1, "update_log": 1}

        control.reset()
        assert control.requests() == []
        assert update_log(client, fake, {}).status_code == 200


def test_control_api_random_latency_and_clear(fake: FakeApiServer, client: httpx.Client) -> None:
    with FakeApiControl(fake.base_url) as control:
        control.apply({"action": "random", "endpoint": None, "rate": 1.0, "choices": [{"status": 504}]})
        assert update_row(client, fake, {"row": {"a": 1}}).status_code == 504
        control.apply({"action": "clear"}, {"action": "latency", "seconds": 0})
        assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200


def test_control_api_rate_limit_not_yet_and_keys(fake: FakeApiServer, client: httpx.Client) -> None:
    with FakeApiControl(fake.base_url) as control:
        control.apply(
            {"action": "rate_limit", "api": "openlayer", "rate": 0.01, "capacity": 1},
            {"action": "not_yet", "share": 1.0, "seconds": 60, "seed": 3},
            {"action": "keys", "humanloop": ["hl-a", "hl-b"]},
        )
        assert publish(client, fake).status_code == 200
        assert publish(client, fake).status_code == 429
        assert update_log(client, fake, {}).status_code == 401
        headers = {"X-API-KEY": "hl-b"}
        url = f"{fake.humanloop_base_url}/logs"
        assert client.patch(url, params={"reference_id": "r"}, json={}, headers=headers).status_code == 404

        control.apply({"action": "rate_limit", "api": None, "rate": 0}, {"action": "not_yet", "share": 0, "seconds": 0})
        assert publish(client, fake).status_code == 200
        assert client.patch(url, params={"reference_id": "r"}, json={}, headers=headers).status_code == 200
        assert [r["fault"] for r in control.requests()][1] == "ratelimit:429"

        control.apply(
            {"action": "rate_limit", "rate": 0.01, "capacity": 1}, {"action": "not_yet", "share": 1, "seconds": 60}
        )
        control.apply({"action": "clear"})  # clears the rate limits and the not-yet rule too
        assert [publish(client, fake).status_code for _ in range(3)] == [200] * 3
        assert update_row(client, fake, {"row": {"a": 1}}).status_code == 200


@pytest.mark.parametrize(
    "action",
    [
        pytest.param({"action": "explode"}, id="unknown-action"),
        pytest.param({"action": "rate_limit", "api": "nope", "rate": 1}, id="unknown-api"),
        pytest.param({"action": "rate_limit", "api": None, "rate": -1}, id="negative-rate"),
        pytest.param({"action": "not_yet", "share": 1.5, "seconds": 1}, id="bad-share"),
        pytest.param({"action": "not_yet", "share": 0.5}, id="no-seconds"),
        pytest.param({"action": "keys", "openlayer": 7}, id="key-not-string"),
        pytest.param({"action": "keys", "humanloop": ["a", 1]}, id="keys-not-strings"),
        pytest.param({"action": "script", "endpoint": "nope", "faults": []}, id="unknown-endpoint"),
        pytest.param({"action": "script", "endpoint": "publish", "faults": [{"stat": 1}]}, id="bad-fault"),
        pytest.param({"action": "random", "endpoint": None, "rate": 2}, id="bad-rate"),
        pytest.param("script", id="not-an-object"),
    ],
)
def test_control_api_refuses_bad_actions(fake: FakeApiServer, client: httpx.Client, action: Any) -> None:
    response = client.post(f"{fake.control_url}/faults", json=action)

    assert response.status_code == 400
    assert response.json()["error"]


def test_fault_json_round_trip() -> None:
    fault = Fault(status=429, body={"code": 429}, headers={"Retry-After": "3"}, delay_s=0.5)

    assert Fault.from_json(fault.to_json()) == fault
    assert Fault.from_json({}) == Fault()


def test_runs_as_a_process_until_sigterm(client: httpx.Client) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.support.fake_apis", "--port", "0", "--openlayer-key", OL_KEY]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            lines = dict(process.stdout.readline().strip().split("=", 1) for _ in range(3))
            response = client.post(
                f"{lines['OPENLAYER_BASE_URL']}/inference-pipelines/{PIPELINE}/data-stream",
                json={"rows": [], "config": {}},
                headers={"Authorization": f"Bearer {OL_KEY}"},
            )
            assert response.status_code == 200
            with FakeApiControl(lines["FAKE_APIS_URL"]) as control:
                assert control.counts()["publish"] == 1
        finally:
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=10)
    assert returncode == 0


# -- schema registry -----------------------------------------------------------------------------------

AVRO = {
    "type": "record",
    "name": "Inference",
    "fields": [{"name": "id", "type": "string"}, {"name": "output", "type": ["null", "string"]}],
}


@pytest.fixture
def registry() -> Iterator[FakeSchemaRegistry]:
    with FakeSchemaRegistry() as server:
        yield server


def test_registry_registers_and_serves_schemas(registry: FakeSchemaRegistry, client: httpx.Client) -> None:
    schema_id = registry.register("inference-value", AVRO)
    spaced = orjson.dumps(dict(reversed(AVRO.items())), option=orjson.OPT_INDENT_2).decode()

    assert registry.register("other-value", spaced) == schema_id
    response = client.get(f"{registry.url}/schemas/ids/{schema_id}")

    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    body = response.json()
    assert "schemaType" not in body
    assert orjson.loads(body["schema"]) == AVRO
    assert registry.request_count(schema_id) == 1


def test_registry_http_registration_and_subjects(registry: FakeSchemaRegistry, client: httpx.Client) -> None:
    headers = {"Content-Type": CONTENT_TYPE}
    text = orjson.dumps(AVRO).decode()
    first = client.post(f"{registry.url}/subjects/s-value/versions", json={"schema": text}, headers=headers)
    again = client.post(f"{registry.url}/subjects/s-value/versions", json={"schema": text}, headers=headers)
    other = client.post(f"{registry.url}/subjects/s-value/versions", json={"schema": '"string"'})

    assert first.json()["id"] == again.json()["id"]
    assert other.json()["id"] != first.json()["id"]
    assert client.get(f"{registry.url}/subjects").json() == ["s-value"]
    assert client.get(f"{registry.url}/subjects/s-value/versions").json() == [1, 2]
    latest = client.get(f"{registry.url}/subjects/s-value/versions/latest").json()
    assert latest == {"subject": "s-value", "version": 2, "id": other.json()["id"], "schema": '"string"'}
    assert client.get(f"{registry.url}/subjects/s-value/versions/1").json()["id"] == first.json()["id"]


def test_registry_errors(registry: FakeSchemaRegistry, client: httpx.Client) -> None:
    missing = client.get(f"{registry.url}/schemas/ids/99")
    no_subject = client.get(f"{registry.url}/subjects/nope/versions/latest")
    bad = client.post(f"{registry.url}/subjects/s/versions", json={"schema": "{not avro"})

    assert (missing.status_code, missing.json()) == (404, {"error_code": 40403, "message": "Schema not found"})
    assert missing.headers["content-type"] == CONTENT_TYPE
    assert (no_subject.status_code, no_subject.json()["error_code"]) == (404, 40401)
    assert (bad.status_code, bad.json()["error_code"]) == (422, 42201)
    assert registry.request_count(99) == 1


def test_registry_outage(registry: FakeSchemaRegistry, client: httpx.Client) -> None:
    schema_id = registry.register("inference-value", AVRO)
    url = f"{registry.url}/schemas/ids/{schema_id}"

    registry.set_down(True)
    assert client.get(url).status_code == 503
    registry.set_down(True, mode=DownMode.RESET)
    with pytest.raises(TRANSPORT_BROKEN):
        client.get(url)
    registry.set_down(False)
    assert client.get(url).status_code == 200
    assert registry.request_count(schema_id) == 3
