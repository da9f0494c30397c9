"""Small text helpers every direction uses: shortening, describing an exception, and
reading JSON strictly. Shared: imports nothing else of the package."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["shorten", "describe_error", "STRICT_JSON"]


def shorten(text: str, limit: int = 200) -> str:
    """*text* on one line (runs of whitespace made one space), cut to *limit*
    characters with ``…`` when longer."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``KeyError: 'x'``: an exception's type and message, cut to *limit* characters."""
    return f"{type(error).__name__}: {error}"[:limit]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: A decoder of strict JSON (the receiver's): ``NaN`` and ``Infinity`` are not JSON, and
#: a hook payload never holds them (the sender puts stand-ins in their place). Built
#: once: ``json.loads(..., parse_constant=...)`` would build a decoder on every call.
STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)
