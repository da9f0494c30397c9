"""Hook URLs: what counts as one, and how to show one without its password.
Shared by configuration (checked at start) and sending (parsed per route)."""

from __future__ import annotations

import re
import urllib.parse
from typing import NamedTuple

__all__ = ["HttpUrl", "parse_http_url", "mask_url"]


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
