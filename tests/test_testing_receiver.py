"""Tests of xo_webhooks.testing.WebhookReceiver, driven by real HTTP clients."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from xo_webhooks.testing import JOIN_TIMEOUT, ReceivedHook, WebhookReceiver

from .helpers import POST, PRE

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

TIMEOUT = 5  # seconds, for every client call


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


def post(url: str, payload: object = PRE, **kwargs: object) -> requests.Response:
    return requests.post(url, json=payload, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


def test_records_request_and_answers_204_by_default(receiver: WebhookReceiver) -> None:
    response = post(receiver.url + "hook?x=1", headers={"X-Custom": "yes"})

    assert response.status_code == 204
    (hook,) = receiver.received
    assert isinstance(hook, ReceivedHook)
    assert hook.method == "POST"
    assert hook.path == "/hook?x=1"
    assert hook.headers["x-custom"] == "yes"
    assert hook.headers["content-type"] == "application/json"
    assert hook.payload == PRE
    assert hook.body == response.request.body
    assert (hook.status, hook.error) == (204, None)
    assert receiver.attempts == [hook]


def test_url_is_loopback_with_ephemeral_port(receiver: WebhookReceiver) -> None:
    assert receiver.url.startswith("http://127.0.0.1:")
    assert receiver.url.endswith("/")
    assert int(receiver.url.rsplit(":", 1)[1].rstrip("/")) > 0


def test_scripted_statuses_are_used_in_order_and_the_last_repeats(
    receiver: WebhookReceiver,
) -> None:
    receiver.respond_with(500, 503, 200)

    statuses = [post(receiver.url).status_code for _ in range(5)]

    assert statuses == [500, 503, 200, 200, 200]
    assert [h.status for h in receiver.attempts] == statuses
    assert [h.status for h in receiver.received] == [200, 200, 200]
    assert len(receiver.wait_for_attempts(5)) == 5


def test_close_drops_the_connection_without_answering(receiver: WebhookReceiver) -> None:
    receiver.respond_with("close", 204)

    with pytest.raises(requests.ConnectionError):
        post(receiver.url)
    assert post(receiver.url).status_code == 204

    assert [h.status for h in receiver.attempts] == [0, 204]
    assert len(receiver.received) == 1


def test_extra_response_headers(receiver: WebhookReceiver) -> None:
    receiver.respond_with(429, headers={"Retry-After": "1"})

    response = post(receiver.url)

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Content-Length"] == "0"


def test_callable_decides_each_answer(receiver: WebhookReceiver) -> None:
    seen: list[tuple[int, int]] = []

    def answer(number: int, hook: ReceivedHook) -> int:
        seen.append((number, hook.status))
        return 500 if number % 3 == 0 else 204

    receiver.respond_with(answer)
    statuses = [post(receiver.url).status_code for _ in range(6)]

    assert statuses == [204, 204, 500, 204, 204, 500]
    assert seen == [(n, 0) for n in range(1, 7)]
    assert len(receiver.wait_for(4)) == 4


def test_a_failing_callable_answers_500_and_fails_wait_for(receiver: WebhookReceiver) -> None:
    def answer(number: int, hook: ReceivedHook) -> int:
        raise RuntimeError("oops")

    receiver.respond_with(answer)

    assert post(receiver.url).status_code == 500
    with pytest.raises(AssertionError, match="callable failed: RuntimeError"):
        receiver.wait_for(1, timeout=5)


def test_a_callable_answering_nonsense_fails_wait_for(receiver: WebhookReceiver) -> None:
    receiver.respond_with(lambda number, hook: "drop")

    assert post(receiver.url).status_code == 500
    with pytest.raises(AssertionError, match="not 'drop'"):
        receiver.wait_for_attempts(1, timeout=5)


@pytest.mark.parametrize(
    "responses",
    [
        pytest.param((99,), id="status-too-low"),
        pytest.param(("drop",), id="unknown-word"),
        pytest.param((lambda n, h: 204, 200), id="callable-not-alone"),
    ],
)
def test_respond_with_rejects_bad_scripts(receiver: WebhookReceiver, responses: tuple) -> None:
    with pytest.raises(ValueError):
        receiver.respond_with(*responses)


def test_delay_is_interrupted_by_stop() -> None:
    arrived = threading.Event()
    errors: list[Exception] = []

    def answer(number: int, hook: ReceivedHook) -> int:
        arrived.set()  # called before the delay starts
        return 204

    receiver = WebhookReceiver().start()
    receiver.respond_with(answer, delay=600)

    def client() -> None:
        try:
            post(receiver.url)
        except requests.ConnectionError as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    assert arrived.wait(TIMEOUT)
    start = time.monotonic()
    receiver.stop()
    elapsed = time.monotonic() - start
    # Recorded only once the delay is over, and stop() has joined the connection thread:
    # a delay that stop() did not interrupt would still be running (600 s), unrecorded.
    assert [h.status for h in receiver.attempts] == [0]
    thread.join(TIMEOUT)

    assert not thread.is_alive()
    assert len(errors) == 1  # never answered
    # Structural above; this bound is generous: an uninterrupted delay would make stop()
    # give up on the thread only after JOIN_TIMEOUT.
    assert elapsed < JOIN_TIMEOUT


def test_delay_postpones_the_answer(receiver: WebhookReceiver) -> None:
    receiver.respond_with(204, delay=0.2)

    start = time.monotonic()
    post(receiver.url)

    assert time.monotonic() - start >= 0.2


def test_wait_for_returns_in_arrival_order(receiver: WebhookReceiver) -> None:
    post(receiver.url, PRE)
    post(receiver.url, POST)

    pre, post_ = receiver.wait_for(2)

    assert (pre.payload["type"], post_.payload["type"]) == ("pre", "post")


def test_wait_for_timeout_says_what_arrived(receiver: WebhookReceiver) -> None:
    receiver.respond_with(500, 204)
    post(receiver.url, PRE)
    post(receiver.url, POST)

    with pytest.raises(AssertionError) as info:
        receiver.wait_for(3, timeout=0.1)

    message = str(info.value)
    assert "expected 3 hook(s)" in message
    assert "2 request(s) arrived, 1 answered with 2xx" in message
    assert "vm.start pre callId=call-1 -> 500" in message
    assert "vm.start post callId=call-1 -> 204" in message


def test_wait_for_attempts_timeout(receiver: WebhookReceiver) -> None:
    with pytest.raises(AssertionError, match="expected 1 request"):
        receiver.wait_for_attempts(1, timeout=0.05)


def test_invalid_payload_fails_wait_for_at_once(receiver: WebhookReceiver) -> None:
    bad = {**PRE, "duration": 3}  # a pre hook has no duration

    post(receiver.url, bad)
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        receiver.wait_for(10, timeout=60)

    # Did not wait for the 10: a generous bound that a full 60 s wait cannot meet.
    assert time.monotonic() - start < 30
    assert "expected 10" not in str(info.value)  # failed on the payload, not on time
    assert "invalid hook payload (vm.start pre callId=call-1 -> 204)" in str(info.value)
    (hook,) = receiver.received
    assert hook.error is not None
    assert hook.error.startswith("$")


def test_invalid_payload_error_names_the_path(receiver: WebhookReceiver) -> None:
    post(receiver.url, {**PRE, "timestamp": "yesterday"})

    (hook,) = receiver.attempts

    assert hook.error == "$.timestamp: 'yesterday' is not of type 'integer'"


def test_no_validation_when_disabled() -> None:
    with WebhookReceiver(validate=False) as receiver:
        post(receiver.url, {**PRE, "duration": 3})

        (hook,) = receiver.wait_for(1)

    assert hook.error is None


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"text": "vm.start pre by alice", "blocks": []}, id="slack"),
        pytest.param({"@type": "MessageCard", "summary": "x"}, id="office365"),
        pytest.param([1, 2], id="list"),
    ],
)
def test_other_formats_are_not_validated(receiver: WebhookReceiver, body: object) -> None:
    post(receiver.url, body)

    (hook,) = receiver.wait_for(1)

    assert (hook.payload, hook.error) == (body, None)


def test_non_json_body_is_recorded_with_payload_none(receiver: WebhookReceiver) -> None:
    requests.post(receiver.url, data=b"not json", timeout=TIMEOUT)

    (hook,) = receiver.wait_for(1)

    assert (hook.body, hook.payload, hook.error) == (b"not json", None, None)


def test_chunked_body(receiver: WebhookReceiver) -> None:
    chunks = [b'{"type": "pre", "callId": "c", "userId": null, ', b'"userName": null, ',
              b'"method": "m", "params": {}, "timestamp": 0}']  # fmt: skip
    requests.post(receiver.url, data=iter(chunks), timeout=TIMEOUT)

    (hook,) = receiver.wait_for(1)

    assert hook.headers["transfer-encoding"] == "chunked"
    assert hook.payload["callId"] == "c"
    assert hook.error is None


def test_keep_alive_connections_are_reused(receiver: WebhookReceiver) -> None:
    receiver.respond_with(204, 500, 200, 204)
    with requests.Session() as session:
        for _ in range(10):
            session.post(receiver.url, json=PRE, timeout=TIMEOUT)
        pools = session.get_adapter(receiver.url).poolmanager.pools
        # RecentlyUsedContainer cannot be iterated, only its keys().
        opened = [pools[key].num_connections for key in pools.keys()]  # noqa: SIM118

        assert opened == [1]
    assert len(receiver.attempts) == 10


def test_clear_forgets_requests_but_keeps_the_script(receiver: WebhookReceiver) -> None:
    receiver.respond_with(202)
    post(receiver.url, {**PRE, "duration": 1})
    receiver.clear()

    assert receiver.received == receiver.attempts == []
    assert post(receiver.url).status_code == 202
    assert len(receiver.wait_for(1)) == 1  # the invalid payload is forgotten too


def test_received_is_a_copy(receiver: WebhookReceiver) -> None:
    post(receiver.url)
    receiver.received.clear()
    receiver.attempts.clear()

    assert len(receiver.received) == len(receiver.attempts) == 1


def test_stop_closes_idle_keep_alive_connections_and_is_idempotent() -> None:
    receiver = WebhookReceiver().start()
    port = int(receiver.url.rsplit(":", 1)[1].rstrip("/"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    connection.request("POST", "/", body=b"{}", headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    assert (response.status, response.will_close) == (204, False)  # an idle connection

    start = time.monotonic()
    receiver.stop()
    receiver.stop()
    elapsed = time.monotonic() - start

    # The server closed the idle connection: the client reads its end at once, where a
    # connection left open would give nothing until the idle timeout (30 s; TIMEOUT here).
    assert connection.sock is not None
    assert connection.sock.recv(1) == b""
    connection.close()
    assert elapsed < JOIN_TIMEOUT  # generous: a thread left reading would cost JOIN_TIMEOUT
    with pytest.raises(RuntimeError):
        _ = receiver.url


def test_url_before_start_raises() -> None:
    with pytest.raises(RuntimeError, match="start"):
        _ = WebhookReceiver().url


def test_many_concurrent_connections(receiver: WebhookReceiver) -> None:
    count = 150
    host, port = "127.0.0.1", int(receiver.url.rsplit(":", 1)[1].rstrip("/"))
    barrier = threading.Barrier(count)
    outcomes: list[int | BaseException] = []  # checked here, not in the client threads

    def client() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            connection.connect()
            barrier.wait(TIMEOUT)  # all connected before anyone sends
            headers = {"Content-Type": "application/json"}
            connection.request("POST", "/", body=b"{}", headers=headers)
            outcomes.append(connection.getresponse().status)
        except Exception as exc:
            outcomes.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)

    assert not any(thread.is_alive() for thread in threads)
    assert outcomes == [204] * count
    assert len(receiver.wait_for(count)) == count


@pytest.mark.slow
def test_4000_requests_on_8_kept_alive_connections_are_all_recorded(
    receiver: WebhookReceiver,
) -> None:
    # How fast it goes is the benchmark's business (bench/); here: nothing is dropped.
    per_connection, connections = 500, 8
    body = b'{"type":"pre","callId":"c","userId":null,"userName":null,"method":"m","params":{},"timestamp":0}'  # noqa: E501
    request = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    port = int(receiver.url.rsplit(":", 1)[1].rstrip("/"))

    errors: list[BaseException] = []  # checked here, not in the client threads

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                answers = sock.makefile("rb")
                for _ in range(per_connection):
                    sock.sendall(request)
                    while answers.readline() not in (b"\r\n", b""):  # a 204 ends here
                        pass
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(receiver.wait_for(per_connection * connections)) == per_connection * connections
    assert receiver.connections == connections
