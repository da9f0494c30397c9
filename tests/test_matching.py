"""Tests of xo_webhooks.request.matching: which hooks a method name triggers."""

from __future__ import annotations

import time

import pytest

from xo_webhooks.config import Hook
from xo_webhooks.request.matching import HookTable


def hook(method: str, type_: str = "pre", n: int = 0) -> Hook:
    return Hook(method=method, type=type_, url=f"http://hooks.example/{n}")


@pytest.mark.parametrize(
    ("pattern", "method", "matches"),
    [
        pytest.param("vm.start", "vm.start", True, id="exact"),
        pytest.param("vm.start", "vm.stop", False, id="exact-other"),
        pytest.param("vm.start", "vm.start.now", False, id="exact-is-not-prefix"),
        pytest.param("vm.start", "VM.START", False, id="case-sensitive"),
        pytest.param("vm.*", "vm.start", True, id="star-suffix"),
        pytest.param("vm.*", "vm.snapshot.create", True, id="star-crosses-dots"),
        pytest.param("vm.*", "vm.", True, id="star-matches-empty"),
        pytest.param("vm.*", "vmx.start", False, id="star-keeps-the-dot"),
        pytest.param("vm.*", "host.vm.start", False, id="anchored-at-start"),
        pytest.param("*", "vm.start", True, id="star-alone"),
        pytest.param("*", "", True, id="star-alone-empty"),
        pytest.param("*.start", "vm.start", True, id="star-prefix"),
        pytest.param("*.start", "sr.vdi.start", True, id="star-prefix-deep"),
        pytest.param("*.start", "vm.started", False, id="anchored-at-end"),
        pytest.param("vm.*.create", "vm.snapshot.create", True, id="star-middle"),
        pytest.param("vm.*.create", "vm.create", False, id="star-middle-needs-dots"),
        pytest.param("a*b*c", "aXXbYYc", True, id="two-stars"),
        pytest.param("a.b", "aXb", False, id="dot-is-literal"),
        pytest.param("a+b", "a+b", True, id="plus-is-literal"),
        pytest.param("a+b", "aab", False, id="plus-is-not-a-quantifier"),
        pytest.param("a?b", "ab", False, id="question-mark-is-literal"),
        pytest.param("[ab]", "a", False, id="brackets-are-literal"),
        pytest.param("[ab]", "[ab]", True, id="brackets-match-themselves"),
        pytest.param("(x|y)*", "(x|y).z", True, id="group-chars-literal-with-star"),
        pytest.param("(x|y)*", "x", False, id="alternation-is-literal"),
        pytest.param("^vm$", "vm", False, id="anchors-are-literal"),
        pytest.param("a\\d", "a1", False, id="backslash-is-literal"),
        pytest.param("vm.*", "vm.start\n", True, id="star-crosses-newline"),
        pytest.param("vm.start", "vm.start\n", False, id="exact-no-trailing-newline"),
    ],
)
def test_single_pattern(pattern: str, method: str, matches: bool) -> None:
    only = hook(pattern)
    assert HookTable([only]).match(method) == ((only,) if matches else ())


def test_several_hooks_in_configuration_order() -> None:
    hooks = [
        hook("*", "post", 0),
        hook("vm.start", "pre", 1),
        hook("vm.*", "pre/post", 2),
        hook("host.start", "pre", 3),
        hook("vm.start", "post", 4),
        hook("*.start", "pre", 5),
    ]
    table = HookTable(hooks)
    assert table.match("vm.start") == (hooks[0], hooks[1], hooks[2], hooks[4], hooks[5])
    assert table.match("host.start") == (hooks[0], hooks[3], hooks[5])
    assert table.match("vm.stop") == (hooks[0], hooks[2])
    assert table.match("sr.scan") == (hooks[0],)


def test_equal_hooks_are_all_kept() -> None:
    twin = hook("vm.start")
    table = HookTable([twin, hook("vm.*"), twin])
    assert table.match("vm.start") == (twin, hook("vm.*"), twin)


def test_no_match_is_an_empty_tuple() -> None:
    table = HookTable([hook("vm.start"), hook("host.*")])
    assert table.match("sr.scan") == ()
    assert table.match("") == ()


@pytest.mark.parametrize(
    ("hooks", "truth", "length"),
    [
        pytest.param([], False, 0, id="empty"),
        pytest.param([hook("a")], True, 1, id="one"),
        pytest.param([hook("a"), hook("b.*"), hook("a")], True, 3, id="three"),
    ],
)
def test_bool_and_len(hooks: list[Hook], truth: bool, length: int) -> None:
    table = HookTable(hooks)
    assert bool(table) is truth
    assert len(table) == length
    assert table.hooks == tuple(hooks)
    assert table.match("a") == tuple(h for h in hooks if h.method == "a")


def test_accepts_any_iterable_and_is_not_affected_by_later_changes() -> None:
    hooks = [hook("vm.start")]
    table = HookTable(h for h in hooks)
    hooks.append(hook("vm.*"))
    assert len(table) == 1
    assert table.match("vm.start") == (hook("vm.start"),)


def test_cached_answers_stay_consistent() -> None:
    hooks = [hook("vm.*", n=0), hook("vm.start", n=1), hook("*.stop", n=2)]
    table = HookTable(hooks)
    methods = ["vm.start", "vm.stop", "host.stop", "sr.scan"] * 50
    first = {m: table.match(m) for m in methods}
    for method in reversed(methods):
        assert table.match(method) == first[method]
    assert table.match("vm.start") is table.match("vm.start")  # served from the cache
    assert first == {
        "vm.start": (hooks[0], hooks[1]),
        "vm.stop": (hooks[0], hooks[2]),
        "host.stop": (hooks[2],),
        "sr.scan": (),
    }


def test_tables_do_not_share_caches() -> None:
    a = HookTable([hook("vm.*")])
    b = HookTable([hook("host.*")])
    assert a.match("vm.start") == (hook("vm.*"),)
    assert b.match("vm.start") == ()
    assert b.match("host.start") == (hook("host.*"),)
    assert a.match("host.start") == ()


def test_a_thousand_hooks() -> None:
    hooks = [hook(f"ns{i}.method{i}", n=i) for i in range(500)]
    hooks += [hook(f"glob{i}.*", n=i) for i in range(499)]
    hooks.append(hook("*", "post", 999))
    table = HookTable(hooks)
    assert len(table) == 1000
    started = time.perf_counter()
    for i in range(0, 500, 7):
        assert table.match(f"ns{i}.method{i}") == (hooks[i], hooks[-1])
        assert table.match(f"glob{i}.x.y") == (hooks[500 + i], hooks[-1])
    assert table.match("glob1") == (hooks[-1],)  # "glob1.*" needs the dot
    assert table.match("ns1.method2") == (hooks[-1],)
    assert time.perf_counter() - started < 5  # generous: a regression would take minutes
