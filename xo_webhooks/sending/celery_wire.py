"""Celery task messages on Redis without Celery's publishing layers: what the request
path publishes (:class:`Broker`), and what a worker takes from the queue beside the
message Celery gave it (:class:`Drain`).

Why: ``send_task`` builds the message through Celery's and kombu's layers, and kombu's
Redis channel makes a new ``redis.Redis`` client for every publish: about 340 µs per
hook on the request path. The message itself is a JSON envelope that a Redis ``LPUSH``
puts in the queue; built here and pushed on a kept connection it costs a tenth of that.
The envelope is the one Celery 5 writes (task protocol 2, kombu's Redis transport), so
any Celery worker reads it, and a worker reads Celery's as well.

A worker that takes more than one message per task records each in kombu's own
``unacked`` hash and ``unacked_index`` sorted set, in the same Lua script that takes
them from the queue: kombu's sweeper then restores them after the visibility timeout if
the worker dies, as it restores the messages Celery took; and unlike Celery's
``BRPOP``, nothing is ever taken without being recorded.

Needs the ``redis`` package (the ``celery`` extra).
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

__all__ = ["Broker", "Drain", "task_message", "decode_kwargs", "pack"]

#: kombu's keys for the messages workers took and have not acknowledged yet.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"

_EMBED = b', {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
#: Envelopes with their constant parts filled in, by (task, queue).
_templates: dict[tuple[str, str], str] = {}


def _seed() -> None:
    global _prefix, _counter, _origin, _reply_to
    _prefix, _counter = os.urandom(10).hex(), itertools.count()
    _origin = f"gen{os.getpid()}@{socket.gethostname()}"
    _reply_to = _uuid()
    _templates.clear()  # they hold the origin


def _uuid() -> str:
    """A unique id in the shape of a UUID (Celery's task ids and kombu's delivery tags):
    a random per-process prefix and a counter, so that no system call is made."""
    n = f"{_prefix}{next(_counter):012x}"
    return f"{n[:8]}-{n[8:12]}-{n[12:16]}-{n[16:20]}-{n[20:32]}"


_prefix, _counter, _origin, _reply_to = "", itertools.count(), "", ""
_seed()
os.register_at_fork(after_in_child=_seed)  # a forked process must not repeat ids


def task_message(
    task: str, queue: str, kwargs: dict[str, Any], kwargsrepr: str, eta: float | None = None
) -> bytes:
    """The envelope Celery publishes for ``send_task(task, kwargs=kwargs)`` to *queue*
    through kombu's Redis transport (JSON serializer, body in base64). Written from a
    template, which costs a third of encoding the whole envelope as JSON.

    :raises TypeError, ValueError: *kwargs* cannot be encoded as JSON.
    """
    body = base64.b64encode(b"[[], " + json.dumps(kwargs).encode() + _EMBED).decode("ascii")
    task_id = _uuid()
    when = "null"
    if eta is not None:
        when = f'"{datetime.datetime.fromtimestamp(eta, datetime.timezone.utc).isoformat()}"'
    template = _templates.get((task, queue))
    if template is None:  # the constant parts, encoded once per process
        template = _ENVELOPE
        constants = {"task": json.dumps(task), "origin": json.dumps(_origin),
                     "reply_to": _reply_to, "queue": json.dumps(queue)}  # fmt: skip
        for name, value in constants.items():
            escaped = value.replace("{", "{{").replace("}", "}}")
            template = template.replace("{" + name + "}", escaped)
        _templates[(task, queue)] = template
    return template.format(
        body=body, id=task_id, eta=when, repr=_json_text(kwargsrepr), tag=_uuid()
    ).encode()


def _json_text(text: str) -> str:
    """*text* as a JSON string; quicker than json.dumps for plain ASCII."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


# What Celery 5 writes (task protocol 2), with json.dumps's separators.
_ENVELOPE = (
    '{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", '
    '"headers": {{"lang": "py", "task": {task}, "id": "{id}", "shadow": null, "eta": {eta}, '
    '"expires": null, "group": null, "group_index": null, "retries": 0, '
    '"timelimit": [null, null], "root_id": "{id}", "parent_id": null, "argsrepr": "()", '
    '"kwargsrepr": {repr}, "origin": {origin}, "ignore_result": true, '
    '"replaced_task_nesting": 0, "stamped_headers": null, "stamps": {{}}}}, '
    '"properties": {{"correlation_id": "{id}", "reply_to": "{reply_to}", '
    '"delivery_mode": 2, "delivery_info": {{"exchange": "", "routing_key": {queue}}}, '
    '"priority": 0, "body_encoding": "base64", "delivery_tag": "{tag}"}}}}'
)


def decode_kwargs(raw: bytes | str) -> dict[str, Any]:
    """The keyword arguments of a task message (an envelope as :func:`task_message`
    writes it, or as Celery does)."""
    envelope = json.loads(raw)
    body: Any = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    _args, kwargs, _embed = json.loads(body)
    return dict(kwargs)


def delivery_tag(raw: bytes | str) -> str:
    """The delivery tag of a task message."""
    return str(json.loads(raw)["properties"]["delivery_tag"])


def pack(*args: bytes | str | int | float) -> bytes:
    """One Redis command in the protocol's own encoding (RESP)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


class Broker:
    """Commands sent to Redis on kept connections, one per thread at a time: a stack of
    idle ones, so that a burst of request threads opens what it needs and no more.

    :param url: the broker URL (``redis://``, ``rediss://``, ``unix://``).
    :param timeout: seconds to connect, and to wait for each answer.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self._pool = redis.ConnectionPool.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def execute(self, commands: Sequence[bytes]) -> list[Any]:
        """Send packed *commands* in one write; return their answers.

        :raises redis.RedisError: Redis could not be reached or refused a command; a
            kept connection found closed is replaced once first (nothing was sent on it).
        """
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is not None:
            try:
                return self._exchange(connection, commands)
            except redis.ConnectionError:  # closed while idle (Redis restarted); not a
                pass  # timeout (redis.TimeoutError), which is no ConnectionError
        return self._exchange(self._pool.make_connection(), commands)

    def _exchange(self, connection: Any, commands: Sequence[bytes]) -> list[Any]:
        try:
            if connection._sock is None:  # redis-py connects: TLS, AUTH, SELECT
                connection.connect()
            sock = connection._sock
            if sock is None:  # not a socket of its usual kind: its own, slower path
                connection.send_packed_command([b"".join(commands)], check_health=False)
                answers = [connection.read_response() for _ in commands]
            else:
                answers = _exchange(sock, b"".join(commands), len(commands))
        except BaseException:
            connection.disconnect()
            raise
        with self._lock:
            self._idle.append(connection)
        return answers

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()


def _exchange(sock: socket.socket, data: bytes, count: int) -> list[bytes]:
    """Send *data* and read *count* one-line answers (``+OK``, ``:1``): a third of
    redis-py's cost for them, which matters on the request path.

    :raises redis.ResponseError: Redis refused a command (after reading every answer).
    :raises redis.TimeoutError, redis.ConnectionError: as redis-py raises them.
    """
    try:
        sock.sendall(data)
        received = sock.recv(4096)
        while received.count(b"\r\n") < count:
            more = sock.recv(4096)
            if not more:
                raise redis.ConnectionError("Redis closed the connection")
            received += more
    except TimeoutError as e:  # socket.timeout
        raise redis.TimeoutError(f"Timeout reading from the broker: {e}") from e
    except OSError as e:
        raise redis.ConnectionError(f"Error talking to the broker: {e}") from e
    answers = received.split(b"\r\n")[:count]
    for answer in answers:
        if not answer or answer[:1] not in b"+:":  # an error, or more than a line
            raise redis.ResponseError(answer[1:].decode(errors="replace"))
    return answers


# Take up to ARGV[1] messages from the queue's consuming end, stopping at one Celery
# must schedule itself (an eta: a countdown) or that is not the task ARGV[3]; record
# each as unacknowledged (kombu's format: [message, exchange, routing key]) at ARGV[2].
# One ZADD per message, as kombu writes them.
_DRAIN = """
local raws = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
local taken, hset = {}, {}
for i = #raws, 1, -1 do
  local ok, message = pcall(cjson.decode, raws[i])
  if not ok or type(message) ~= 'table' then break end
  local headers, properties = message['headers'], message['properties']
  if type(headers) ~= 'table' or type(properties) ~= 'table' then break end
  if headers['task'] ~= ARGV[3] or headers['eta'] ~= cjson.null then break end
  local tag = properties['delivery_tag']
  table.insert(taken, raws[i])
  table.insert(hset, tag)
  table.insert(hset, '[' .. raws[i] .. ', "", "' .. KEYS[1] .. '"]')
end
if #taken == 0 then return taken end
redis.call('LTRIM', KEYS[1], 0, -#taken - 1)
redis.call('HSET', KEYS[2], unpack(hset))
for i = 1, #hset, 2 do
  redis.call('ZADD', KEYS[3], ARGV[2], hset[i])
end
return taken
"""


class Drain:
    """Takes task messages from the queue for a worker that already runs a task, and
    acknowledges them once their hooks are settled (see the module docstring).

    :param client: the redis-py client of the broker.
    :param queue: the queue's name.
    :param task: the task name; a message of another task stops the take.
    """

    def __init__(self, client: redis.Redis, queue: str, task: str) -> None:
        self.client = client
        self.queue = queue
        self.task = task
        self._script = client.register_script(_DRAIN)

    def take(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Up to *limit* messages, oldest first, each as (delivery tag, kwargs)."""
        if limit <= 0:
            return []
        raws = self._script(
            keys=[self.queue, UNACKED, UNACKED_INDEX], args=[limit, time.time(), self.task]
        )
        return [(delivery_tag(raw), decode_kwargs(raw)) for raw in raws]

    def ack(self, tags: Sequence[str]) -> None:
        """Forget *tags*: their messages are settled (two commands for them all)."""
        if not tags:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(UNACKED_INDEX, *tags)
        pipe.hdel(UNACKED, *tags)
        pipe.execute()
