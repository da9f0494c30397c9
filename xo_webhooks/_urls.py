"""Hook URLs: what counts as one, and how to show one without its password.
Shared by configuration (checked at start) and sending (parsed per route)."""

from __future__ import annotations

import functools
import re
import urllib.parse
from typing import NamedTuple

__all__ = ["HttpUrl", "parse_http_url", "mask_url", "endpoint_of"]


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
        raise ValueError(f"not an http(s) URL: {mask_url(url)!r}")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)  # raises ValueError when out of range
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return HttpUrl(https, parts.hostname, port, target)


def mask_url(text: str) -> str:
    """*text* with the password of any URL in it replaced by ``***``."""
    return re.sub(r"(//[^/@:\s]*:)[^@/\s]*@", r"\1***@", text)


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
