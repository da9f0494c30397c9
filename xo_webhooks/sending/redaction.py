"""Cleaning a payload before it leaves the process (or is written as a dead letter):
secrets in params, results and error data replaced by ``"***"``, and whatever strict
JSON cannot hold replaced by a stand-in, so that every hook can be sent.

The stand-ins (documented in the README, "The payload"):

- ``NaN``, ``Infinity`` and ``-Infinity`` (``1e400`` in a request reads as infinity)
  become the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``;
- a lone surrogate in a string or a key (``"\\ud800"``) becomes U+FFFD, ``�``;
- an object or array nested deeper than :data:`MAX_DEPTH` becomes :data:`TOO_DEEP`;
- any other value that is not JSON (a ``datetime`` or a ``Decimal`` in the result of a
  ``middleware.call()`` block) becomes its ``str()``; a tuple becomes an array.

Values are copied only where something changes: a clean payload is returned as is.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, NamedTuple

__all__ = ["redact", "clean_payload", "Cleaned", "REDACTED", "MAX_DEPTH", "TOO_DEEP"]

REDACTED = "***"
#: Objects and arrays deeper than this in a payload are replaced by :data:`TOO_DEEP`.
MAX_DEPTH = 100
TOO_DEEP = f"[nested deeper than {MAX_DEPTH} levels]"
_SURROGATE = re.compile("[\ud800-\udfff]")
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_JSON_KEYS = (str, int, float, bool, type(None))  # what json.dumps takes as a key


class Cleaned(NamedTuple):
    """A cleaned payload, and how many values in it were replaced by a stand-in."""

    payload: dict[str, Any]
    replaced: int


def redact(value: Any, words: Iterable[str]) -> Any:
    """Return *value* with every value under a key whose name contains one of *words*
    replaced by ``"***"``, at any depth, and stand-ins for what is not JSON. Keys and
    words are compared normalized: NFKC, case folded, and with every character that is
    not a letter or a digit dropped, so ``api_key`` also catches ``X-Api-Key``,
    ``apiKey``, a fullwidth ``ａｐｉＫｅｙ`` and ``api\\u200bkey``. *value* is not
    modified."""
    return _Walk(_normalized(tuple(words))).clean(value, 0)


def clean_payload(payload: dict[str, Any], words: Iterable[str]) -> Cleaned:
    """Return *payload* with secrets redacted in ``params``, ``result`` and
    ``error.data``, and stand-ins for whatever strict JSON cannot hold anywhere in it;
    the same object when nothing had to change."""
    redacting, plain = _Walk(_normalized(tuple(words))), _Walk(())
    changes = {}
    for key, value in payload.items():
        if key in ("params", "result"):
            new = redacting.clean(value, 0)
        elif key == "error" and isinstance(value, dict):
            parts = {k: (redacting if k == "data" else plain).clean(v, 1) for k, v in value.items()}
            new = value if all(parts[k] is value[k] for k in value) else parts
        else:
            new = plain.clean(value, 0)
        if new is not value:
            changes[key] = new
    replaced = redacting.replaced + plain.replaced
    return Cleaned({**payload, **changes} if changes else payload, replaced)


@lru_cache(maxsize=64)
def _normalized(words: tuple[str, ...]) -> tuple[str, ...]:
    # A process has one list of words, asked for with every hook: worked out once.
    return tuple(sorted({n for n in map(_normalize, words) if n}))


def _normalize(name: str) -> str:
    # Look-alikes (fullwidth letters, ligatures) fold to plain ones; separators and
    # invisible characters (zero-width space, soft hyphen) are dropped.
    folded = unicodedata.normalize("NFKC", name).casefold()
    return "".join(c for c in folded if c.isalnum())


@lru_cache(maxsize=4096)
def _is_secret(key: str, words: tuple[str, ...]) -> bool:
    # Payloads repeat the same few keys: the answer is cached per key and word list.
    name = _normalize(key)
    return any(w in name for w in words)


class _Walk:
    """One walk over a value: redacts under *words*, counts the stand-ins it puts."""

    __slots__ = ("words", "replaced")

    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = words
        self.replaced = 0

    def clean(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return value if value.isascii() or not _SURROGATE.search(value) else self._text(value)
        if value is None or isinstance(value, int):  # bool is an int
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else self._stand_in(_NON_FINITE.get(value, "NaN"))
        if isinstance(value, (dict, list, tuple)) and depth >= MAX_DEPTH:
            return self._stand_in(TOO_DEEP)
        if isinstance(value, dict):
            return self._object(value, depth)
        if isinstance(value, (list, tuple)):
            items = [self.clean(item, depth + 1) for item in value]
            unchanged = isinstance(value, list) and all(
                a is b for a, b in zip(items, value, strict=True)
            )
            return value if unchanged else items
        return self._stand_in(str(value))

    def _object(self, value: dict[Any, Any], depth: int) -> dict[Any, Any]:
        changed = False
        items = []
        for key, item in value.items():
            new_key = self._key(key)
            if self.words and _is_secret(str(new_key), self.words):
                new: Any = REDACTED
            else:
                new = self.clean(item, depth + 1)
            changed = changed or new is not item or new_key is not key
            items.append((new_key, new))
        return dict(items) if changed else value

    def _key(self, key: Any) -> Any:
        if isinstance(key, str):
            return key if key.isascii() or not _SURROGATE.search(key) else self._text(key)
        if isinstance(key, _JSON_KEYS) and not (isinstance(key, float) and not math.isfinite(key)):
            return key
        return self._stand_in(str(key))

    def _text(self, text: str) -> str:
        self.replaced += 1
        return _SURROGATE.sub("\ufffd", text)

    def _stand_in(self, text: str) -> str:
        self.replaced += 1
        return text
