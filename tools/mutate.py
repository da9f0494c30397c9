"""A small mutation tester: does the test suite notice when the code is wrong?

Each mutant is a one-line change to a module (a comparison flipped or relaxed, ``and``
and ``or`` swapped, a ``not`` or a sub-condition dropped, a constant off by one,
``True`` and ``False`` swapped, a statement in an ``if`` removed...). The tests of that
module run against it; a mutant they still pass *survived*: either a test is missing,
or the change cannot alter behaviour (an *equivalent* mutant, listed in ``EQUIVALENT``
below with the reason).

The working tree is never written to. The package, its schemas, the tests and
``pyproject.toml`` are copied to a temporary directory per worker; pytest runs there,
with that directory first on ``PYTHONPATH`` and no bytecode written (a mutant of the
same size, written within the same second, could otherwise be served from a stale
``.pyc``). Before any mutant runs, the tool checks that the copy is what gets
imported, and that the unmutated tests pass.

Usage::

    python tools/mutate.py                 # every module, 2 workers
    python tools/mutate.py -j 4 redaction  # modules whose path contains "redaction"
    python tools/mutate.py --list wsgi     # show the mutants, run nothing

Exit status: 0 when every survivor is a known equivalent, 1 otherwise, 2 when the set-up
checks fail.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import difflib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent

#: The modules mutated, each with the fast test modules that run against its mutants
#: (the most specific first: with ``-x`` a mutant dies at its first failing test).
TARGETS: dict[str, tuple[str, ...]] = {
    "xo_webhooks/sending/redaction.py": ("tests/test_payload.py", "tests/test_delivery.py"),
    "xo_webhooks/request/payload.py": (
        "tests/test_payload.py",
        "tests/test_middleware.py",
        "tests/test_wsgi.py",
    ),
    "xo_webhooks/request/matching.py": ("tests/test_matching.py", "tests/test_middleware.py"),
    "xo_webhooks/request/jsonrpc.py": (
        "tests/test_jsonrpc.py",
        "tests/test_middleware.py",
        "tests/test_wsgi.py",
    ),
    "xo_webhooks/request/wsgi.py": ("tests/test_wsgi.py", "tests/test_middleware.py"),
    "xo_webhooks/sending/delivery.py": (
        "tests/test_delivery.py",
        "tests/test_middleware.py",
        "tests/test_policy.py",
    ),
    "xo_webhooks/sending/endpoints.py": ("tests/test_endpoints.py", "tests/test_isolation.py"),
    "xo_webhooks/sending/lanes.py": ("tests/test_endpoints.py", "tests/test_isolation.py"),
}

PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow"]

#: Survivors that cannot behave differently, as (module, text of the mutated line
#: after the change, description): the reason. Matched on the text, not the line
#: number, so that edits elsewhere in the module do not invalidate the list.
_CACHE_SIZE = "a cache's size decides how many answers it keeps, never what they are"
_STALE_DEADLINES = (
    "dropping a closed lane's entries from the heap only frees memory: stale entries "
    "are skipped when popped, whichever are kept"
)
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("xo_webhooks/sending/redaction.py", "@lru_cache(maxsize=4095)", "4096 -> 4095"): _CACHE_SIZE,
    ("xo_webhooks/sending/redaction.py", "@lru_cache(maxsize=4097)", "4096 -> 4097"): _CACHE_SIZE,
    (
        "xo_webhooks/request/matching.py",
        "self.match = lru_cache(maxsize=4095)(self._match)",
        "4096 -> 4095",
    ): _CACHE_SIZE,
    (
        "xo_webhooks/request/matching.py",
        "self.match = lru_cache(maxsize=4097)(self._match)",
        "4096 -> 4097",
    ): _CACHE_SIZE,
    (
        "xo_webhooks/request/matching.py",
        "if self._any_glob is not None and True:",
        "and operand dropped",
    ): "the one regex of all globs is a shortcut: each glob is then matched on its own, "
    "with the same answer",
    (
        "xo_webhooks/request/wsgi.py",
        "pass",
        "removed `return` from `if self.overflow`",
    ): "past the limit every later chunk overflows again and clears the (empty) list: "
    "the early return only saves that work",
    (
        "xo_webhooks/request/wsgi.py",
        'return int((self.status or "0").split(None, 2)[0])',
        "1 -> 2",
    ): "the first field of a split is the same whatever the maxsplit",
    (
        "xo_webhooks/sending/delivery.py",
        "pass",
        "removed `assert self._build is not None` from `if self._payload is None`",
    ): "the assert narrows the type for mypy; without it, calling the missing build "
    "raises at the same point (and python -O drops asserts anyway)",
    (
        "xo_webhooks/sending/delivery.py",
        'delivery = cls(hook, payload, record.get("id") or False, attempts, '
        'record.get("lastError"))',
        "or operand dropped",
    ): "a record without an id gives None or False, and either makes a fresh id",
    (
        "xo_webhooks/sending/endpoints.py",
        "down = time.time() - (down_since or False)",
        "or operand dropped",
    ): "a breaker closes only after it opened, so down_since is always set there; the "
    "fallback only guards a log line",
    (
        "xo_webhooks/sending/lanes.py",
        "self._deadlines = [entry for entry in self._deadlines if entry[1] is not lane]",
        "2 -> 1",
    ): _STALE_DEADLINES,
    (
        "xo_webhooks/sending/lanes.py",
        "self._deadlines = [entry for entry in self._deadlines if entry[3] is not lane]",
        "2 -> 3",
    ): _STALE_DEADLINES,
    (
        "xo_webhooks/sending/lanes.py",
        'if lane.breaker.state == "disabled" and True',
        "and operand dropped",
    ): "draining a lane with no waiting hook returns nothing: the test only saves the call",
}


# -- making mutants ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    """One change to one module: *source* is the whole mutated module."""

    path: str
    line: int
    description: str
    source: bytes
    original: bytes

    @property
    def changed_line(self) -> str:
        """The first mutated line, stripped: how ``EQUIVALENT`` names a mutant."""
        before = self.original.decode().splitlines()
        after = self.source.decode().splitlines()
        for old, new in zip(before, after, strict=False):
            if old != new:
                return new.strip()
        return after[self.line - 1].strip() if self.line <= len(after) else ""

    def diff(self) -> str:
        lines = difflib.unified_diff(
            self.original.decode().splitlines(),
            self.source.decode().splitlines(),
            f"a/{self.path}",
            f"b/{self.path}",
            n=1,
            lineterm="",
        )
        return "\n".join(lines)

    def equivalence(self) -> str | None:
        return EQUIVALENT.get((self.path, self.changed_line, self.description))


# Comparison operators: relaxed or tightened at the boundary, or negated.
_COMPARE_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE,),
    ast.LtE: (ast.Lt,),
    ast.Gt: (ast.GtE,),
    ast.GtE: (ast.Gt,),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
}
_COMPARE_TEXT: dict[type, tuple[str, str]] = {  # (how to find it, how to write it)
    ast.Lt: (r"<(?!=)", "<"),
    ast.LtE: (r"<=", "<="),
    ast.Gt: (r">(?!=)", ">"),
    ast.GtE: (r">=", ">="),
    ast.Eq: (r"==", "=="),
    ast.NotEq: (r"!=", "!="),
    ast.In: (r"\bin\b", "in"),
    ast.NotIn: (r"\bnot\s+in\b", "not in"),
    ast.Is: (r"\bis\b(?!\s+not\b)", "is"),
    ast.IsNot: (r"\bis\s+not\b", "is not"),
}


class _Finder(ast.NodeVisitor):
    """Walks a module and records each mutation as (start, end, replacement, line, what),
    with *start* and *end* byte offsets into the source."""

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.starts = [0]
        for line in source.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))
        self.edits: list[tuple[int, int, str, int, str]] = []

    # Offsets: ast columns count UTF-8 bytes, hence a bytes source.
    def start(self, node: ast.AST) -> int:
        return self.starts[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]

    def end(self, node: ast.AST) -> int:
        return self.starts[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]

    def line_of(self, offset: int) -> int:
        return next(n for n, start in enumerate(self.starts) if start > offset)

    def add(self, start: int, end: int, text: str, what: str) -> None:
        self.edits.append((start, end, text, self.line_of(start), what))

    def replace_token(self, start: int, end: int, pattern: str, text: str, what: str) -> None:
        """Replace the token matching *pattern* between *start* and *end*."""
        between = self.source[start:end].decode()
        # Blank out comments: only the operator itself may match.
        between = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), between)
        found = re.search(pattern, between)
        if found is not None:
            token_start = start + len(between[: found.start()].encode())
            self.add(token_start, token_start + len(found.group().encode()), text, what)

    # -- what is not mutated ----------------------------------------------------------------

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return  # imports for the type checker only
        test = ast.unparse(node.test)
        for branch, statements in (("if", node.body), ("else of if", node.orelse)):
            for statement in statements:
                if isinstance(statement, ast.Pass) or (
                    isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                ):
                    continue
                first = self.source[self.start(statement) :].decode().split("\n", 1)[0]
                what = f"removed `{first}` from `{branch} {test}`"
                self.add(self.start(statement), self.end(statement), "pass", what)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        defaults = [d for d in node.args.defaults + node.args.kw_defaults if d is not None]
        for child in node.decorator_list + defaults + node.body:
            self.visit(child)  # not the annotations: they have no behaviour

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_Assign(self, node: ast.Assign) -> None:
        names = {t.id for t in node.targets if isinstance(t, ast.Name)}
        if not names & {"__all__", "__slots__"}:
            self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for child in node.body:
            self.visit(child)

    # -- mutations -----------------------------------------------------------------------------

    def visit_Compare(self, node: ast.Compare) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            pattern, _ = _COMPARE_TEXT[type(op)]
            for swap in _COMPARE_SWAPS[type(op)]:
                text = _COMPARE_TEXT[swap][1]
                what = f"{_COMPARE_TEXT[type(op)][1]} -> {text}"
                self.replace_token(self.end(left), self.start(right), pattern, text, what)
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        word, other, neutral = ("and", "or", "True") if isinstance(node.op, ast.And) else (
            "or", "and", "False",
        )  # fmt: skip
        for left, right in zip(node.values, node.values[1:], strict=False):
            what = f"{word} -> {other}"
            self.replace_token(self.end(left), self.start(right), rf"\b{word}\b", other, what)
        for value in node.values:
            self.add(self.start(value), self.end(value), neutral, f"{word} operand dropped")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self.add(self.start(node), self.start(node.operand), "", "not removed")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        swaps = {ast.Add: ("+", "-"), ast.Sub: ("-", "+")}
        if type(node.op) in swaps:
            old, new = swaps[type(node.op)]
            self.replace_token(
                self.end(node.left), self.start(node.right), re.escape(old), new, f"{old} -> {new}"
            )
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        swaps = {ast.Add: ("+=", "-="), ast.Sub: ("-=", "+=")}
        if type(node.op) in swaps:
            old, new = swaps[type(node.op)]
            self.replace_token(
                self.end(node.target),
                self.start(node.value),
                re.escape(old),
                new,
                f"{old} -> {new}",
            )
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self.add(self.start(node), self.end(node), str(not value), f"{value} -> {not value}")
        elif isinstance(value, int):
            for changed in (value + 1, value - 1):
                if changed >= 0:  # a literal is never negative (-1 is a unary minus)
                    self.add(
                        self.start(node), self.end(node), str(changed), f"{value} -> {changed}"
                    )


def mutants(path: str) -> list[Mutant]:
    """Every mutant of the module at *path* (relative to the project root)."""
    original = (ROOT / path).read_bytes()
    finder = _Finder(original)
    finder.visit(ast.parse(original, path))
    found: dict[bytes, Mutant] = {}
    for start, end, text, line, what in sorted(finder.edits):
        source = original[:start] + text.encode() + original[end:]
        if source == original or source in found:
            continue
        try:
            compile(source, path, "exec", dont_inherit=True)
        except SyntaxError:
            continue  # e.g. a removed statement that leaves nothing behind
        found[source] = Mutant(path, line, what, source, original)
    return list(found.values())


# -- running the tests -----------------------------------------------------------------------


class Workspace:
    """A private copy of the package and its tests, where one mutant at a time is applied."""

    def __init__(self, base: Path) -> None:
        self.root = base
        shutil.copytree(ROOT / "xo_webhooks", base / "xo_webhooks", ignore=_ignored)
        # As in a wheel: setup.cfg installs schemas/ as the xo_webhooks.schemas package.
        shutil.copytree(ROOT / "schemas", base / "xo_webhooks" / "schemas", ignore=_ignored)
        shutil.copytree(ROOT / "tests", base / "tests", ignore=_ignored)
        shutil.copy2(ROOT / "pyproject.toml", base / "pyproject.toml")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(base), os.environ.get("PYTHONPATH", "")]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.process: subprocess.Popen[str] | None = None

    def imported_from(self) -> str:
        """Where ``xo_webhooks`` (and its schemas) are imported from in this copy."""
        code = "import xo_webhooks.schemas as s, xo_webhooks as x; print(x.__file__, s.__file__)"
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=self.root, env=self.env,
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    def run(self, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
        """Run *tests*: ("passed" | "failed" | "timeout", seconds, output)."""
        started = time.monotonic()
        process = self.process = subprocess.Popen(
            [*PYTEST, *tests], cwd=self.root, env=self.env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            output, _ = process.communicate()
            return "timeout", time.monotonic() - started, output
        finally:
            self.process = None
        verdict = "passed" if process.returncode == 0 else "failed"
        return verdict, time.monotonic() - started, output

    def stop(self) -> None:
        """Kill the running pytest and whatever it started (its own session)."""
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    def apply(self, path: str, source: bytes) -> None:
        (self.root / path).write_bytes(source)


def _ignored(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", ".pytest_cache") or n.endswith(".pyc")]


@dataclass
class Result:
    mutant: Mutant
    verdict: str  # killed, survived, timeout
    seconds: float


def setup_failed(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def check_setup(workspaces: list[Workspace], targets: dict[str, tuple[str, ...]]) -> dict:
    """Fail loudly unless the copies are what gets imported and the tests pass on them.
    Return each module's time limit per mutant."""
    for workspace in workspaces:
        where = workspace.imported_from()
        if not all(p.startswith(str(workspace.root)) for p in where.split()):
            setup_failed(f"the copy is not what gets imported: {where}")
    # A canary: a module that cannot even be imported must fail its tests, or pytest
    # is not running the copy.
    first = workspaces[0]
    path, tests = next(iter(targets.items()))
    original = (ROOT / path).read_bytes()
    first.apply(path, original + b"\nraise ImportError('mutation canary')\n")
    verdict, _, output = first.run(tests[:1], timeout=120)
    first.apply(path, original)
    if verdict != "failed" or "mutation canary" not in output:
        setup_failed(f"the canary mutant of {path} was not caught:\n{output}")
    limits = {}
    for path, tests in targets.items():
        verdict, seconds, output = first.run(tests, timeout=600)
        if verdict != "passed":
            setup_failed(f"the tests of {path} fail without any mutant:\n{output}")
        limits[path] = 10 + 3 * seconds
        print(f"baseline {path}: {seconds:.1f} s with {len(tests)} test modules", flush=True)
    return limits


def run_all(found: list[Mutant], targets: dict, jobs: int) -> Iterator[Result]:
    with tempfile.TemporaryDirectory(prefix="xo-mutate-") as tmp:
        workspaces = [Workspace(Path(tmp) / f"w{n}") for n in range(jobs)]
        limits = check_setup(workspaces, targets)
        free: queue.Queue[Workspace] = queue.Queue()
        for workspace in workspaces:
            free.put(workspace)

        def one(mutant: Mutant) -> Result:
            workspace = free.get()
            try:
                workspace.apply(mutant.path, mutant.source)
                verdict, seconds, _ = workspace.run(targets[mutant.path], limits[mutant.path])
            finally:
                workspace.apply(mutant.path, mutant.original)
                free.put(workspace)
            verdict = {"passed": "survived", "failed": "killed"}.get(verdict, verdict)
            return Result(mutant, verdict, seconds)

        pool = concurrent.futures.ThreadPoolExecutor(jobs)
        try:
            yield from pool.map(one, found)
        finally:  # also on Ctrl-C: no pytest left running, no worker thread left waiting
            pool.shutdown(wait=False, cancel_futures=True)
            for workspace in workspaces:
                workspace.stop()
            pool.shutdown(wait=True)


# -- the report ------------------------------------------------------------------------------


def report(results: list[Result], elapsed: float) -> int:
    new_survivors = []
    print()
    for path in dict.fromkeys(r.mutant.path for r in results):
        mine = [r for r in results if r.mutant.path == path]
        count = {v: sum(r.verdict == v for r in mine) for v in ("killed", "survived", "timeout")}
        equivalent = sum(r.verdict == "survived" and bool(r.mutant.equivalence()) for r in mine)
        print(
            f"{path}: {len(mine)} mutants, {count['killed']} killed, "
            f"{count['survived']} survived ({equivalent} equivalent), {count['timeout']} timeouts"
        )
    for result in results:
        if result.verdict != "survived":
            continue
        mutant = result.mutant
        reason = mutant.equivalence()
        where = f"{mutant.path}:{mutant.line}: {mutant.description}"
        if reason:
            print(f"\nequivalent {where}\n  {mutant.changed_line}\n  why: {reason}")
        else:
            new_survivors.append(result)
            print(f"\nSURVIVED {where}\n{mutant.diff()}")
    timeouts = [r for r in results if r.verdict == "timeout"]
    for result in timeouts:
        print(f"\ntimeout {result.mutant.path}:{result.mutant.line}: {result.mutant.description}")
    total = {v: sum(r.verdict == v for r in results) for v in ("killed", "survived", "timeout")}
    print(
        f"\n{len(results)} mutants: {total['killed']} killed, {total['survived']} survived "
        f"({len(new_survivors)} not known equivalent), {total['timeout']} timeouts, "
        f"in {elapsed:.0f} s"
    )
    return 1 if new_survivors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="only the modules whose path contains these")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    args = parser.parse_args(argv)
    targets = {
        path: tests
        for path, tests in TARGETS.items()
        if not args.modules or any(m in path for m in args.modules)
    }
    if not targets:
        parser.error(f"no module matches {args.modules}")
    found = [m for path in targets for m in mutants(path)]
    if args.list:
        for mutant in found:
            print(f"{mutant.path}:{mutant.line}: {mutant.description}: {mutant.changed_line}")
        print(f"{len(found)} mutants")
        return 0
    print(f"{len(found)} mutants of {len(targets)} modules, {args.jobs} at a time", flush=True)
    started = time.monotonic()
    results = []
    for n, result in enumerate(run_all(found, targets, max(1, args.jobs)), 1):
        results.append(result)
        mark = {"killed": ".", "survived": "S", "timeout": "T"}[result.verdict]
        print(mark, end="\n" if n % 60 == 0 else "", flush=True)
    return report(results, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
