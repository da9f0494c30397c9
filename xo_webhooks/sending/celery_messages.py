"""What the Celery dispatcher's messages look like, their queue and task, and the Redis
keys that order a call's hooks: shared by the publisher (:mod:`.celery_publisher`) and
the workers (:mod:`.celery`, :mod:`.celery_batch`), without the Celery app itself.
"""

from __future__ import annotations

from typing import Any

from .delivery import Delivery

__all__ = [
    "TASK_NAME",
    "QUEUE",
    "DEFAULT_BROKER_URL",
    "VISIBILITY_TIMEOUT",
    "COUNTDOWN_LIMIT",
    "PARK_POLL",
    "RESTORE_INTERVAL",
    "PUBLISH_TIMEOUT",
    "PRE_DONE_KEY",
    "PRE_DONE_TTL",
    "PRE_PENDING_KEY",
    "HOLD_WAIT",
    "HOLD_WAIT_POLL",
    "HOLD_FIRST_POLL",
    "HOLD_MAX_POLL",
    "again_message",
    "message_summary",
    "messages_summary",
    "pending_mark",
    "pre_keys",
]

TASK_NAME = "xo_webhooks.deliver"
QUEUE = "xo-webhooks"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: Seconds before a message a worker took but never acknowledged (it was killed) is
#: given to another worker. Longer than the longest wait a worker holds a message for
#: (a retry's countdown, at most :data:`COUNTDOWN_LIMIT`, plus one attempt; a held
#: post's, less), short enough for a redelivery within 2 minutes. A message held longer
#: is delivered twice: longer waits are parked in Redis instead.
VISIBILITY_TIMEOUT = 90
#: Seconds: a retry due sooner waits as a Celery countdown; a later one is parked.
COUNTDOWN_LIMIT = 60.0
#: Seconds between a worker's moves of due parked hooks back to the queue.
PARK_POLL = 1.0
#: Seconds between a worker's sweeps for such messages (kombu's default is 100).
RESTORE_INTERVAL = 5
#: Seconds the request path waits to connect to the broker, and for its answer.
PUBLISH_TIMEOUT = 0.2
#: Marks a delivered or given-up pre hook, for its post hook (``SET ... EX``).
PRE_DONE_KEY = "xo-webhooks:pre-done:{}"
PRE_DONE_TTL = 3600
#: Marks a pre hook published and not done yet (set by the publisher, deleted by the
#: worker that finishes it; it expires after the longest a post waits for it).
PRE_PENDING_KEY = "xo-webhooks:pre-pending:{}"
#: Seconds a post hook first waits in its task for its pre hook (a pre being delivered
#: right now), checking every ``HOLD_WAIT_POLL``, before it is put back in the queue.
HOLD_WAIT, HOLD_WAIT_POLL = 1.0, 0.05
#: Seconds before a held post's later checks: doubling, so that a long hold is taken
#: from the queue a few times, not every few seconds; capped below the visibility timeout.
HOLD_FIRST_POLL, HOLD_MAX_POLL = 1.0, 30.0


def pending_mark(message: dict[str, Any]) -> bool | None:
    """Whether the publisher set a pending marker for this pre hook; ``None`` when it
    does not say (an older publisher: its post hooks wait for a done marker)."""
    mark = message.get("pendingMark")
    return None if mark is None else bool(mark)


def again_message(delivery: Delivery, marked: bool | None) -> dict[str, Any]:
    """The message of *delivery*'s next attempt; it keeps the pending mark of a pre."""
    message = delivery.to_message()
    if marked is not None:
        message["pendingMark"] = marked
    return message


def pre_keys(message: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The markers a post hook's *message* waits on: the done markers of its pre hooks
    (``after``, from older publishers) and their pending markers (``afterPending``)."""
    done = [PRE_DONE_KEY.format(pre_id) for pre_id in message.get("after") or ()]
    pending = [PRE_PENDING_KEY.format(pre_id) for pre_id in message.get("afterPending") or ()]
    return done, pending


def messages_summary(messages: list[dict[str, Any]]) -> str:
    """:func:`message_summary` of a message holding several hooks."""
    hooks = ", ".join(message_summary(m)[13:-2] for m in messages)
    return f"{{'messages': '{hooks}'}}"


def message_summary(message: dict[str, Any]) -> str:
    """What Celery logs and shows of a message (its ``kwargsrepr``): by default a repr
    of the whole payload, costly to build on the request path and sent twice."""
    payload = message["payload"]
    return (
        f"{{'message': '{payload.get('method')} {payload.get('type')} "
        f"call {payload.get('callId')} {message['id']} attempts {message['attempts']}'}}"
    )
