"""Which hooks a JSON-RPC method triggers.

Matching runs on every inspected call, so it costs the same however many hooks are
configured: one dict lookup for exact names, one compiled regular expression for all
the globs together, and a cache of the answer per method name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache, lru_cache

from ..config import Hook

__all__ = ["HookTable"]


class HookTable:
    """An immutable index of hooks by method.

    :param hooks: the configured hooks. In a method pattern, ``*`` matches any run of
        characters, dots included; every other character matches itself.
    """

    def __init__(self, hooks: Iterable[Hook]) -> None:
        self.hooks = tuple(hooks)
        exact: dict[str, list[Hook]] = {}
        globs: list[Hook] = []
        for hook in self.hooks:
            if "*" in hook.method:
                globs.append(hook)
            else:
                exact.setdefault(hook.method, []).append(hook)
        self._exact = {name: tuple(found) for name, found in exact.items()}
        self._globs = tuple(globs)
        # All globs in one alternation: a single regex pass tells whether any glob
        # matches; which ones is worked out only then, and cached per method name.
        self._any_glob = (
            re.compile("|".join(_glob_to_regex(h.method) for h in globs), re.DOTALL)
            if globs
            else None
        )
        self.match = lru_cache(maxsize=4096)(self._match)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def _match(self, method: str) -> tuple[Hook, ...]:
        """Return the hooks *method* triggers, in configuration order (cached)."""
        found = set(self._exact.get(method, ()))
        if self._any_glob is not None and self._any_glob.fullmatch(method):
            found.update(h for h in self._globs if _compiled(h.method).fullmatch(method))
        return tuple(h for h in self.hooks if h in found)


def _glob_to_regex(pattern: str) -> str:
    return "(?:" + ".*".join(re.escape(part) for part in pattern.split("*")) + ")"


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(_glob_to_regex(pattern), re.DOTALL)
