"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

A message is signed as ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` with
the key decoded from a ``whsec_<base64>`` secret. The sender puts three headers on
the request: ``webhook-id``, ``webhook-timestamp`` (epoch seconds) and
``webhook-signature`` (one or more space-separated ``v1,<base64>`` signatures, so a
receiver keeps working while the secret is rotated).

A receiver written in Python checks a request with :func:`verify`::

    from xo_webhooks.signing import verify
    verify(secret, raw_body, request.headers)   # raises SignatureError

No message, log line or repr made here ever contains a secret or a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from .errors import SignatureError

__all__ = [
    "sign",
    "verify",
    "generate_secret",
    "parse_secret",
    "SECRET_PREFIX",
    "DEFAULT_TOLERANCE",
]

SECRET_PREFIX = "whsec_"
#: Bytes a secret's key may hold, as the Standard Webhooks spec says.
SECRET_MIN_BYTES, SECRET_MAX_BYTES = 24, 64
DEFAULT_TOLERANCE = 300  # seconds, as the Standard Webhooks libraries use

_ID, _TIMESTAMP, _SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"
# Epoch seconds in plain ASCII digits: no sign, no spaces, no underscores, no float;
# twelve digits reach far beyond any sane clock and keep int() cheap.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_DIGEST_SIZE = hashlib.sha256().digest_size


@runtime_checkable
class HeaderSource(Protocol):
    """What :func:`verify` needs of a mapping of headers: a ``dict``, werkzeug's or
    Flask's headers..."""

    def get(self, key: str, /) -> Any: ...

    def items(self) -> Iterable[tuple[Any, Any]]: ...


#: Headers as :func:`verify` takes them: a mapping, or (name, value) pairs such as
#: ``http.client``'s ``getheaders()`` or an ASGI scope's ``headers`` (bytes are fine).
Headers = HeaderSource | Iterable[tuple[Any, Any]]


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` header value for *body*.

    :raises ValueError: *secret* is not a valid secret (see :func:`parse_secret`).
    """
    key = parse_secret(secret)
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def generate_secret() -> str:
    """Return a new random signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def verify(
    secret: str,
    body: bytes | str,
    headers: Headers,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Check the Standard Webhooks signature of a request; raise unless it is valid.

    :param secret: the shared ``whsec_<base64>`` secret (see :func:`parse_secret`).
    :param body: the raw request body, exactly as received (a ``str`` is encoded as UTF-8).
    :param headers: the request headers: any mapping (a plain ``dict``, werkzeug's or
        Flask's headers) or an iterable of ``(name, value)`` pairs, names and values
        ``str`` or ASCII ``bytes``; names are matched case-insensitively, and among
        pairs the first of a name counts.
    :param tolerance: how many seconds ``webhook-timestamp`` may differ from *now*,
        in the past or in the future (default 300, i.e. five minutes); finite, >= 0.
    :param now: the current time in epoch seconds; defaults to :func:`time.time`.
    :raises SignatureError: a header is missing or malformed, the timestamp is out of
        tolerance, no ``v1`` signature matches, or *headers* cannot be read.
    :raises ValueError: *secret* is not a valid secret, or *tolerance* is negative or
        not finite (``nan`` would accept any timestamp): the caller's mistake, not the
        request's.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError("tolerance must be a finite number >= 0")
    key = parse_secret(secret)
    msg_id = _header(headers, _ID)
    raw_timestamp = _header(headers, _TIMESTAMP)
    raw_signatures = _header(headers, _SIGNATURE)

    if not _TIMESTAMP_RE.fullmatch(raw_timestamp):
        raise SignatureError(f"{_TIMESTAMP} header is not an integer number of epoch seconds")
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise SignatureError(
            f"{_TIMESTAMP} is too old: {current - timestamp:.0f} s ago (tolerance {tolerance:g} s)"
        )
    if timestamp > current + tolerance:
        raise SignatureError(
            f"{_TIMESTAMP} is too new: {timestamp - current:.0f} s ahead "
            f"(tolerance {tolerance:g} s)"
        )

    candidates = _v1_signatures(raw_signatures)
    payload = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    # Check every candidate, without stopping early, so the time taken does not depend
    # on which of them (if any) matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("no matching signature in the webhook-signature header")


def _header(headers: Headers, name: str) -> str:
    """Return header *name* (lower case) from *headers*, matched case-insensitively."""
    try:
        value = _find(headers, name)
    except Exception:  # a container that cannot be read signs nothing: refuse, never crash
        raise SignatureError("the request headers cannot be read") from None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise SignatureError(f"{name} header is not ASCII") from None
    if value is None or not isinstance(value, str) or not value.strip():
        raise SignatureError(f"missing or empty {name} header")
    return value


def _find(headers: Headers, name: str) -> object:
    """The value of header *name* in a mapping or in (name, value) pairs, or ``None``."""
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(headers, HeaderSource):  # a mapping: its own lookup first (it may ignore case)
        value = headers.get(name)
        if value is not None:
            return value
        pairs = headers.items()
    else:
        pairs = headers
    for key, value in pairs:
        if isinstance(key, bytes):
            key = key.decode("latin-1")  # never fails; a non-ASCII name matches nothing
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


def _v1_signatures(header: str) -> list[bytes]:
    """Return the decoded ``v1`` signatures of a ``webhook-signature`` header.

    Other versions (``v1a,...`` for instance) are skipped; an entry that is not
    ``<version>,<value>`` or a ``v1`` value that is not base64 of 32 bytes is malformed.
    """
    found: list[bytes] = []
    malformed = 0
    for entry in header.split():
        version, comma, value = entry.partition(",")
        if not comma or not version:
            malformed += 1
        elif version == "v1":
            try:
                digest = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                malformed += 1
                continue
            if len(digest) == _DIGEST_SIZE:
                found.append(digest)
            else:
                malformed += 1
    if not found:
        if malformed:
            raise SignatureError(
                f"malformed {_SIGNATURE} header: expected space-separated 'v1,<base64>' entries"
            )
        raise SignatureError(f"no v1 signature in the {_SIGNATURE} header")
    return found


def parse_secret(secret: object) -> bytes:
    """Return the HMAC key of a secret; the one parser of secrets, used by the
    configuration, :func:`sign`, :func:`verify`, the receiver and the command line.

    A secret is ``whsec_`` followed by the base64 (padding optional) of 24 to 64 bytes,
    as the Standard Webhooks spec says; :func:`generate_secret` makes 32.

    :raises ValueError: the secret breaks that rule; the message says how, and never
        contains the secret.
    """
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a signing secret must start with {SECRET_PREFIX}")
    encoded = secret[len(SECRET_PREFIX) :]
    encoded += "=" * (-len(encoded) % 4)  # padding is optional
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"a signing secret must be {SECRET_PREFIX} followed by base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(
            f"a signing secret must hold {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes "
            f"(base64 after {SECRET_PREFIX}), not {len(key)}"
        )
    return key
