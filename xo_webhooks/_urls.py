"""Hook URLs: what counts as one, and how to show one without what makes it a
credential. Shared by configuration (checked at start) and sending (parsed per route).

A hook URL is often itself the credential: its password, a Slack incoming-webhook
path, a Teams Workflow's ``sig=`` query value, a ``?token=``. So logs name a hook by
its position and origin (:func:`short_url`), dead-letter records keep it with the
password and query values masked (:func:`masked_url`) and a :func:`fingerprint` of the
whole URL, by which ``replay`` finds the configured hook to send to."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import urllib.parse
from typing import NamedTuple

__all__ = [
    "HttpUrl", "parse_http_url", "mask_passwords", "masked_url", "is_masked",
    "short_url", "fingerprint", "basic_auth", "without_userinfo", "ascii_url", "endpoint_of",
]  # fmt: skip

MASK = "***"
# Characters left as they are when a URL is made ASCII: RFC 3986's reserved and
# unreserved ones, and ``%`` (what is already percent-encoded stays so).
_URL_SAFE = "/?#[]@!$&'()*+,;=:-._~%"


class HttpUrl(NamedTuple):
    """The parts of an http(s) URL that a request needs."""

    https: bool
    host: str  #: the host name, or the IP address without brackets
    port: int  #: the port, the scheme's default when the URL has none
    target: str  #: the path (``/`` when empty) and the query

    @property
    def default_port(self) -> bool:
        """Whether the port is the scheme's default (then ``Host`` leaves it out)."""
        return self.port == (443 if self.https else 80)


def parse_http_url(url: str) -> HttpUrl:
    """The parts of *url*; raise :class:`ValueError` unless it is an http(s) URL with a
    host and a valid port."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {masked_url(url)!r}")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)  # raises ValueError when out of range
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return HttpUrl(https, parts.hostname, port, target)


def mask_passwords(text: str) -> str:
    """*text* with the password of any URL in it replaced by ``***``."""
    return re.sub(r"(//[^/@:\s]*:)[^@/\s]*@", r"\1***@", text)


def masked_url(url: str) -> str:
    """*url* with its password (or a user name alone, often a token) and every query
    value replaced by ``***``, for a record an operator may share
    (``https://host/hooks?sig=***``)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    query = "&".join(
        f"{pair.split('=', 1)[0]}={MASK}" if "=" in pair else MASK if pair else pair
        for pair in parts.query.split("&")
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def is_masked(url: str) -> bool:
    """Whether *url* is a :func:`masked_url` that hid a password or a query value."""
    parts = urllib.parse.urlsplit(url)
    values = (pair.partition("=")[2] or pair for pair in parts.query.split("&"))
    return MASK in (parts.username, parts.password) or MASK in values


@functools.lru_cache(maxsize=1024)
def short_url(url: str) -> str:
    """How logs show a hook URL: its origin, then ``/…`` when it has a path or a query
    (either may be the credential): ``https://hooks.slack.com/…``."""
    parts = urllib.parse.urlsplit(url)
    more = parts.path not in ("", "/") or parts.query
    return endpoint_of(url) + ("/…" if more else "")


@functools.lru_cache(maxsize=1024)
def fingerprint(url: str) -> str:
    """A short digest of the whole *url* (``sha256:`` and 16 hex digits): names a
    configured hook in a dead-letter record without its secret parts. Unsalted: a weak
    password or token in the URL could be guessed from it offline (the README says
    so); a long random one, as hook URLs carry, cannot."""
    return "sha256:" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def basic_auth(url: str) -> str | None:
    """The ``Authorization`` value for the ``user:password@`` of *url* (HTTP Basic, the
    parts percent-decoded, as requests sends them), or ``None``."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return None
    login = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(login.encode("utf-8")).decode("ascii")


def without_userinfo(url: str) -> str:
    """*url* without its ``user:password@`` (sent as a header instead)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def ascii_url(url: str) -> str:
    """*url* as HTTP can carry it: the host name IDNA-encoded, anything else that is
    not ASCII percent-encoded as UTF-8.

    :raises ValueError: when the host name cannot be IDNA-encoded.
    """
    if url.isascii():
        return url
    parts = urllib.parse.urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host, port = re.fullmatch(r"(.*?)(:\d*)?", hostport).groups(default="")  # type: ignore[union-attr]
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(f"the host name cannot be IDNA-encoded: {e}") from None
    netloc = (urllib.parse.quote(userinfo, safe=_URL_SAFE) + "@" if userinfo else "") + host
    netloc += port
    path, query = (urllib.parse.quote(p, safe=_URL_SAFE) for p in (parts.path, parts.query))
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, path, query, "")
    )  # no fragment: never sent


@functools.lru_cache(maxsize=1024)
def endpoint_of(url: str) -> str:
    """The endpoint of *url*: its origin, as a browser writes it (``https://host``,
    ``http://127.0.0.1:8080``; the port only when it is not the scheme's default)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or port == {"http": 80, "https": 443}.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"
