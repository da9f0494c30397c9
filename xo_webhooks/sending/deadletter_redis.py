"""The dead-letter store as a Redis list (``XO_WEBHOOKS_DEAD_LETTER=redis://...``).

Celery workers on several hosts cannot share a file, so they share a list: each
given-up hook is one JSON record, appended with ``RPUSH`` (one command per batch, so
records are never torn or interleaved). The list is named by the ``key`` query
parameter of the URL, ``xo-webhooks:dead-letter`` by default::

    redis://redis.example.com:6379/0                      # key xo-webhooks:dead-letter
    redis://redis.example.com:6379/2?key=hooks:failed     # key hooks:failed, database 2

Needs the ``redis`` package (the ``celery`` extra); imported only for a ``redis://``
target, so the base install never loads it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from .deadletter import Taken, classify

__all__ = ["RedisDeadLetter", "DEFAULT_KEY"]


DEFAULT_KEY = "xo-webhooks:dead-letter"
#: Seconds to connect or wait for an answer. A publisher appends on the request path
#: when the broker is down, so this stays short.
DEFAULT_TIMEOUT = 0.5
#: After a failure, seconds during which appends fail at once instead of waiting for
#: another timeout (a Redis that does not answer must not slow every request).
FAIL_FAST_SECONDS = 1.0


class RedisDeadLetter:
    """Appends dead-letter records to a Redis list; connects on first use.

    :param url: ``redis://`` or ``rediss://`` URL; its ``key`` query parameter names
        the list (default :data:`DEFAULT_KEY`), the other parts go to redis-py.
    :param timeout: seconds to connect and to wait for each answer.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url, self.key = _split_key(url)
        self.timeout = timeout
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0

    @property
    def client(self) -> redis.Redis:
        """The redis-py client, created on first use (redis-py reconnects after a fork)."""
        with self._lock:
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self.url,
                    socket_connect_timeout=self.timeout,
                    socket_timeout=self.timeout,
                )
            return self._client

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append *records* with one ``RPUSH``; raise :class:`redis.RedisError` (or
        :class:`ConnectionError` while Redis was just found unreachable) on failure."""
        values = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records]
        if not values:
            return
        if time.monotonic() < self._down_until:
            raise ConnectionError(f"{self!r} was unreachable less than {FAIL_FAST_SECONDS:g} s ago")
        try:
            self.client.rpush(self.key, *values)
        except redis.RedisError:
            self._down_until = time.monotonic() + FAIL_FAST_SECONDS
            raise

    @contextmanager
    def taken(self) -> Iterator[Taken]:
        """Rename the list to a working key (atomic: appends that follow start a new
        list), yield its usable records, then put back its unusable values as they
        were and delete it, in one transaction. A crash in between leaves
        ``<key>:replaying:<host>:<pid>:<random>`` in Redis, nothing lost: the random part
        keeps a later replay with the same host and pid from overwriting it."""
        working = (
            f"{self.key}:replaying:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        )
        try:
            self.client.rename(self.key, working)
        except redis.ResponseError as e:
            if "no such key" not in str(e).lower():
                raise
            yield Taken()  # an empty list does not exist in Redis
            return
        records, unusable, notices = _parse(self.client.lrange(working, 0, -1), working)
        yield Taken(records, len(unusable) - notices, notices)
        with self.client.pipeline() as transaction:
            if unusable:
                transaction.rpush(self.key, *unusable)
            transaction.delete(working)
            transaction.execute()

    def __repr__(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"RedisDeadLetter('{parts.scheme}://{host}{port}{parts.path}', key={self.key!r})"


def _split_key(url: str) -> tuple[str, str]:
    """Take the ``key`` parameter out of *url*: redis-py rejects unknown parameters."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    keys = [value for name, value in query if name == "key"]
    rest = urlencode([(name, value) for name, value in query if name != "key"])
    return urlunsplit(parts._replace(query=rest)), (keys[-1] if keys and keys[-1] else DEFAULT_KEY)


def _parse(values: list[Any], where: str) -> tuple[list[dict[str, Any]], list[Any], int]:
    """The usable records among *values*, the other values, as they were, and how many
    of those are notices."""
    records: list[dict[str, Any]] = []
    kept: list[Any] = []
    notices = 0
    for n, value in enumerate(values, 1):
        kind, record = classify(value, f"{where}[{n}]")
        if record is not None:
            records.append(record)
        else:
            kept.append(value)
            notices += kind == "notice"
    return records, kept, notices
