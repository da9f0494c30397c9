"""Reading a WSGI input stream in bounded chunks: the middleware reads a request body
with it before the app does, the receiver reads a hook with it."""

from __future__ import annotations

from typing import Any

__all__ = ["read_at_most", "CHUNK"]

CHUNK = 64 * 1024


def read_at_most(stream: Any, size: int, parts: list[bytes] | None = None) -> bytes:
    """Read up to *size* bytes from a WSGI input stream, in bounded chunks; *parts*
    keeps what was read if the stream raises."""
    parts = [] if parts is None else parts
    remaining = size
    while remaining > 0:
        chunk = stream.read(min(remaining, CHUNK))
        if not chunk:
            break  # the client went away early: hand the app what there was
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)
