"""Endpoints, their circuit breakers and the thread dispatcher's lanes, without I/O
(xo_webhooks._urls.endpoint_of, xo_webhooks.sending.endpoints, xo_webhooks.sending.lanes).

What they promise:

- an endpoint is a hook URL's origin, written one way only;
- a breaker opens after ``threshold`` consecutive outage failures (no answer, 5xx, 408,
  429); any other answer resets the count; 410 disables it for good; while open it
  lets one probe go after its pause, which doubles after each failed probe (at most
  ``MAX_PAUSE``); a successful probe closes it; it survives ``to_dict``/``from_dict``;
- each configured endpoint keeps ``queue_size // endpoints`` places of the bound: a
  lane under its share is never refused, one over it is told why, and borrowing never
  takes the total over ``queue_size``;
- ``take`` goes round-robin over the endpoints, at most ``concurrency`` in flight each.

Over real HTTP: test_isolation.py.
"""

from __future__ import annotations

import logging
import re
import time

import pytest

from xo_webhooks import load_settings
from xo_webhooks.sending import endpoints
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.endpoints import (
    MAX_PAUSE,
    Breaker,
    Gate,
    endpoint_of,
    log_transition,
    probe_lease,
)
from xo_webhooks.sending.lanes import Lane, Lanes
from xo_webhooks.sending.policy import Attempt, RetryPolicy

from .helpers import PRE

OK = Attempt(True, status=204)
S503 = Attempt(False, "HTTP 503", retryable=True, status=503)
S408 = Attempt(False, "HTTP 408", retryable=True, status=408)
S429 = Attempt(False, "HTTP 429", retryable=True, retry_after=1.0, status=429)
TIMEOUT = Attempt(False, "timed out after 2 s", retryable=True)
REFUSED = Attempt(False, "connection failed: connection refused", retryable=True)
S404 = Attempt(False, "HTTP 404", status=404)
S302 = Attempt(False, "HTTP 302", status=302)
S410 = Attempt(False, "HTTP 410", status=410)
#: No answer, for a reason of the hook's own: tells nothing about the endpoint.
NEUTRAL = Attempt(False, "cannot encode the payload: RecursionError")

NOW = 1_700_000_000.0
LEASE = 30.0


# -- endpoint_of ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        pytest.param("http://127.0.0.1:8080/hook?x=1", "http://127.0.0.1:8080", id="port-kept"),
        pytest.param("https://hooks.example.com/a/b", "https://hooks.example.com", id="no-port"),
        pytest.param("https://hooks.example.com:443/a", "https://hooks.example.com",
                     id="https-default-port-dropped"),
        pytest.param("http://hooks.example.com:80/", "http://hooks.example.com",
                     id="http-default-port-dropped"),
        pytest.param("https://host:80/", "https://host:80", id="http-port-on-https-kept"),
        pytest.param("http://host:443/", "http://host:443", id="https-port-on-http-kept"),
        pytest.param("HTTPS://Hooks.Example.COM/Path", "https://hooks.example.com",
                     id="scheme-and-host-lowercased"),
        pytest.param("http://[::1]:9000/x", "http://[::1]:9000", id="ipv6-bracketed"),
        pytest.param("https://[2001:DB8::1]/", "https://[2001:db8::1]", id="ipv6-default-port"),
        pytest.param("https://user:s3cret@host:8443/p", "https://host:8443",
                     id="credentials-dropped"),
        pytest.param("http://host", "http://host", id="no-path"),
    ],
)  # fmt: skip
def test_endpoint_of(url, origin):
    assert endpoint_of(url) == origin


def test_urls_of_one_origin_share_an_endpoint():
    urls = ["http://h:8080/a", "http://H:8080/b?c=d", "http://u:p@h:8080/"]
    assert {endpoint_of(url) for url in urls} == {"http://h:8080"}


# -- Breaker.record -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "transitions", "state", "failures"),
    [
        pytest.param([S503, S503, S503], [None, None, "opened"], "open", 3,
                     id="threshold-of-5xx-opens"),
        pytest.param([TIMEOUT, REFUSED, TIMEOUT], [None, None, "opened"], "open", 3,
                     id="no-answer-counts"),
        pytest.param([S408, S429, S503], [None, None, "opened"], "open", 3,
                     id="408-and-429-count"),
        pytest.param([S503, S503], [None, None], "closed", 2, id="under-threshold-stays-closed"),
        pytest.param([S503, S503, S404, S503, S503], [None] * 5, "closed", 2,
                     id="4xx-resets-the-count"),
        pytest.param([S503, S503, S302, S503, S503], [None] * 5, "closed", 2,
                     id="3xx-resets-the-count"),
        pytest.param([S503, S503, OK, S503, S503], [None] * 5, "closed", 2,
                     id="success-resets-the-count"),
        pytest.param([S404] * 6, [None] * 6, "closed", 0, id="4xx-never-opens"),
        pytest.param([S503, S503, NEUTRAL, S503], [None, None, None, "opened"], "open", 3,
                     id="neutral-neither-counts-nor-resets"),
        pytest.param([S503, S503, S503, S503, S503], [None, None, "opened", None, None],
                     "open", 5, id="failures-while-open-count-without-transition"),
        pytest.param([S410], ["disabled"], "disabled", 0, id="410-disables"),
        pytest.param([S503, S503, S503, S410], [None, None, "opened", "disabled"],
                     "disabled", 3, id="410-while-open-disables"),
        pytest.param([S410, OK, S503, S503, S503, S410], ["disabled"] + [None] * 5,
                     "disabled", 0, id="disabled-stays-disabled"),
    ],
)  # fmt: skip
def test_record_transitions(attempts, transitions, state, failures):
    breaker = Breaker(threshold=3)
    got = [breaker.record(attempt, NOW + n) for n, attempt in enumerate(attempts)]
    assert got == transitions
    assert (breaker.state, breaker.failures) == (state, failures)


def test_opening_notes_when_and_why():
    breaker = Breaker(threshold=2)
    breaker.record(S503, NOW)
    assert breaker.record(TIMEOUT, NOW + 1) == "opened"
    assert breaker.opened_at == NOW + 1
    assert breaker.pause == endpoints.FIRST_PAUSE
    assert breaker.probe_at == NOW + 1 + endpoints.FIRST_PAUSE
    assert breaker.last_error == "timed out after 2 s"


def test_a_delivery_without_a_status_closes_a_probe():
    """A sender of one's own may say delivered without an HTTP status."""
    breaker = opened(threshold=1)
    assert breaker.admit(breaker.probe_at, LEASE) is Gate.PROBE
    assert breaker.record(Attempt(True), NOW + 10) == "closed"


def test_a_success_notes_when():
    breaker = Breaker(threshold=2)
    assert breaker.record(OK, NOW) is None
    assert (breaker.state, breaker.last_success) == ("closed", NOW)
    breaker.record(S404, NOW + 5)  # an answer, not a delivery
    assert breaker.last_success == NOW


# -- Breaker.admit: waiting, probing, reopening, closing --------------------------------


def opened(threshold: int = 1, at: float = NOW) -> Breaker:
    """A breaker that opened at *at*."""
    breaker = Breaker(threshold)
    for _ in range(threshold):
        breaker.record(S503, at)
    assert breaker.state == "open"
    return breaker


@pytest.mark.parametrize(
    ("state_of", "gate"),
    [
        pytest.param(lambda: Breaker(3), Gate.SEND, id="closed-sends"),
        pytest.param(lambda: opened(), Gate.WAIT, id="open-waits"),
        pytest.param(lambda: Breaker(3, state="disabled"), Gate.GONE, id="disabled-gives-up"),
    ],
)
def test_admit_by_state(state_of, gate):
    assert state_of().admit(NOW + 1, LEASE) is gate


def test_admit_while_open_lets_one_probe_go_after_the_pause():
    breaker = opened()
    pause = endpoints.FIRST_PAUSE
    assert breaker.admit(NOW, LEASE) is Gate.WAIT
    assert breaker.admit(NOW + pause - 0.001, LEASE) is Gate.WAIT
    assert breaker.admit(NOW + pause, LEASE) is Gate.PROBE
    assert breaker.state == "half-open"
    # One probe at a time: the others wait, until the probe's lease has passed (its
    # sender may have died without reporting).
    assert breaker.admit(NOW + pause + 1, LEASE) is Gate.WAIT
    assert breaker.admit(NOW + pause + LEASE - 0.001, LEASE) is Gate.WAIT
    assert breaker.admit(NOW + pause + LEASE, LEASE) is Gate.PROBE
    assert breaker.admit(NOW + pause + LEASE + 1, LEASE) is Gate.WAIT


def test_a_failed_probe_reopens_with_the_pause_doubled_up_to_max_pause():
    breaker = opened()
    now, pauses = NOW, []
    for _ in range(9):
        now = breaker.probe_at
        assert breaker.admit(now - 0.001, LEASE) is Gate.WAIT
        assert breaker.admit(now, LEASE) is Gate.PROBE
        assert breaker.record(S503, now + 1) == "reopened"
        assert breaker.state == "open"
        assert breaker.probe_at == now + 1 + breaker.pause
        pauses.append(breaker.pause)
    first = endpoints.FIRST_PAUSE
    assert pauses == [min(MAX_PAUSE, first * 2**n) for n in range(1, 10)]
    assert pauses[-1] == MAX_PAUSE == 300
    assert breaker.opened_at == NOW  # the outage began when it first opened


def test_a_successful_probe_closes_and_clears_the_outage():
    breaker = opened(threshold=2)
    probe_time = breaker.probe_at
    assert breaker.admit(probe_time, LEASE) is Gate.PROBE
    assert breaker.record(OK, probe_time + 0.5) == "closed"
    assert breaker.state == "closed"
    assert (breaker.opened_at, breaker.pause, breaker.failures) == (None, 0, 0)
    assert breaker.last_success == probe_time + 0.5
    assert breaker.admit(probe_time + 1, LEASE) is Gate.SEND


def test_an_answer_that_is_not_an_outage_closes_a_probe_too():
    breaker = opened()
    assert breaker.admit(breaker.probe_at, LEASE) is Gate.PROBE
    assert breaker.record(S404, breaker.probe_at) == "closed"
    assert breaker.last_success is None  # up, but nothing was delivered


def test_a_neutral_probe_result_lets_another_probe_go_at_once():
    breaker = opened()
    probe_time = breaker.probe_at
    assert breaker.admit(probe_time, LEASE) is Gate.PROBE
    assert breaker.record(NEUTRAL, probe_time + 1) is None
    assert breaker.state == "half-open"
    assert breaker.admit(probe_time + 1, LEASE) is Gate.PROBE  # not after the lease


def test_the_first_pause_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 0.2)
    breaker = opened()
    assert breaker.probe_at == NOW + 0.2
    assert breaker.admit(NOW + 0.2, LEASE) is Gate.PROBE


def test_probe_lease_outlasts_an_attempt():
    assert probe_lease(2) == 14
    assert probe_lease(10) > 2 * 10


# -- Breaker.unavailable and the store's round trip -------------------------------------

WHEN = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW))


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        pytest.param(
            Breaker(1, state="open", opened_at=NOW, last_error="HTTP 503"),
            f"endpoint https://h unavailable since {WHEN} (last error: HTTP 503)",
            id="open",
        ),
        pytest.param(
            Breaker(1, state="half-open", opened_at=NOW, last_error="timed out after 2 s"),
            f"endpoint https://h unavailable since {WHEN} (last error: timed out after 2 s)",
            id="half-open",
        ),
        pytest.param(
            Breaker(1, state="disabled", gone_at=NOW, last_error="HTTP 410"),
            f"endpoint https://h is gone: it answered 410 Gone at {WHEN}",
            id="disabled",
        ),
        pytest.param(
            Breaker(1, state="open"),
            "endpoint https://h unavailable since an unknown time (last error: None)",
            id="open-without-time",
        ),
    ],
)
def test_unavailable(breaker, message):
    assert breaker.unavailable("https://h") == message


@pytest.mark.parametrize(
    "breaker",
    [
        pytest.param(Breaker(5), id="fresh"),
        pytest.param(Breaker(5, failures=3, last_error="HTTP 502", last_success=NOW - 9),
                     id="closed-with-failures"),
        pytest.param(opened(threshold=2), id="open"),
        pytest.param(Breaker(2, state="half-open", failures=4, opened_at=NOW, probe_at=NOW + 5,
                             probe_until=NOW + 19, pause=10.0, last_error="HTTP 503"),
                     id="half-open"),
        pytest.param(Breaker(5, state="disabled", gone_at=NOW, last_error="HTTP 410"),
                     id="disabled"),
    ],
)  # fmt: skip
def test_to_dict_from_dict_round_trip(breaker):
    fields = breaker.to_dict()
    assert fields == {**fields, "threshold": breaker.threshold, "state": breaker.state}
    assert Breaker.from_dict(breaker.threshold, fields) == breaker
    # The threshold is the caller's setting; fields a newer version stored are ignored.
    again = Breaker.from_dict(9, {**fields, "threshold": 1, "from_the_future": True})
    assert again == Breaker(9, **{k: v for k, v in fields.items() if k != "threshold"})


# -- Lanes: the fair share of the bound -------------------------------------------------


def lanes_of(urls: list[str], **settings) -> Lanes:
    hooks = [{"method": "*", "type": "pre", "url": url} for url in urls]
    loaded = load_settings(hooks, {}, **settings)
    return Lanes(loaded, RetryPolicy.from_settings(loaded))


def delivery_to(url: str, call_id: str = "c", attempts: int = 0) -> Delivery:
    hook = load_settings([{"method": "*", "type": "pre", "url": url}], {}).hooks[0]
    return Delivery(hook, {**PRE, "callId": call_id}, attempts=attempts)


def offer(lanes: Lanes, url: str, call_id: str = "c", now: float = 0.0) -> str | None:
    """Submit a hook to *lanes* as the dispatcher does; return why it is refused, or
    ``None`` once accepted (and counted)."""
    delivery = delivery_to(url, call_id)
    lane = lanes.of(delivery)
    refusal = lanes.refusal(lane)
    if refusal is None:
        lanes.count(lane, +1)
        lanes.put(lane, delivery, now)
    return refusal


def lane(lanes: Lanes, url: str) -> Lane:
    return lanes.of(delivery_to(url))


A, B, C = "http://127.0.0.1:7001/a", "http://127.0.0.1:7002/b", "http://127.0.0.1:7003/c"


@pytest.mark.parametrize(
    ("urls", "queue_size", "shares"),
    [
        pytest.param([A], 10, {"http://127.0.0.1:7001": 10}, id="one-endpoint-has-it-all"),
        pytest.param([A, B], 10, {"http://127.0.0.1:7001": 5, "http://127.0.0.1:7002": 5},
                     id="two-halves"),
        pytest.param([A, B, C], 10, dict.fromkeys(map(endpoint_of, [A, B, C]), 3),
                     id="rounded-down"),
        pytest.param([A, A + "/other", "http://127.0.0.1:7001/x?y=1", B], 10,
                     {"http://127.0.0.1:7001": 5, "http://127.0.0.1:7002": 5},
                     id="paths-of-one-origin-count-once"),
        pytest.param(["http://h/a", "http://h:80/b", "https://h/c"], 9,
                     {"http://h": 4, "https://h": 4}, id="default-port-and-scheme"),
        pytest.param([A, B, C], 2, dict.fromkeys(map(endpoint_of, [A, B, C]), 0),
                     id="more-endpoints-than-places"),
    ],
)  # fmt: skip
def test_share_is_the_bound_divided_by_the_configured_endpoints(urls, queue_size, shares):
    lanes = lanes_of(urls, queue_size=queue_size)
    assert list(lanes.stats()) == list(shares)
    assert {origin: lane(lanes, origin + "/").share for origin in shares} == shares


def test_a_lane_under_its_share_is_accepted_when_another_filled_the_rest():
    lanes = lanes_of([A, B], queue_size=11)  # 5 each, 1 free
    assert [offer(lanes, A, f"a{n}") for n in range(6)] == [None] * 6  # its 5 and the free one
    assert lanes.pending == 6
    assert [offer(lanes, B, f"b{n}") for n in range(5)] == [None] * 5  # kept for B
    assert lanes.pending == 11


def test_an_over_share_lane_is_told_why():
    lanes = lanes_of([A, B], queue_size=10)
    for n in range(5):
        assert offer(lanes, A, f"a{n}") is None
    refusal = offer(lanes, A, "a5")
    assert refusal == (
        "queue full for endpoint http://127.0.0.1:7001: it has 5 hooks pending, its share "
        "of XO_WEBHOOKS_QUEUE_SIZE=10 is 5, and the places left are kept for other endpoints"
    )
    assert (lanes.pending, lane(lanes, A).pending, lane(lanes, B).pending) == (5, 5, 0)


def test_a_full_queue_says_so():
    lanes = lanes_of([A, B], queue_size=4)
    for url in (A, A, B, B):
        assert offer(lanes, url) is None
    assert offer(lanes, A) == offer(lanes, B) == offer(lanes, C) == "queue full"


def test_finished_hooks_free_their_places():
    lanes = lanes_of([A, B], queue_size=4)
    for _ in range(2):
        offer(lanes, A)
    assert offer(lanes, A, "late").startswith("queue full for endpoint")
    lanes.count(lane(lanes, A), -1)
    assert offer(lanes, A, "late") is None


def test_with_no_endpoint_configured_every_place_is_free():
    lanes = lanes_of([], queue_size=2)
    assert [offer(lanes, A), offer(lanes, B), offer(lanes, A)] == [None, None, "queue full"]


def test_an_unconfigured_endpoint_only_borrows_free_places():
    lanes = lanes_of([A, B, C], queue_size=10)  # 3 each, 1 free
    replayed = "http://127.0.0.1:7999/replayed"
    assert offer(lanes, replayed) is None
    assert lane(lanes, replayed).share == 0
    assert offer(lanes, replayed).startswith("queue full for endpoint http://127.0.0.1:7999")
    for url in (A, B, C):  # each keeps its share
        assert [offer(lanes, url) for _ in range(3)] == [None] * 3
    assert lanes.pending == 10


@pytest.mark.parametrize(
    ("order", "queue_size"),
    [
        pytest.param("A" * 30 + "B" * 30 + "C" * 30, 10, id="one-after-another"),
        pytest.param("ABC" * 30, 10, id="interleaved"),
        pytest.param("A" * 20 + "BCX" * 20, 7, id="with-an-unconfigured-endpoint"),
        pytest.param("XXXX" + "AB" * 20, 5, id="unconfigured-first"),
        pytest.param("AAB" * 10 + "C" * 10, 2, id="fewer-places-than-endpoints"),
    ],
)
def test_borrowing_never_takes_the_total_over_the_bound(order, queue_size):
    urls = {"A": A, "B": B, "C": C, "X": "http://127.0.0.1:7999/"}
    lanes = lanes_of([A, B, C], queue_size=queue_size)
    accepted = dict.fromkeys(urls, 0)
    for n, name in enumerate(order):
        if offer(lanes, urls[name], f"c{n}") is None:
            accepted[name] += 1
        assert lanes.pending == sum(accepted.values()) <= queue_size
    share = queue_size // 3
    for name in "ABC":  # every configured endpoint got at least its share
        assert accepted[name] >= min(share, order.count(name))
    # No place wasted: the only ones left empty are kept for endpoints under their share.
    kept = sum(max(0, share - accepted[name]) for name in "ABC")
    assert lanes.pending + kept == queue_size


# -- Lanes: choosing the next hook ------------------------------------------------------


def taken(lanes: Lanes, now: float = NOW) -> list[str]:
    """The call ids ``take`` hands out until it has none."""
    out = []
    while (work := lanes.take(now, LEASE)) is not None:
        out.append(work[1].call_id)
    return out


def test_take_alternates_endpoints_and_respects_concurrency():
    lanes = lanes_of([A, B, C], max_workers=4, endpoint_concurrency=2)
    for n in range(4):
        offer(lanes, A, f"a{n}")
        offer(lanes, B, f"b{n}")
    offer(lanes, C, "c0")
    assert taken(lanes) == ["a0", "b0", "c0", "a1", "b1"]  # then A and B are at 2 in flight
    assert [lane(lanes, url).in_flight for url in (A, B, C)] == [2, 2, 1]
    lane(lanes, B).in_flight -= 1  # an attempt to B ended
    assert taken(lanes) == ["b2"]
    lane(lanes, A).in_flight -= 1
    lane(lanes, B).in_flight -= 1
    assert taken(lanes) == ["a2", "b3"]  # B went last: A's turn first


@pytest.mark.parametrize("concurrency", [1, 3])
def test_take_keeps_each_endpoint_to_its_concurrency(concurrency):
    lanes = lanes_of([A, B], max_workers=8, endpoint_concurrency=concurrency)
    for n in range(5):
        offer(lanes, A, f"a{n}")
    assert taken(lanes) == [f"a{n}" for n in range(concurrency)]
    offer(lanes, B, "b0")
    assert taken(lanes) == ["b0"]  # a hung A does not hold B up


def test_take_keeps_an_endpoints_order():
    lanes = lanes_of([A], max_workers=8, endpoint_concurrency=8)
    for n in range(5):
        offer(lanes, A, f"a{n}")
    assert taken(lanes) == ["a0", "a1", "a2", "a3", "a4"]


def test_take_sends_one_probe_to_an_open_endpoint(monkeypatch):
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 5.0)
    lanes = lanes_of([A, B], max_workers=8, endpoint_concurrency=4, breaker_threshold=1)
    assert lane(lanes, A).breaker.record(S503, NOW) == "opened"
    for n in range(3):
        offer(lanes, A, f"a{n}")
        offer(lanes, B, f"b{n}")
    assert taken(lanes, NOW + 1) == ["b0", "b1", "b2"]  # A waits for its probe
    assert taken(lanes, NOW + 5) == ["a0"]  # the probe, and only it
    assert lane(lanes, A).breaker.state == "half-open"
    assert taken(lanes, NOW + 6) == []


# -- Lanes: how long a hook waits for an endpoint that is down --------------------------


def test_waiting_hooks_expire_when_their_schedule_has_run_out():
    lanes = lanes_of([A, B], retry_schedule="1s,1s,2s", breaker_threshold=1)
    a = lane(lanes, A)
    offer(lanes, A, "fresh", now=100.0)
    retried = delivery_to(A, "retried", attempts=2)
    lanes.count(a, +1)
    lanes.put(a, retried, 100.0)
    assert a.deadlines == {}  # closed: nothing expires
    assert a.breaker.record(S503, NOW) == "opened"
    lanes.park(a, 100.0)  # the dispatcher does so when it opens
    assert len(a.waited) == 2
    later = delivery_to(A, "later", attempts=1)
    lanes.count(a, +1)
    lanes.put(a, later, 101.0)  # waits from 101: 3 s of its schedule left
    assert len(a.waited) == 3
    assert lanes.expired(101.999) == []
    assert [(x.origin, d.call_id) for x, d in lanes.expired(102.0)] == [
        ("http://127.0.0.1:7001", "retried")
    ]  # 2 s left after 2 attempts
    assert [d.call_id for _, d in lanes.expired(104.0)] == ["fresh", "later"]
    assert a.waiting == {} and a.deadlines == {}
    assert lanes.next_wake(104.0, NOW) is None


def test_hooks_no_longer_expire_once_the_endpoint_closed():
    lanes = lanes_of([A], retry_schedule=[1, 1], breaker_threshold=1)
    a = lane(lanes, A)
    a.breaker.record(S503, NOW)
    offer(lanes, A, "waiting", now=0.0)
    assert lanes.next_wake(0.0, NOW) == pytest.approx(2.0)  # its give-up time comes first
    a.breaker.record(OK, NOW + 1)
    lanes.unpark(a)
    assert lanes.expired(1000.0) == []
    assert taken(lanes, NOW + 1) == ["waiting"]


def test_next_wake_is_the_probe_when_it_comes_first():
    lanes = lanes_of([A], retry_schedule=[3600], breaker_threshold=1)
    a = lane(lanes, A)
    a.breaker.record(S503, NOW)
    offer(lanes, A, "waiting", now=0.0)
    assert lanes.next_wake(0.0, NOW) == pytest.approx(endpoints.FIRST_PAUSE)
    assert lanes.next_wake(0.0, NOW + 3 * endpoints.FIRST_PAUSE) == 0.0


def test_a_closed_endpoint_that_waits_for_a_free_slot_sets_no_wake():
    """Its hooks wait for an attempt in flight to end, which notifies: a wake-up time
    here would make the workers spin."""
    lanes = lanes_of([A], endpoint_concurrency=1)
    offer(lanes, A, "first")
    offer(lanes, A, "second")
    assert taken(lanes) == ["first"]
    assert lane(lanes, A).waiting and lanes.next_wake(0.0, NOW) is None


def test_unpark_keeps_the_deadlines_of_other_endpoints():
    lanes = lanes_of([A, B], retry_schedule=[1], breaker_threshold=1)
    for url, call_id in ((A, "to-a"), (B, "to-b")):
        lane(lanes, url).breaker.record(S503, NOW)
        offer(lanes, url, call_id, now=0.0)
    lane(lanes, A).breaker.record(OK, NOW + 1)
    lanes.unpark(lane(lanes, A))
    assert [d.call_id for _, d in lanes.expired(1.0)] == ["to-b"]


def test_transition_lines(caplog):
    caplog.set_level(logging.DEBUG, logger=endpoints.logger.name)
    breaker = opened(threshold=1)
    log_transition(A, breaker, "opened", None, 0, 0)
    log_transition(A, breaker, "reopened", NOW, 0, 0)
    log_transition(A, breaker, "closed", time.time() - 12, 3, 0)
    log_transition(A, breaker, "disabled", None, 0, 4)
    log_transition(A, breaker, None, None, 0, 0)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [
        logging.WARNING, logging.DEBUG, logging.INFO, logging.ERROR,
    ]  # fmt: skip
    assert lines[1][1].endswith("is still down; next probe in 5 s")
    assert re.search(r"is back after 1[23] s down; 3 hook\(s\) waited meanwhile", lines[2][1])
    assert "that hook and 4 waiting one(s) dead-lettered now" in lines[3][1]


def test_lane_stats_name_every_field():
    lanes = lanes_of([A])
    assert lanes.stats() == {
        "http://127.0.0.1:7001": {
            "state": "closed", "pending": 0, "delivered": 0, "failed": 0,
            "consecutive_failures": 0, "last_error": None, "last_success": None,
            "opened_at": None,
        }
    }  # fmt: skip
