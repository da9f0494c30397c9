"""Redaction: secrets in params, results and error data replaced by ``"***"`` before a
hook leaves the process (or is written as a dead letter)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

__all__ = ["redact", "redact_payload", "REDACTED"]

REDACTED = "***"


def redact(value: Any, words: Iterable[str]) -> Any:
    """Return *value* with every value under a key whose name contains one of *words*
    replaced by ``"***"``, at any depth. Case, ``-`` and ``_`` are ignored, so
    ``api_key`` also catches ``X-Api-Key`` and ``apiKey``. *value* is not modified."""
    normalized = _normalized(tuple(words))
    if not normalized:
        return value
    return _redact(value, normalized)


@lru_cache(maxsize=64)
def _normalized(words: tuple[str, ...]) -> tuple[str, ...]:
    # A process has one list of words, asked for with every hook: worked out once.
    return tuple(sorted({_normalize(w) for w in words}))


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


@lru_cache(maxsize=4096)
def _is_secret(key: str, words: tuple[str, ...]) -> bool:
    # Payloads repeat the same few keys: the answer is cached per key and word list.
    name = _normalize(key)
    return any(w in name for w in words)


def _redact(value: Any, words: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if _is_secret(str(k), words) else _redact(v, words)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, words) for v in value]
    return value


def redact_payload(payload: dict[str, Any], words: Iterable[str]) -> dict[str, Any]:
    """Return a copy of *payload* with secrets redacted in ``params``, ``result`` and
    ``error.data``; the same object when *words* is empty."""
    words = tuple(words)
    if not words:
        return payload
    payload = dict(payload)
    for key in ("params", "result"):
        if key in payload:
            payload[key] = redact(payload[key], words)
    error = payload.get("error")
    if isinstance(error, dict) and "data" in error:
        payload["error"] = {**error, "data": redact(error["data"], words)}
    return payload
