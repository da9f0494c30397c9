"""Tests of xo_webhooks.signing, checked against the standardwebhooks reference library."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone

import pytest
import standardwebhooks
from werkzeug.datastructures import EnvironHeaders, Headers

from xo_webhooks.config import load_settings
from xo_webhooks.errors import ConfigError, SignatureError
from xo_webhooks.receiver import HookReceiver
from xo_webhooks.signing import generate_secret, parse_secret, sign, verify

from .helpers import OTHER_SECRET, SECRET

NOW = 1_700_000_000
BODY = json.dumps({"type": "pre", "method": "vm.start", "params": {"id": "é"}}).encode()


def headers_for(body: bytes = BODY, *, secret: str = SECRET, msg_id: str = "msg_1", ts: int = NOW):
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


def test_sign_matches_the_standard_webhooks_test_vector():
    signature = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_standardwebhooks_verifies_our_signature():
    now = int(datetime.now(timezone.utc).timestamp())
    headers = headers_for(ts=now)
    assert standardwebhooks.Webhook(SECRET).verify(BODY, headers) == json.loads(BODY)


def test_standardwebhooks_rejects_our_signature_of_another_body():
    now = int(datetime.now(timezone.utc).timestamp())
    headers = headers_for(ts=now)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(BODY.replace(b"pre", b"pro"), headers)


def test_we_verify_a_standardwebhooks_signature():
    when = datetime.fromtimestamp(NOW, tz=timezone.utc)
    signature = standardwebhooks.Webhook(SECRET).sign("msg_2", when, BODY.decode())
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(NOW), "webhook-signature": signature}
    verify(SECRET, BODY, headers, now=NOW)
    verify(SECRET, BODY.decode(), headers, now=NOW)  # a str body is encoded as UTF-8


def test_verify_uses_the_clock_by_default():
    now = int(datetime.now(timezone.utc).timestamp())
    verify(SECRET, BODY, headers_for(ts=now))


@pytest.mark.parametrize("index", [0, len(BODY) // 2, len(BODY) - 1])
def test_a_changed_body_byte_fails(index):
    body = bytearray(BODY)
    body[index] ^= 0x01
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(SECRET, bytes(body), headers_for(), now=NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("webhook-id", "msg_other", id="other-id"),
        pytest.param("webhook-timestamp", str(NOW + 1), id="other-timestamp"),
    ],
)
def test_a_changed_signed_header_fails(field, value):
    headers = {**headers_for(), field: value}
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(SECRET, BODY, headers, now=NOW)


def test_another_secret_fails():
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(OTHER_SECRET, BODY, headers_for(), now=NOW)


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        pytest.param(-301, "too old", id="stale"),
        pytest.param(301, "too new", id="future"),
        pytest.param(-(10**6), "too old", id="very-stale"),
    ],
)
def test_timestamps_out_of_the_default_tolerance_fail(offset, message):
    with pytest.raises(SignatureError, match=message):
        verify(SECRET, BODY, headers_for(ts=NOW + offset), now=NOW)


@pytest.mark.parametrize("offset", [-300, 300, 0])
def test_timestamps_at_the_edge_of_the_tolerance_pass(offset):
    verify(SECRET, BODY, headers_for(ts=NOW + offset), now=NOW)


def test_custom_tolerance():
    headers = headers_for(ts=NOW - 20)
    with pytest.raises(SignatureError, match="too old"):
        verify(SECRET, BODY, headers, tolerance=10, now=NOW)
    verify(SECRET, BODY, headers, tolerance=30, now=NOW)
    verify(SECRET, BODY, headers_for(ts=NOW - 3000), tolerance=3600, now=NOW)
    verify(SECRET, BODY, headers_for(ts=NOW), tolerance=0, now=NOW)


@pytest.mark.parametrize("tolerance", [-1, float("nan"), float("inf"), float("-inf")])
def test_a_negative_or_non_finite_tolerance_is_a_programming_error(tolerance):
    # nan compares false with everything: it used to accept any timestamp at all
    stale = headers_for(ts=NOW - 10**9)
    with pytest.raises(ValueError, match="tolerance"):
        verify(SECRET, BODY, stale, tolerance=tolerance, now=NOW)


@pytest.mark.parametrize("order", ["old-first", "new-first"])
def test_rotation_accepts_any_one_valid_signature(order):
    old = sign(OTHER_SECRET, "msg_1", NOW, BODY)
    new = sign(SECRET, "msg_1", NOW, BODY)
    value = f"{old} {new}" if order == "old-first" else f"{new} {old}"
    headers = {**headers_for(), "webhook-signature": value}
    verify(SECRET, BODY, headers, now=NOW)
    verify(OTHER_SECRET, BODY, headers, now=NOW)


def test_rotation_skips_other_versions_and_malformed_entries_when_one_matches():
    good = sign(SECRET, "msg_1", NOW, BODY)
    headers = {**headers_for(), "webhook-signature": f"v1a,AAAA garbage v1,@@  {good}"}
    verify(SECRET, BODY, headers, now=NOW)


def test_two_wrong_signatures_fail():
    wrong = sign(OTHER_SECRET, "msg_1", NOW, BODY)
    headers = {**headers_for(), "webhook-signature": f"{wrong} {wrong}"}
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(SECRET, BODY, headers, now=NOW)


def test_header_names_are_case_insensitive():
    headers = {name.title(): value for name, value in headers_for().items()}
    verify(SECRET, BODY, headers, now=NOW)
    verify(SECRET, BODY, Headers(headers), now=NOW)
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers_for().items()}
    verify(SECRET, BODY, EnvironHeaders(environ), now=NOW)
    verify(SECRET, BODY, {k: v.encode() for k, v in headers_for().items()}, now=NOW)


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param(lambda h: list(h.items()), id="list"),
        pytest.param(lambda h: [(k.title(), v) for k, v in h.items()], id="title-case"),
        pytest.param(lambda h: tuple((k.encode(), v.encode()) for k, v in h.items()), id="asgi"),
        pytest.param(lambda h: iter([("other", "x"), *h.items()]), id="iterator"),
    ],
)
def test_headers_may_be_name_value_pairs(pairs):
    verify(SECRET, BODY, pairs(headers_for()), now=NOW)


def test_among_pairs_the_first_of_a_name_counts():
    good = list(headers_for().items())
    verify(SECRET, BODY, [*good, ("webhook-id", "msg_other")], now=NOW)
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(SECRET, BODY, [("Webhook-Id", "msg_other"), *good], now=NOW)


class Unreadable(dict):
    def get(self, key, default=None):
        raise RuntimeError("this mapping cannot be read")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(None, id="none"),
        pytest.param(42, id="int"),
        pytest.param(object(), id="object"),
        pytest.param("webhook-id: msg_1", id="str"),
        pytest.param([("webhook-id",)], id="short-pair"),
        pytest.param([("webhook-id", "msg_1", "extra")], id="long-pair"),
        pytest.param([42], id="not-a-pair"),
        pytest.param(Unreadable(headers_for()), id="raising-mapping"),
    ],
)
def test_headers_that_cannot_be_read_raise_signature_error_only(headers):
    with pytest.raises(SignatureError, match="headers cannot be read") as info:
        verify(SECRET, BODY, headers, now=NOW)
    assert type(info.value) is SignatureError
    assert info.value.__suppress_context__


MALFORMED = [
    pytest.param({"webhook-signature": "v1,@@"}, "malformed", id="sig-not-base64"),
    pytest.param({"webhook-signature": "garbage"}, "malformed", id="sig-garbage"),
    pytest.param({"webhook-signature": "v1,"}, "malformed", id="sig-empty-value"),
    pytest.param({"webhook-signature": ",AAAA"}, "malformed", id="sig-empty-version"),
    pytest.param({"webhook-signature": "v1,AAAA"}, "malformed", id="sig-too-short"),
    pytest.param({"webhook-signature": "v1,QUJD\nREVG"}, "malformed", id="sig-newline"),
    pytest.param({"webhook-signature": "v2,AAAA v1a,AAAA"}, "no v1 signature", id="no-v1"),
    pytest.param({"webhook-signature": ""}, "missing or empty", id="sig-empty"),
    pytest.param({"webhook-signature": "   "}, "missing or empty", id="sig-blank"),
    pytest.param({"webhook-signature": None}, "missing", id="sig-missing"),
    pytest.param({"webhook-id": None}, "missing", id="id-missing"),
    pytest.param({"webhook-id": ""}, "missing or empty", id="id-empty"),
    pytest.param({"webhook-timestamp": None}, "missing", id="ts-missing"),
    pytest.param({"webhook-timestamp": ""}, "missing or empty", id="ts-empty"),
    pytest.param({"webhook-timestamp": "soon"}, "not an integer", id="ts-word"),
    pytest.param({"webhook-timestamp": f"{NOW}.5"}, "not an integer", id="ts-float"),
    pytest.param({"webhook-timestamp": "1.7e9"}, "not an integer", id="ts-exponent"),
    pytest.param({"webhook-timestamp": f"-{NOW}"}, "not an integer", id="ts-negative"),
    pytest.param({"webhook-timestamp": f"+{NOW}"}, "not an integer", id="ts-plus"),
    pytest.param({"webhook-timestamp": f" {NOW}"}, "not an integer", id="ts-space"),
    pytest.param({"webhook-timestamp": "1_700_000_000"}, "not an integer", id="ts-underscore"),
    pytest.param({"webhook-timestamp": "١٧٠٠٠٠٠٠٠٠"}, "not an integer", id="ts-arabic-digits"),
    pytest.param({"webhook-timestamp": "9" * 5000}, "not an integer", id="ts-huge"),
    pytest.param({"webhook-timestamp": b"\xff"}, "not ASCII", id="ts-bytes"),
    pytest.param({"webhook-timestamp": 1700000000}, "missing", id="ts-not-str"),
]


@pytest.mark.parametrize(("changes", "message"), MALFORMED)
def test_malformed_headers_raise_signature_error_only(changes, message):
    headers = {**headers_for(), **changes}
    headers = {k: v for k, v in headers.items() if v is not None}
    with pytest.raises(SignatureError, match=message) as info:
        verify(SECRET, BODY, headers, now=NOW)
    assert type(info.value) is SignatureError
    # not a lower-level error (binascii.Error, KeyError...) leaking through as the cause
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def _key(size: int) -> str:
    return base64.b64encode(bytes(range(size))).decode()


BAD_SECRETS = [
    pytest.param("whsec_@@@@", "base64", id="not-base64"),
    pytest.param("whsec_QUJDRA=x", "base64", id="bad-padding"),
    pytest.param("whsec_QUJDR", "base64", id="truncated"),
    pytest.param("whsec_", "not 0", id="empty"),
    pytest.param("whsec_Zm9v\u00e9", "base64", id="non-ascii"),
    pytest.param("whsec_" + _key(23), "not 23", id="23-bytes"),
    pytest.param("whsec_" + _key(65), "not 65", id="65-bytes"),
    pytest.param(_key(32), "start with whsec_", id="no-prefix"),
    pytest.param(None, "start with whsec_", id="none"),
    pytest.param(b"whsec_" + _key(32).encode(), "start with whsec_", id="bytes"),
]


@pytest.mark.parametrize(("secret", "reason"), BAD_SECRETS)
def test_a_bad_secret_is_refused_alike_everywhere_without_echoing_it(secret, reason):
    """parse_secret, sign and verify raise the same ValueError (not a SignatureError:
    the secret is the caller's mistake, not the request's), the configuration and the
    receiver a ConfigError with the same text."""
    with pytest.raises(ValueError) as parsed:
        parse_secret(secret)
    message = str(parsed.value)
    assert reason in message and type(parsed.value) is ValueError
    if isinstance(secret, str) and len(secret) > 6:
        assert secret[6:] not in message
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$") as verified:
        verify(secret, BODY, headers_for(), now=NOW)
    assert not isinstance(verified.value, SignatureError)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sign(secret, "msg_1", NOW, BODY)
    if isinstance(secret, str):
        with pytest.raises(ConfigError, match=f"^XO_WEBHOOKS_SECRET: {re.escape(message)}$"):
            load_settings(environ={"XO_WEBHOOKS_SECRET": secret})
        with pytest.raises(ConfigError, match=f"^secret: {re.escape(message)}$"):
            HookReceiver(secret=secret)


@pytest.mark.parametrize("size", [24, 32, 64])
def test_secrets_of_24_to_64_bytes_are_accepted_everywhere(size):
    secret = "whsec_" + _key(size)
    assert parse_secret(secret) == bytes(range(size))
    assert load_settings(environ={"XO_WEBHOOKS_SECRET": secret}).secret == secret
    HookReceiver(secret=secret)
    verify(secret, BODY, headers_for(secret=secret), now=NOW)


def test_secrets_never_appear_in_messages():
    key_part = SECRET[len("whsec_") :]
    messages = []
    for changes, _ in (p.values for p in MALFORMED):
        headers = {k: v for k, v in {**headers_for(), **changes}.items() if v is not None}
        with pytest.raises(SignatureError) as info:
            verify(SECRET, BODY, headers, now=NOW)
        messages.append(str(info.value) + repr(info.value))
    with pytest.raises(SignatureError) as info:
        verify(SECRET, BODY + b"x", headers_for(), now=NOW)
    messages.append(str(info.value) + repr(info.value))
    assert all(key_part not in m and SECRET not in m for m in messages)


def test_unpadded_secrets_are_accepted_everywhere():
    """Padding is optional: sign() once raised binascii.Error for what verify() took."""
    padded = "whsec_" + _key(25)
    unpadded = padded.rstrip("=")
    assert unpadded != padded
    assert parse_secret(unpadded) == parse_secret(padded) == bytes(range(25))
    assert sign(unpadded, "msg_1", NOW, BODY) == sign(padded, "msg_1", NOW, BODY)
    verify(unpadded, BODY, headers_for(secret=padded), now=NOW)
    assert load_settings(environ={"XO_WEBHOOKS_SECRET": unpadded}).secret == unpadded
    HookReceiver(secret=unpadded)


def test_generate_secret():
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_") and first != second
    assert len(parse_secret(first)) == 32
    now = int(datetime.now(timezone.utc).timestamp())
    headers = headers_for(secret=first, ts=now)
    verify(first, BODY, headers)
    standardwebhooks.Webhook(first).verify(BODY, headers)
