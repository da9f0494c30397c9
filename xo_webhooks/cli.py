"""The ``xo-webhooks`` command (also ``python -m xo_webhooks``).

Subcommands: ``serve`` (an app wrapped by the middleware, on werkzeug's server),
``check-config``, ``test`` (the plugin's "test" button), ``validate`` (payloads against
the schema), ``receive`` (the safe receiver), ``replay`` (a dead-letter file),
``spool`` (what waits in a spool) and ``demo``. Exit status: 0 success, 1 a failed
check or an error, 2 a usage error; an expected error is one line on stderr,
``xo-webhooks: error: <what and where>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO
from urllib.parse import urlsplit

from ._text import shorten
from ._urls import endpoint_of, mask_passwords, masked_url
from ._version import __version__
from .config import ENV_PREFIX, Settings, load_settings, unknown_variables
from .errors import ConfigError

if TYPE_CHECKING:
    from .sending.spool import Spool

__all__ = ["main"]

PROG = "xo-webhooks"
USAGE, FAILED, INTERRUPTED = 2, 1, 130
MESSAGE_LIMIT = 300  # characters of a "not JSON" message
Runner = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """An expected failure: one line on stderr and exit status *status*."""

    def __init__(self, message: str, status: int = FAILED) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with *argv* (``sys.argv[1:]`` by default); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse says which)
        return e.code if isinstance(e.code, int) else USAGE
    try:
        return int(args.run(args))
    except (CommandError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status if isinstance(e, CommandError) else FAILED
    except KeyboardInterrupt:
        return INTERRUPTED
    except SystemExit as e:  # werkzeug exits when the receiver's port is taken
        return e.code if isinstance(e.code, int) else FAILED
    except BrokenPipeError:  # `xo-webhooks check-config | head -1`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``xo-webhooks`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Xen Orchestra-style web hooks for WSGI JSON-RPC apps.",
        epilog="Exit status: 0 success, 1 a failed check or an error, 2 a usage error.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, run: Runner, summary: str, details: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=f"{summary}. {details}")
        sub.set_defaults(run=run)
        return sub

    serve = command(
        "serve",
        cmd_serve,
        "Serve a WSGI app wrapped by the middleware",
        "The hooks and settings come from the environment, as for the middleware. "
        "werkzeug's threaded server runs until Ctrl-C or SIGTERM, then the pending "
        "hooks are flushed (up to XO_WEBHOOKS_SHUTDOWN_TIMEOUT seconds).",
    )
    serve.add_argument(
        "app",
        metavar="MODULE:APP",
        type=_app_spec,
        help="the app to import, e.g. myapi:app (a Flask app is wrapped through its wsgi_app)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    serve.add_argument(
        "--port", type=_port, default=8000, help="0 picks a free port (default: %(default)s)"
    )

    check = command(
        "check-config",
        cmd_check_config,
        "Print the hooks and settings the middleware would load",
        "The configuration is read from the environment (XO_WEBHOOKS_HOOKS, "
        "XO_WEBHOOKS_CONFIG, ...) exactly as the middleware reads it; exit 1 with the "
        "reason if it is invalid, or if an XO_WEBHOOKS_ variable names no setting. URLs "
        "are shown with their password and query values masked.",
    )
    check.add_argument(
        "--show-urls", action="store_true", help="print the hook URLs whole, secrets included"
    )

    test = command(
        "test",
        cmd_test,
        "Send test hooks to a URL, as the plugin's test button",
        "A simulated vm.start pre hook, then its post hook (same callId), go through the "
        "real delivery path (timeout, signing, redaction from the environment), first "
        "attempt only; exit 1 unless both are answered with 2xx.",
    )
    test.add_argument("url", metavar="URL", type=_http_url, help="the receiver's URL")
    test.add_argument(
        "--format", choices=_formats(), default="json", help="body format (default: %(default)s)"
    )
    test.add_argument(
        "--secret", metavar="whsec_...", help=f"sign the hooks (default: {ENV_PREFIX}SECRET)"
    )

    validate = command(
        "validate",
        cmd_validate,
        "Check hook payloads against the payload schema",
        "The input is one JSON payload, or JSON Lines (one payload a line). Each error "
        "is printed with its line and JSON path; exit 1 if any payload is invalid.",
    )
    validate.add_argument(
        "file", metavar="FILE", nargs="?", default="-", help="a file; - or nothing reads stdin"
    )

    receive = command(
        "receive",
        cmd_receive,
        "Receive hooks and run a script for each",
        "Each POST is checked (size, signature, schema), logged in one line, and runs "
        "<DIR>/<method>-<type>.sh with the payload on its stdin, until Ctrl-C or SIGTERM.",
    )
    receive.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    receive.add_argument(
        "--port", type=_port, default=3000, help="0 picks a free port (default: %(default)s)"
    )
    receive.add_argument(
        "--scripts", metavar="DIR", help="the folder of hook scripts (default: only log hooks)"
    )
    receive.add_argument(
        "--secret", metavar="whsec_...", help=f"require signed hooks (default: {ENV_PREFIX}SECRET)"
    )
    receive.add_argument(
        "--read-timeout",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="time a client has to send its whole request, headers and body (default: %(default)g)",
    )
    receive.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=256,
        help="connections served at once; more are answered 503 with Retry-After "
        "(default: %(default)s)",
    )

    replay = command(
        "replay",
        cmd_replay,
        "Re-send the hooks of a dead-letter file",
        "Each record goes to its URL with the configured retries; the file keeps only "
        "those that still fail, and the lines that are not usable records, as they were "
        "(exit 1 if any). Also takes the working files of replays that died.",
    )
    replay.add_argument("file", metavar="FILE", help="the dead-letter file (JSON Lines)")

    spool = command(
        "spool",
        cmd_spool,
        "Show the hooks waiting in a spool, per endpoint",
        "For each endpoint: hooks due now, waiting for a later attempt, and leased by a "
        "running process, the oldest one's age, and the breaker state shared by the "
        "processes of the spool.",
    )
    spool.add_argument(
        "path", metavar="PATH", nargs="?", help=f"the spool file (default: {ENV_PREFIX}SPOOL)"
    )
    action = spool.add_mutually_exclusive_group()
    action.add_argument(
        "--retry-now",
        action="store_true",
        help="make every waiting hook due now, and probe every endpoint that is down now "
        "(after a receiver came back)",
    )
    action.add_argument(
        "--dead-letter",
        action="store_true",
        help=f"move every hook no running process holds to the dead-letter file "
        f"({ENV_PREFIX}DEAD_LETTER)",
    )

    command(
        "demo",
        cmd_demo,
        "Run the demo",
        "A JSON-RPC API wrapped by the middleware and a receiver on 127.0.0.1, a few calls, "
        "and the hooks they sent.",
    )
    return parser


# -- serve ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from werkzeug.serving import make_server

    from .request.middleware import WebhookMiddleware

    app = _import_app(args.app)
    inner = getattr(app, "wsgi_app", app)  # Flask: wrap the inner app, keep Flask's __call__
    if isinstance(inner, WebhookMiddleware):  # the module wraps it already: no double hooks
        middleware = inner
    elif inner is app:
        app = middleware = WebhookMiddleware(app)
    else:
        middleware = app.wsgi_app = WebhookMiddleware(inner)
    try:
        listening = _listen(args.host, args.port)
    except OSError as e:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    with listening:  # werkzeug works on a duplicate of it
        server = make_server(args.host, args.port, app, threaded=True, fd=listening.fileno())
    _configure_logging()
    try:
        with _sigterm_as_interrupt():  # from the moment a client may learn the URL
            _print_hooks(middleware.settings, sys.stdout)
            url = f"http://{_host(args.host)}:{server.port}/"
            print(f"listening on {url} (Ctrl-C to stop)", flush=True)
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("stopping: flushing hooks (Ctrl-C again to dead-letter them now)", flush=True)
    try:
        with _sigterm_as_interrupt():
            middleware.close()
    except KeyboardInterrupt:
        middleware.close(0)
    stats = middleware.stats()
    print(
        f"stopped: {stats['delivered']} hook(s) delivered, {stats['failed']} failed "
        f"({stats['dead_lettered']} dead-lettered, {stats['lost']} lost)",
        flush=True,
    )
    return 0


def _import_app(spec: tuple[str, str]) -> Any:
    module_name, attr = spec
    # Like gunicorn and flask: an app in the current folder is found without PYTHONPATH.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CommandError(
                f"cannot import {module_name!r}: no module named {e.name!r} "
                "(is it in the current folder or on PYTHONPATH?)"
            ) from None
        raise CommandError(f"importing {module_name!r} failed: {_one_line(e)}") from None
    except SyntaxError as e:
        raise CommandError(f"importing {module_name!r} failed: SyntaxError: {e}") from None
    except Exception as e:  # the app's own module raised: say what and where, briefly
        raise CommandError(f"importing {module_name!r} failed: {_one_line(e)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CommandError(f"{module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise CommandError(
            f"{module_name}:{attr} is not a WSGI application (a {type(obj).__name__}, not callable)"
        )
    return obj


def _one_line(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}{where}"


# -- check-config -----------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings()
    _print_hooks(settings, sys.stdout, show_urls=args.show_urls)
    _print_endpoints(settings, sys.stdout)
    print("\nsettings:")
    for field in dataclasses.fields(settings):
        if field.name != "hooks":
            value = getattr(settings, field.name)
            print(f"  {ENV_PREFIX}{field.name.upper()}={_setting(field.name, value)}")
    unknown = unknown_variables(os.environ)
    if unknown:
        print(f"\n{len(unknown)} unknown variable(s), ignored:")
        for name, closest in unknown:
            print(f"  {name}" + (f" (did you mean {closest}?)" if closest else ""))
    return 1 if unknown else 0


def _print_hooks(settings: Settings, out: TextIO, show_urls: bool = False) -> None:
    if not settings.hooks:
        print(
            f"no hooks configured ({ENV_PREFIX}HOOKS or {ENV_PREFIX}CONFIG): "
            "the middleware passes every request through untouched",
            file=out,
        )
        return
    rows = [("METHOD", "TYPE", "URL", "FORMAT", "WAITFORRESPONSE", "SIGNED")]
    rows += [
        (
            h.method,
            h.type,
            h.url if show_urls else masked_url(h.url),
            h.format,
            _yes(h.wait_for_response),
            _yes(h.signed),
        )  # fmt: skip
        for h in settings.hooks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"{len(settings.hooks)} hook(s):", file=out)
    for row in rows:
        print(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )
    out.flush()


def _print_endpoints(settings: Settings, out: TextIO) -> None:
    """The endpoints (origins) the hooks go to, each with the hooks that use it."""
    endpoints: dict[str, list[str]] = {}
    for n, hook in enumerate(settings.hooks):
        endpoints.setdefault(endpoint_of(hook.url), []).append(f"hooks[{n}]")
    if not endpoints:
        return
    width = max(map(len, endpoints))
    print(f"\n{len(endpoints)} endpoint(s):", file=out)
    for origin, hooks in endpoints.items():
        print(f"  {origin.ljust(width)}  {', '.join(hooks)}", file=out)


def _setting(name: str, value: Any) -> str:
    if name == "retry_schedule":
        return ",".join(map(_duration, value)) or "(no retries)"
    if name in ("secret", "broker_url"):  # may hold credentials: say only whether set
        return "(not set)" if value is None else "(set, not shown)"
    if name in ("dead_letter", "spool") and value is not None:  # a redis:// password
        return masked_url(value)
    if value is None:
        return "(not set)"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(empty)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    """``300`` -> ``5m``: the largest unit that writes *seconds* whole."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# -- test -------------------------------------------------------------------------------


def cmd_test(args: argparse.Namespace) -> int:
    from .request.jsonrpc import Outcome
    from .request.payload import post_payload, pre_payload
    from .sending.delivery import Delivery, Sender

    hook: dict[str, Any] = {
        "method": "vm.start",
        "type": "pre/post",
        "url": args.url,
        "format": args.format,
    }
    if args.secret is not None:
        hook["secret"] = args.secret
    try:
        settings = load_settings([hook])
    except ConfigError as e:  # about our one hook: name the argument, a usage error
        message = str(e).replace("hooks[0].secret", "--secret").replace("hooks[0].url", "URL")
        raise CommandError(message, USAGE if message != str(e) else FAILED) from None
    sender = Sender(settings)
    call_id, user = uuid.uuid4().hex, ("xo-webhooks-test", "xo-webhooks test")
    method, params = "vm.start", {"id": "00000000-0000-0000-0000-000000000000"}
    start = int(time.time() * 1000)
    pre = pre_payload(call_id, user, method, params, start)
    failed = 0
    print(
        f"sending a simulated {method} call (callId {call_id}) to {mask_passwords(args.url)}"
        f" as {args.format}"
    )
    for kind in ("pre", "post"):
        if kind == "post":
            end = int(time.time() * 1000)
            payload = post_payload(call_id, user, method, params, start, end, Outcome(True))
        else:
            payload = pre
        began = time.monotonic()
        attempt = sender.send(Delivery(settings.hooks[0], payload))
        took = (time.monotonic() - began) * 1000
        if attempt.delivered:
            print(f"  {kind:<4} HTTP {attempt.status} in {took:.0f} ms")
        else:
            failed += 1
            print(f"  {kind:<4} failed after {took:.0f} ms: {attempt.error}")
    print("both hooks delivered" if not failed else f"{failed} of 2 hooks failed")
    return FAILED if failed else 0


# -- validate ---------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from .schema import error_message, validator

    name = "<stdin>" if args.file == "-" else args.file
    text = _read_input(args.file, name)
    payloads = _split_payloads(text)
    if not payloads:
        raise CommandError(f"{name}: no payload found (empty input)")
    check = validator("hook-payload")
    invalid = 0
    for line, payload, problem in payloads:
        where = name if line is None else f"{name}:{line}"
        problems = (
            [problem]
            if problem
            else [
                f"{e.json_path}: {error_message(e)}"
                for e in sorted(check.iter_errors(payload), key=lambda e: e.json_path)
            ]
        )
        invalid += bool(problems)
        for problem_text in problems:
            print(f"{where}: {problem_text}")
    total = len(payloads)
    if total == 1:
        print("the payload is invalid" if invalid else "the payload is valid")
    else:
        print(f"{invalid} of {total} payloads invalid" if invalid else f"{total} payloads valid")
    return FAILED if invalid else 0


def _read_input(path: str, name: str) -> str:
    try:
        if path == "-":
            if sys.stdin.isatty():
                raise CommandError("validate: give a FILE, or pipe payloads into stdin", USAGE)
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CommandError(f"cannot read {name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CommandError(f"{name}: not UTF-8 text (byte {e.start})") from None


def _split_payloads(text: str) -> list[tuple[int | None, Any, str | None]]:
    """``(line or None, payload, parse problem)`` for the whole text if it is one JSON
    value, else for each non-blank line (JSON Lines)."""
    if not text.strip():
        return []
    try:
        return [(None, json.loads(text), None)]
    except (ValueError, RecursionError):
        pass
    payloads: list[tuple[int | None, Any, str | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                payloads.append((number, json.loads(line), None))
            except (ValueError, RecursionError) as e:
                payloads.append((number, None, f"not JSON: {shorten(str(e), MESSAGE_LIMIT)}"))
    return payloads


# -- receive, replay, demo --------------------------------------------------------------


def cmd_receive(args: argparse.Namespace) -> int:
    from . import receiver  # imported only when asked for

    # Only the secret is read, not the whole sender configuration: a receiver must not
    # refuse to start because the hooks configured in the same shell are wrong.
    secret, source, status = args.secret, "--secret", USAGE
    if secret is None:
        secret, source, status = os.environ.get(f"{ENV_PREFIX}SECRET"), f"{ENV_PREFIX}SECRET", 1
    if secret is not None:
        try:  # the sender's rule for secrets, so that both ends accept the same ones
            load_settings([], environ={}, secret=secret)
        except ConfigError as e:
            reason = str(e).partition(":")[2]
            raise CommandError(f"{source}:{reason}", status) from None
    limits = {"read_timeout": args.read_timeout, "max_connections": args.max_connections}
    _configure_logging()
    try:
        with _sigterm_as_interrupt():
            receiver.serve(args.host, args.port, args.scripts, secret, **limits)
    except ConfigError as e:  # the scripts folder (1), or a limit out of range (usage, 2)
        option, _, reason = str(e).partition(":")
        if option in limits:
            raise CommandError(f"--{option.replace('_', '-')}:{reason}", USAGE) from None
        raise CommandError(str(e).replace("scripts_dir:", "--scripts:", 1)) from None
    except OSError as e:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    except KeyboardInterrupt:  # a signal before serve() was ready to catch it
        pass
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .sending.replay import replay

    settings = load_settings()
    target = mask_passwords(args.file)
    try:
        report = replay(args.file, settings)
    except FileNotFoundError:
        raise CommandError(f"cannot replay {target}: no such file") from None
    except OSError as e:
        raise CommandError(f"cannot replay {target}: {e.strerror or e}") from None
    except ImportError as e:  # a redis:// target without the celery extra
        message = f"cannot replay {target}: {e} (pip install 'xo-webhooks[celery]')"
        raise CommandError(message) from None
    except Exception as e:  # redis-py's errors (unreachable server...) are not OSErrors
        if not type(e).__module__.startswith("redis."):
            raise
        raise CommandError(f"cannot replay {target}: {type(e).__name__}: {e}") from None
    spooled = f", waiting in the spool {report.spooled}" if settings.spool else ""
    unusable = f", unusable {report.unusable} (kept as they were)" if report.unusable else ""
    unmatched = (
        f", for no configured hook {report.unmatched} (kept: their URL is masked and no "
        "hook has their fingerprint)"
        if report.unmatched
        else ""
    )
    notices = (
        f", notices {report.notices} (calls over XO_WEBHOOKS_MAX_CALLS, kept)"
        if report.notices
        else ""
    )
    print(
        f"read {report.read}, delivered {report.delivered}, still failing {report.failed}"
        + spooled
        + unusable
        + unmatched
        + notices
    )
    return FAILED if report.failed or report.unusable or report.unmatched else 0


# -- spool ------------------------------------------------------------------------------


def cmd_spool(args: argparse.Namespace) -> int:
    import sqlite3

    from .sending.spool import Spool

    settings = load_settings()
    path = args.path or settings.spool
    if not path:
        raise CommandError(f"give the spool's PATH, or set {ENV_PREFIX}SPOOL", USAGE)
    if not os.path.isfile(path):
        raise CommandError(f"cannot open the spool {path}: no such file")
    if args.dead_letter and not settings.dead_letter:
        raise CommandError(f"--dead-letter needs {ENV_PREFIX}DEAD_LETTER: where to move the hooks")
    try:
        spool = Spool(path)
        try:
            return _spool_action(spool, args, settings)
        finally:
            spool.close()
    except (sqlite3.Error, OSError) as e:
        raise CommandError(f"cannot read the spool {path}: {e}") from None


def _spool_action(spool: Spool, args: argparse.Namespace, settings: Settings) -> int:
    now = time.time()
    if args.retry_now:
        count = spool.retry_now(now)
        print(f"{count} waiting hook(s) due now; endpoints that are down get a probe now")
        return 0
    if args.dead_letter:
        from .sending.policy import open_dead_letter

        target = str(settings.dead_letter)  # checked by cmd_spool
        with spool.taken(now) as messages:
            records = [
                {**{k: v for k, v in m.items() if k != "created"}, "failedAt": _utc(now)}
                for m in messages
            ]
            open_dead_letter(target).append(records)
        left = sum(e.leased for e in spool.summary(now))
        held = f"; {left} held by running processes stay" if left else ""
        print(f"moved {len(records)} hook(s) to {mask_passwords(target)}{held}")
        return 0
    rows = [("ENDPOINT", "DUE", "WAITING", "LEASED", "OLDEST", "BREAKER")]
    rows += [
        (mask_passwords(e.endpoint), str(e.due), str(e.waiting), str(e.leased),
         _age(now - e.oldest) if e.oldest is not None else "-", e.state)
        for e in spool.summary(now)
    ]  # fmt: skip
    if len(rows) == 1:
        print(f"{spool.path}: empty")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _age(seconds: float) -> str:
    """``4000`` -> ``1h 6m``: the two largest units."""
    seconds = max(0, int(seconds))
    parts = [(seconds // 86400, "d"), (seconds % 86400 // 3600, "h"),
             (seconds % 3600 // 60, "m"), (seconds % 60, "s")]  # fmt: skip
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0s"


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return 0 if run_demo(sys.stdout) else FAILED


# -- helpers ----------------------------------------------------------------------------


def _app_spec(value: str) -> tuple[str, str]:
    module, _, attr = value.partition(":")
    if not module or not attr:
        raise argparse.ArgumentTypeError(f"expected MODULE:APP such as myapi:app, got {value!r}")
    return module, attr


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value!r}")
    return int(value)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def _formats() -> tuple[str, ...]:
    from .sending.formats import FORMATS

    return FORMATS


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a busy port is our one-line error
    (werkzeug would print two lines and exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Formatter(logging.Formatter):
    """Plain messages for INFO (a receiver's hook line, werkzeug's access line carry their
    own time); level and logger name for what needs attention."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno > logging.INFO:
            text = f"{record.levelname} {record.name}: {text}"
        return text


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a process manager's stop) like Ctrl-C while the block runs."""

    def interrupt(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
