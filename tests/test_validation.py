"""Validated payloads (``XO_WEBHOOKS_VALIDATE``, :mod:`xo_webhooks.sending.validation`),
and the faults the request path catches before a payload is built.

What it promises:

- with validation on (off by default: it nearly doubles a delivery's CPU), a ``json``
  payload the schema rejects is never sent: no request reaches the receiver; the hook
  is given up at once (reason ``invalid_payload``), dead-lettered with the schema error
  (its JSON path and message) as ``lastError`` and counted failed; the endpoint's
  breaker learns nothing;
- the warning is logged once per method, not once per hook;
- off (the default, or ``XO_WEBHOOKS_VALIDATE=0``), it is sent; the ``slack`` and
  ``office365`` formats are never checked;
- the Celery worker shares the sender, so it checks alike;
- a ``user_resolver`` result (or ``environ["xo_webhooks.user"]``) with a number or UUID
  id has it converted with ``str()``; anything else that is not ``(str | None, str |
  None)`` is logged once and sends no user;
- ``middleware.call()`` rejects an empty method (``ValueError``) and scalar params
  (``TypeError``), converts a tuple or a mapping.
"""

from __future__ import annotations

import logging
import types
import uuid
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder

from xo_webhooks import Hook, WebhookMiddleware, load_settings
from xo_webhooks.schema import validate_payload
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.delivery import Delivery, Sender
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.policy import GIVE_UP_REASONS
from xo_webhooks.sending.validation import INVALID_PAYLOAD
from xo_webhooks.testing import WebhookReceiver

from .apps import CALL, plain_app
from .helpers import POST, PRE, RecordingDispatcher, assert_ledger

VALIDATION_LOGGER = "xo_webhooks.sending.validation"
FAILED_POST = {k: v for k, v in POST.items() if k != "result"}
BAD_USER_ID = "invalid payload at $.userId: expected string or null, got integer"


@pytest.fixture
def receiver():
    """A receiver that records what it gets without checking it: a test here must see
    an invalid payload arrive when it is meant to."""
    with WebhookReceiver(validate=False) as receiver:
        yield receiver


def sender(**settings: Any) -> Sender:
    """A sender that validates (the default), unless told otherwise."""
    return Sender(load_settings([], {}, **{"validate": True, **settings}))


def delivery(url: str, payload: dict[str, Any], fmt: str = "json") -> Delivery:
    return Delivery(Hook(method="vm.*", type="pre/post", url=url, format=fmt), payload)


def validation_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == VALIDATION_LOGGER]


# -- the sender -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, error",
    [
        pytest.param({**PRE, "userId": 42}, BAD_USER_ID, id="integer-user-id"),
        pytest.param(
            {**PRE, "params": "nightly"},
            "invalid payload at $.params: expected object or array, got string",
            id="scalar-params",
        ),
        pytest.param(
            {**PRE, "method": ""},
            "invalid payload at $.method: must not be empty",
            id="empty-method",
        ),
        pytest.param(
            {**POST, "error": {"code": 13, "message": "locked"}},  # and its result
            "invalid payload at $: must have exactly one of result or error",
            id="result-and-error",
        ),
        pytest.param(
            {**FAILED_POST, "error": {"code": "E42", "message": "locked"}},
            "invalid payload at $.error.code: expected integer, got string",
            id="string-error-code",
        ),
        pytest.param(
            {**PRE, "duration": 5},
            "invalid payload at $.duration: not allowed in a pre hook",
            id="pre-with-duration",
        ),
        pytest.param(  # a value the schema rejects is never quoted: it may be a secret
            {**PRE, "params": "password=hunter2"},
            "invalid payload at $.params: expected object or array, got string",
            id="value-not-quoted",
        ),
        pytest.param(
            {**PRE, "extra": 1},
            "invalid payload at $: Additional properties are not allowed ('extra' was unexpected)",
            id="unknown-field",
        ),
    ],
)
def test_an_invalid_payload_is_not_sent_and_its_attempt_is_final(receiver, payload, error):
    hook = delivery(receiver.url, payload)
    attempt = sender().send(hook)
    assert (attempt.delivered, attempt.retryable, attempt.status) == (False, False, None)
    assert (attempt.error, attempt.reason) == (error, INVALID_PAYLOAD)
    assert hook.body is None  # never serialised, never signed
    assert receiver.attempts == []  # no request at all: send() is synchronous


def test_the_give_up_reason_is_a_known_one():
    assert INVALID_PAYLOAD in GIVE_UP_REASONS


def test_a_payload_is_checked_as_sent_after_redaction(receiver):
    # Redaction replaces values inside params, never their type: still valid, and sent.
    payload = {**PRE, "params": {"password": "hunter2", "id": "vm-1"}}
    attempt = sender(redact=["password"]).send(delivery(receiver.url, payload))
    assert attempt.delivered
    (received,) = receiver.wait_for(1)
    assert received.payload["params"] == {"password": "***", "id": "vm-1"}


def test_valid_payloads_are_sent(receiver):
    checked = sender()
    for payload in (PRE, POST):
        assert checked.send(delivery(receiver.url, payload)).delivered
    assert [h.payload for h in receiver.wait_for(2)] == [PRE, POST]


def test_the_warning_is_logged_once_per_method(receiver, caplog):
    checked = sender()
    caplog.set_level(logging.WARNING, VALIDATION_LOGGER)
    for method in ("vm.start", "vm.start", "vm.stop", "vm.start"):
        attempt = checked.send(delivery(receiver.url, {**PRE, "method": method, "userId": 42}))
        assert attempt.reason == INVALID_PAYLOAD
    lines = validation_warnings(caplog)
    assert len(lines) == 2, lines
    assert "vm.start" in lines[0] and BAD_USER_ID in lines[0]
    assert "vm.stop" in lines[1]
    assert receiver.attempts == []


@pytest.mark.parametrize(
    "settings, environ",
    [
        pytest.param({"validate": False}, {}, id="kwarg"),
        pytest.param({}, {"XO_WEBHOOKS_VALIDATE": "0"}, id="env-0"),
    ],
)
def test_validation_off_sends_an_invalid_payload(receiver, settings, environ):
    unchecked = Sender(load_settings([], environ, **settings))
    assert unchecked.check is None
    assert unchecked.send(delivery(receiver.url, {**PRE, "userId": 42})).delivered
    (received,) = receiver.wait_for(1)
    assert received.payload["userId"] == 42


@pytest.mark.parametrize("fmt", ["slack", "office365"])
def test_other_formats_are_not_checked(receiver, fmt, caplog):
    # Their bodies are not hook payloads: the schema says nothing about them.
    assert sender().send(delivery(receiver.url, {**PRE, "userId": 42}, fmt)).delivered
    (received,) = receiver.wait_for(1)
    assert received.payload is not None and "type" not in received.payload
    assert validation_warnings(caplog) == []


# -- through the thread dispatcher ----------------------------------------------------------


class GiveUps:
    """An observer that notes why each hook was given up on."""

    def __init__(self) -> None:
        self.reasons: list[str | None] = []

    def given_up(self, origin: str, delivery: Delivery, record: dict[str, Any]) -> None:
        self.reasons.append(delivery.reason)


def test_an_invalid_hook_is_dead_lettered_counted_and_logged_once(receiver, tmp_path, caplog):
    dead = tmp_path / "dead.jsonl"
    hooks = [{"method": "vm.*", "type": "pre/post", "url": receiver.url}]
    settings = load_settings(
        hooks, {}, dead_letter=str(dead), retries=3, backoff=0.01, validate=True
    )
    dispatcher = ThreadDispatcher(settings)
    give_ups = GiveUps()
    dispatcher.observers.add(give_ups)
    caplog.set_level(logging.WARNING, VALIDATION_LOGGER)
    try:
        target = settings.hooks[0]
        for call_id in ("call-1", "call-2"):  # two hooks of one method
            dispatcher.submit(Delivery(target, {**PRE, "callId": call_id, "userId": 42}))
        dispatcher.submit(Delivery(target, {**PRE, "callId": "call-3"}))  # a valid one
        assert dispatcher.flush(10)
        stats = dispatcher.stats()
        (endpoint,) = dispatcher.endpoint_stats().values()
    finally:
        dispatcher.close(5)
    (received,) = receiver.wait_for(1)
    assert received.payload["callId"] == "call-3"  # the invalid ones never left
    assert [r.payload["callId"] for r in receiver.attempts] == ["call-3"]
    records = read_records(str(dead))
    assert sorted(r["payload"]["callId"] for r in records) == ["call-1", "call-2"]
    assert {(r["lastError"], r["attempts"]) for r in records} == {(BAD_USER_ID, 1)}
    assert give_ups.reasons == [INVALID_PAYLOAD, INVALID_PAYLOAD]
    assert (stats["delivered"], stats["failed"], stats["dead_lettered"]) == (1, 2, 2)
    assert stats["retried"] == 0
    assert_ledger(stats)
    assert (endpoint["state"], endpoint["consecutive_failures"]) == ("closed", 0)
    (line,) = validation_warnings(caplog)
    assert "vm.start" in line and BAD_USER_ID in line


def test_the_celery_worker_checks_alike(redis_server, receiver, tmp_path):
    pytest.importorskip("celery", reason="the celery extra is not installed")
    from xo_webhooks.sending.celery import Worker

    dead = tmp_path / "dead.jsonl"
    hooks = [{"method": "vm.*", "type": "pre/post", "url": receiver.url}]
    worker = Worker(
        load_settings(hooks, {}, broker_url=redis_server.url, dead_letter=str(dead), validate=True)
    )
    give_ups = GiveUps()
    worker.observers.add(give_ups)
    message = Delivery(worker.settings.hooks[0], {**PRE, "userId": 42}).to_message()
    try:
        assert worker.run(None, message) == "failed"  # a final attempt: no retry to ask for
    finally:
        if worker._markers is not None:
            worker._markers.close()
    assert receiver.attempts == []
    (record,) = read_records(str(dead))
    assert (record["id"], record["lastError"]) == (message["id"], BAD_USER_ID)
    assert give_ups.reasons == [INVALID_PAYLOAD]


# -- caught on the request path -------------------------------------------------------------


def resolved_user(resolver: Any, requests: int = 1) -> tuple[Any, Any]:
    dispatcher = RecordingDispatcher()
    hooks = [{"method": "vm.start", "type": "pre", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(
        plain_app, hooks=hooks, dispatcher=dispatcher, environ={}, user_resolver=resolver
    )
    for _ in range(requests):
        environ = EnvironBuilder(method="POST", json=CALL).get_environ()
        b"".join(middleware(environ, lambda *a: None))
    pre = dispatcher.payloads("pre")[-1]
    validate_payload(pre)
    return pre["userId"], pre["userName"]


ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    "user, expected",
    [
        pytest.param(("u-1", "alice"), ("u-1", "alice"), id="strings"),
        pytest.param(["u-1", None], ("u-1", None), id="list-with-null"),
        pytest.param((None, None), (None, None), id="nulls"),
        pytest.param(None, (None, None), id="none"),
        pytest.param((42, "alice"), ("42", "alice"), id="integer-id-converted"),
        pytest.param((ID, "alice"), (str(ID), "alice"), id="uuid-id-converted"),
        pytest.param((4.5, None), (None, None), id="float-id-dropped"),
    ],
)
def test_a_usable_user_resolver_result(user, expected):
    assert resolved_user(lambda environ: user) == expected


@pytest.mark.parametrize(
    "user, why",
    [
        pytest.param("alice", "expected (user_id, user_name) or None, got str", id="a-str"),
        pytest.param({"id": 1}, "got dict", id="a-dict"),
        pytest.param(("u-1", "alice", "admin"), "got a tuple of 3 items", id="a-triple"),
        pytest.param((True, "alice"), "the user id is bool, not str or None", id="a-bool-id"),
        pytest.param((b"u-1", "alice"), "the user id is bytes", id="a-bytes-id"),
        pytest.param(({"id": 1}, "alice"), "the user id is dict", id="a-dict-id"),
        pytest.param(("u-1", 7), "the user name is int", id="a-number-name"),
    ],
)
def test_an_unusable_user_resolver_result_sends_no_user_and_is_logged_once(user, why, caplog):
    caplog.set_level(logging.WARNING, "xo_webhooks.request.middleware")
    assert resolved_user(lambda environ: user, requests=2) == (None, None)
    lines = [r.getMessage() for r in caplog.records if "unusable user" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("the user_resolver gave an unusable user") and why in lines[0]
    assert "alice" not in lines[0]  # what it is, never its value


def test_a_late_user_with_a_number_id_is_converted():
    def app(environ, start_response):
        environ["xo_webhooks.user"] = (42, "eve")
        return plain_app(environ, start_response)

    dispatcher = RecordingDispatcher()
    hooks = [{"method": "vm.start", "type": "post", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(app, hooks=hooks, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    b"".join(middleware(environ, lambda *a: None))
    (post,) = dispatcher.payloads("post")
    assert (post["userId"], post["userName"]) == ("42", "eve")


def call_payloads(**kwargs: Any) -> list[dict[str, Any]]:
    dispatcher = RecordingDispatcher()
    hooks = [{"method": "backup.*", "type": "pre/post", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(plain_app, hooks=hooks, dispatcher=dispatcher, environ={})
    with middleware.call("backup.run", **kwargs) as call:
        call.result = True
    payloads = [d.payload for d in dispatcher.deliveries]
    for payload in payloads:
        validate_payload(payload)
    return payloads


@pytest.mark.parametrize(
    "params, sent",
    [
        pytest.param(None, {}, id="none"),
        pytest.param({"job": "nightly"}, {"job": "nightly"}, id="dict"),
        pytest.param(["nightly"], ["nightly"], id="list"),
        pytest.param(("nightly", 2), ["nightly", 2], id="tuple-as-list"),
        pytest.param(types.MappingProxyType({"job": "x"}), {"job": "x"}, id="mapping-as-dict"),
    ],
)
def test_call_params_are_sent_as_an_object_or_an_array(params, sent):
    pre, post = call_payloads(params=params)
    assert pre["params"] == post["params"] == sent


def test_call_user_with_a_number_id_is_converted():
    pre, _ = call_payloads(user=(7, "cron"))
    assert (pre["userId"], pre["userName"]) == ("7", "cron")


@pytest.mark.parametrize(
    "hooks",
    [
        pytest.param(
            [{"method": "backup.*", "type": "pre", "url": "http://127.0.0.1:9/"}], id="hook"
        ),
        pytest.param([], id="no-hook"),
    ],
)
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        pytest.param(("",), {}, ValueError, "method must not be empty", id="empty-method"),
        pytest.param((None,), {}, TypeError, "method must be a str, not NoneType", id="no-method"),
        pytest.param(
            ("backup.run",),
            {"params": "nightly"},
            TypeError,
            r"params must be a dict \(by name\) or a list \(by position\).*not str",
            id="str-params",
        ),
        pytest.param(("backup.run",), {"params": 3}, TypeError, "not int", id="int-params"),
        pytest.param(("backup.run",), {"user": "cron"}, TypeError, "got str", id="user-not-a-pair"),
    ],
)
def test_call_rejects_what_would_make_an_invalid_payload(hooks, args, kwargs, error, match):
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(plain_app, hooks=hooks, dispatcher=dispatcher, environ={})
    ran = []
    with pytest.raises(error, match=match), middleware.call(*args, **kwargs):
        ran.append(True)
    assert ran == [] and dispatcher.deliveries == []  # raised on entering the block


def test_validation_is_on_by_default(receiver):
    checked = Sender(load_settings([], {}))
    assert checked.check is not None
    attempt = checked.send(delivery(receiver.url, {**PRE, "userId": 42}))
    assert not attempt.delivered and attempt.reason == "invalid_payload"
    assert receiver.attempts == []
