"""Tests of xo_webhooks.config: defaults, sources, precedence and error messages.

Every call passes an explicit ``environ`` so the developer's own variables never leak in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import certifi
import pytest

from xo_webhooks.config import DEFAULT_REDACT, Hook, Settings, load_settings
from xo_webhooks.errors import ConfigError, WebhookError

from .helpers import SECRET

URL = "http://hooks.example/in"
HOOK = {"method": "vm.start", "type": "pre", "url": URL}
OTHER_SECRET = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="  # 26 bytes


def hook(**changes: Any) -> dict[str, Any]:
    return {**HOOK, **changes}


def write_config(tmp_path: Path, document: Any) -> str:
    path = tmp_path / "xo-webhooks.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return str(path)


def config_error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, WebhookError)
    return str(info.value)


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings == Settings(
        hooks=(), timeout=10, max_workers=4, max_body=1024 * 1024,
        retry_schedule=(5, 300, 1800, 7200, 18000, 36000, 36000), endpoint_concurrency=2,
        breaker_threshold=5, queue_size=10000, shutdown_timeout=10, redact=DEFAULT_REDACT,
        dispatcher="thread", secret=None, dead_letter=None, ca_bundle=None, broker_url=None,
    )  # fmt: skip
    assert {"password", "secret", "token", "authorization", "cookie"} <= set(DEFAULT_REDACT)


def test_the_default_schedule_lasts_more_than_a_day() -> None:
    settings = load_settings(environ={})
    assert settings.retries == 7
    assert sum(settings.retry_schedule) == 27 * 3600 + 35 * 60 + 5  # 27 h 35 min 5 s


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param({"XO_WEBHOOKS_RETRY_SCHEDULE": "5s,5m,30m,2h,5h,10h,10h"},
                     (5, 300, 1800, 7200, 18000, 36000, 36000), id="env-the-default"),
        pytest.param({"XO_WEBHOOKS_RETRY_SCHEDULE": " 1s, 1.5s ,250ms,1d "},
                     (1, 1.5, 0.25, 86400), id="env-spaces-decimals-ms-days"),
        pytest.param({"XO_WEBHOOKS_RETRY_SCHEDULE": "0s"}, (0,), id="env-zero"),
        pytest.param({"file": {"retrySchedule": [1, 2.5, 60]}}, (1, 2.5, 60), id="file"),
        pytest.param({"file": {"retrySchedule": []}}, (), id="file-no-retries"),
        pytest.param({"kwarg": "1s,1s,2s"}, (1, 1, 2), id="kwarg-text"),
        pytest.param({"kwarg": [0.5, 1]}, (0.5, 1), id="kwarg-seconds"),
        pytest.param({"XO_WEBHOOKS_RETRIES": "3", "XO_WEBHOOKS_BACKOFF": "2"}, (2, 4, 8),
                     id="shorthand"),
        pytest.param({"XO_WEBHOOKS_RETRIES": "2"}, (1, 2), id="shorthand-default-backoff"),
        pytest.param({"XO_WEBHOOKS_BACKOFF": "30"}, (30, 60, 60, 60, 60),
                     id="shorthand-default-retries-capped"),
    ],
)  # fmt: skip
def test_retry_schedule_sources(tmp_path: Path, source: dict, expected: tuple) -> None:
    environ = {k: v for k, v in source.items() if k.startswith("XO_")}
    if "file" in source:
        environ["XO_WEBHOOKS_CONFIG"] = write_config(tmp_path, source["file"])
    kwargs = {"retry_schedule": source["kwarg"]} if "kwarg" in source else {}
    settings = load_settings(environ=environ, **kwargs)
    assert settings.retry_schedule == expected
    assert all(isinstance(delay, float) for delay in settings.retry_schedule)


@pytest.mark.parametrize(
    ("value", "item"),
    [
        pytest.param("5x", "item 1 ('5x')", id="unknown-unit"),
        pytest.param("5s,-1s", "item 2 ('-1s')", id="negative"),
        pytest.param("5s,,5m", "item 2 (empty)", id="empty-item"),
        pytest.param("5s,", "item 2 (empty)", id="trailing-comma"),
        pytest.param("5", "item 1 ('5')", id="no-unit"),
        pytest.param("1e3s", "item 1 ('1e3s')", id="exponent"),
    ],
)
def test_bad_retry_schedule_names_the_variable_and_the_item(value: str, item: str) -> None:
    message = config_error(environ={"XO_WEBHOOKS_RETRY_SCHEDULE": value})
    assert message.startswith(f"XO_WEBHOOKS_RETRY_SCHEDULE: {item} is not a duration")


def test_retry_schedule_limits() -> None:
    message = config_error(environ={"XO_WEBHOOKS_RETRY_SCHEDULE": "1s,8d"})
    assert message.startswith("XO_WEBHOOKS_RETRY_SCHEDULE[1]: ")
    assert "retry_schedule[0]" in config_error(environ={}, retry_schedule=[-1])


@pytest.mark.parametrize(
    ("environ", "kwargs", "named"),
    [
        pytest.param({"XO_WEBHOOKS_RETRY_SCHEDULE": "1s", "XO_WEBHOOKS_RETRIES": "2"}, {},
                     "XO_WEBHOOKS_RETRY_SCHEDULE and XO_WEBHOOKS_RETRIES", id="env-env"),
        pytest.param({"XO_WEBHOOKS_BACKOFF": "2"}, {"retry_schedule": "1s"},
                     "retry_schedule and XO_WEBHOOKS_BACKOFF", id="kwarg-env"),
        pytest.param({}, {"retry_schedule": [1], "retries": 1, "backoff": 1},
                     "retry_schedule and retries and backoff", id="kwargs"),
    ],
)  # fmt: skip
def test_both_forms_of_the_schedule_are_refused(environ: dict, kwargs: dict, named: str) -> None:
    message = config_error(environ=environ, **kwargs)
    assert message.startswith(f"{named}: give either a retry schedule or the retries")


def test_endpoint_concurrency_and_breaker_threshold() -> None:
    assert load_settings(environ={}, max_workers=1).endpoint_concurrency == 1
    assert load_settings(environ={}, max_workers=9).endpoint_concurrency == 4
    environ = {"XO_WEBHOOKS_ENDPOINT_CONCURRENCY": "3", "XO_WEBHOOKS_BREAKER_THRESHOLD": "2"}
    settings = load_settings(environ=environ)
    assert (settings.endpoint_concurrency, settings.breaker_threshold) == (3, 2)
    assert config_error(environ={"XO_WEBHOOKS_ENDPOINT_CONCURRENCY": "0"}).startswith(
        "XO_WEBHOOKS_ENDPOINT_CONCURRENCY: "
    )
    assert config_error(environ={"XO_WEBHOOKS_BREAKER_THRESHOLD": "x"}).startswith(
        "XO_WEBHOOKS_BREAKER_THRESHOLD: "
    )


def test_hooks_from_env_var() -> None:
    hooks = [
        hook(),
        hook(method="vm.*", type="post", format="slack"),
        hook(waitForResponse=True, headers={"Authorization": "Bearer t", "X-A": "1"}),
    ]
    settings = load_settings(environ={"XO_WEBHOOKS_HOOKS": json.dumps(hooks)})
    first, second, third = settings.hooks
    assert first == Hook("vm.start", "pre", URL)
    assert (first.format, first.wait_for_response, first.headers) == ("json", False, ())
    assert second == Hook("vm.*", "post", URL, format="slack")
    assert third.wait_for_response is True
    assert third.headers == (("Authorization", "Bearer t"), ("X-A", "1"))


def test_file_with_camel_case_keys(tmp_path: Path) -> None:
    document = {
        "hooks": [hook(type="pre/post")],
        "timeout": 2.5,
        "maxWorkers": 8,
        "maxBody": 4096,
        "queueSize": 50,
        "shutdownTimeout": 0,
        "deadLetter": "/var/lib/dead.jsonl",
        "caBundle": certifi.where(),  # it must exist: it is loaded at start
        "redact": ["pin"],
    }
    path = write_config(tmp_path, document)
    assert load_settings(environ={"XO_WEBHOOKS_CONFIG": path}) == Settings(
        hooks=(Hook("vm.start", "pre/post", URL),), timeout=2.5, max_workers=8, max_body=4096,
        queue_size=50, shutdown_timeout=0, dead_letter="/var/lib/dead.jsonl",
        ca_bundle=certifi.where(), redact=("pin",),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "kwargs", "expected"),
    [
        pytest.param({}, {}, 7.0, id="file"),
        pytest.param({"XO_WEBHOOKS_TIMEOUT": "3"}, {}, 3.0, id="env-beats-file"),
        pytest.param({"XO_WEBHOOKS_TIMEOUT": "3"}, {"timeout": 1.5}, 1.5, id="kwarg-beats-env"),
        pytest.param({"XO_WEBHOOKS_TIMEOUT": "3"}, {"timeout": None}, 3.0, id="none-kwarg-ignored"),
    ],
)
def test_setting_precedence(tmp_path: Path, env: dict, kwargs: dict, expected: float) -> None:
    environ = {"XO_WEBHOOKS_CONFIG": write_config(tmp_path, {"timeout": 7}), **env}
    assert load_settings(environ=environ, **kwargs).timeout == expected


@pytest.mark.parametrize(
    ("use_env", "use_kwarg", "expected"),
    [
        pytest.param(False, False, "file.*", id="file"),
        pytest.param(True, False, "env.*", id="env-beats-file"),
        pytest.param(True, True, "kwarg.*", id="kwarg-beats-env"),
        pytest.param(False, True, "kwarg.*", id="kwarg-beats-file"),
    ],
)
def test_hooks_precedence(tmp_path: Path, use_env: bool, use_kwarg: bool, expected: str) -> None:
    environ = {"XO_WEBHOOKS_CONFIG": write_config(tmp_path, {"hooks": [hook(method="file.*")]})}
    if use_env:
        environ["XO_WEBHOOKS_HOOKS"] = json.dumps([hook(method="env.*")])
    hooks = [hook(method="kwarg.*")] if use_kwarg else None
    assert [h.method for h in load_settings(hooks, environ=environ).hooks] == [expected]
    assert load_settings([], environ=environ).hooks == ()  # even an empty list wins


@pytest.mark.parametrize(
    ("name", "raw", "attribute", "expected"),
    [
        pytest.param("MAX_WORKERS", " 8 ", "max_workers", 8, id="integer"),
        pytest.param("TIMEOUT", "2.5", "timeout", 2.5, id="number"),
        pytest.param("RETRIES", "0", "retries", 0, id="zero"),
        pytest.param("REDACT", "pin, ssn ,,cvv", "redact", ("pin", "ssn", "cvv"), id="redact-list"),
        pytest.param("REDACT", "", "redact", (), id="redact-empty"),
        pytest.param("DISPATCHER", "celery", "dispatcher", "celery", id="enum"),
        pytest.param("BROKER_URL", "redis://q:6379/0", "broker_url", "redis://q:6379/0", id="url"),
    ],
)
def test_env_values_are_converted(name: str, raw: str, attribute: str, expected: Any) -> None:
    settings = load_settings(environ={"XO_WEBHOOKS_" + name: raw})
    assert getattr(settings, attribute) == expected
    assert type(getattr(settings, attribute)) is type(expected)


def test_redact_kwarg_and_unknown_kwarg() -> None:
    assert load_settings(environ={}, redact=()).redact == ()
    assert load_settings(environ={}, redact=["pin"]).redact == ("pin",)
    with pytest.raises(TypeError, match="maxWorkers"):
        load_settings(environ={}, maxWorkers=3)


@pytest.mark.parametrize(
    ("type_", "pre", "post"),
    [
        pytest.param("pre", True, False, id="pre"),
        pytest.param("post", False, True, id="post"),
        pytest.param("pre/post", True, True, id="pre/post"),
    ],
)
def test_hook_pre_post(type_: str, pre: bool, post: bool) -> None:
    (only,) = load_settings([hook(type=type_)], environ={}).hooks
    assert (only.pre, only.post, only.signed) == (pre, post, False)


def test_secrets_global_and_per_hook() -> None:
    hooks = [HOOK, hook(secret=OTHER_SECRET)]
    first, second = load_settings(hooks, environ={"XO_WEBHOOKS_SECRET": SECRET}).hooks
    assert (first.secret, first.signed) == (SECRET, True)
    assert (second.secret, second.signed) == (OTHER_SECRET, True)


def test_secrets_never_in_repr() -> None:
    settings = load_settings(
        [hook(secret=OTHER_SECRET, headers={"Authorization": "Bearer tok3n"})],
        environ={},
        secret=SECRET,
        broker_url="redis://user:pa55@q/0",
    )
    for text in (repr(settings), repr(settings.hooks[0]), str(settings)):
        for hidden in (SECRET, OTHER_SECRET, "tok3n", "pa55"):
            assert hidden not in text


BAD_HOOKS = [
    pytest.param({"type": "pré"}, ".type: 'pré' is not one of", id="type"),
    pytest.param({"url": None}, ": 'url' is a required property", id="no-url"),
    pytest.param({"url": "ftp://h/x"}, ".url: ", id="ftp"),
    pytest.param({"url": "file:///etc/passwd"}, ".url: ", id="file-url"),
    pytest.param({"url": "javascript:alert(1)"}, ".url: ", id="javascript"),
    pytest.param({"url": "http://"}, ".url: ", id="no-host"),
    pytest.param({"url": "http://h/a b"}, ".url: ", id="space-in-url"),
    pytest.param({"method": ""}, ".method: ", id="empty-method"),
    pytest.param({"method": "vm start"}, ".method: ", id="space-in-method"),
    pytest.param({"format": "xml"}, ".format: 'xml' is not one of", id="format"),
    pytest.param({"bogus": 1}, ": Additional properties", id="unknown-key"),
    pytest.param({"headers": {"Bad Name": "x"}}, ".headers: ", id="header-name"),
    pytest.param(
        {"headers": {"X-N": 1}},
        ".headers.X-N: invalid value (not shown): must be of type string",
        id="header-value",
    ),
    pytest.param(
        {"type": "post", "waitForResponse": True},
        ".waitForResponse: True is not allowed: waitForResponse applies to pre hooks only",
        id="wait-on-post",
    ),
]


@pytest.mark.parametrize(("changes", "expected"), BAD_HOOKS)
def test_bad_hooks(changes: dict, expected: str) -> None:
    bad = {k: v for k, v in hook(**changes).items() if v is not None}
    assert config_error(hooks=[HOOK, bad], environ={}).startswith("hooks[1]" + expected)


BAD_SETTINGS = [
    pytest.param({"timeout": 0}, "timeout: 0 is less than or equal to", id="timeout-zero"),
    pytest.param({"timeout": True}, "timeout: True is not of type 'number'", id="timeout-bool"),
    pytest.param({"max_workers": 257}, "max_workers: 257 is greater than", id="workers-high"),
    pytest.param({"max_workers": "4"}, "max_workers: '4' is not of type", id="workers-str"),
    pytest.param({"retries": -1}, "retries: -1 is less than", id="retries"),
    pytest.param({"queue_size": 0}, "queue_size: ", id="queue-size"),
    pytest.param({"dispatcher": "process"}, "dispatcher: 'process' is not one of", id="dispatcher"),
    pytest.param({"redact": [""]}, "redact[0]: ", id="redact-empty-word"),
    pytest.param({"redact": "password"}, "redact: ", id="redact-str"),
]


@pytest.mark.parametrize(("kwargs", "expected"), BAD_SETTINGS)
def test_bad_kwargs(kwargs: dict, expected: str) -> None:
    assert config_error(environ={}, **kwargs).startswith(expected)


def test_exact_message_from_env_var() -> None:
    hooks = [HOOK, HOOK, hook(type="pré")]
    message = config_error(environ={"XO_WEBHOOKS_HOOKS": json.dumps(hooks)})
    assert message == "XO_WEBHOOKS_HOOKS[2].type: 'pré' is not one of ['pre', 'post', 'pre/post']"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"XO_WEBHOOKS_TIMEOUT": "abc"}, "XO_WEBHOOKS_TIMEOUT: 'abc'", id="timeout"),
        pytest.param({"XO_WEBHOOKS_MAX_WORKERS": "2.5"}, "XO_WEBHOOKS_MAX_WORKERS: ", id="workers"),
        pytest.param({"XO_WEBHOOKS_HOOKS": "[{"}, "XO_WEBHOOKS_HOOKS: not valid JSON", id="json"),
        pytest.param(
            {"XO_WEBHOOKS_HOOKS": "{}"},
            "XO_WEBHOOKS_HOOKS: expected array, got an object",
            id="object",
        ),
        pytest.param({"XO_WEBHOOKS_BROKER_URL": "amqp://"}, "XO_WEBHOOKS_BROKER_URL:", id="broker"),
    ],
)
def test_bad_env_values(environ: dict, expected: str) -> None:
    assert config_error(environ=environ).startswith(expected)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param('{"hooks": [', "not valid JSON", id="invalid-json"),
        pytest.param("[]", "expected a JSON object", id="not-an-object"),
        pytest.param(None, "cannot read the file", id="missing"),
    ],
)
def test_unreadable_file(tmp_path: Path, content: Any, expected: str) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    message = config_error(environ={"XO_WEBHOOKS_CONFIG": str(path)})
    assert message.startswith(f"XO_WEBHOOKS_CONFIG={path}: {expected}")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param({"hooks": [hook(url="ftp://h/")]}, "hooks[0].url: ", id="bad-url"),
        pytest.param({"hooks": [hook(extra=1)]}, "hooks[0]: Additional properties", id="hook-key"),
        pytest.param({"timeOut": 3}, "timeOut: Additional properties", id="top-level-key"),
        pytest.param({"max_workers": 3}, "max_workers: Additional properties", id="snake-in-file"),
    ],
)
def test_bad_file_values(tmp_path: Path, document: dict, expected: str) -> None:
    path = write_config(tmp_path, document)
    assert config_error(environ={"XO_WEBHOOKS_CONFIG": path}).startswith(f"{path}: {expected}")


MALFORMED_SECRETS = [
    pytest.param("whsec_tooShort", id="short"),
    pytest.param("sk_live_0123456789abcdefghij", id="no-prefix"),
    pytest.param("whsec_" + "A" * 17, id="bad-padding"),
    pytest.param("whsec_" + "A" * 16 + "-_", id="urlsafe-alphabet"),
    pytest.param("whsec_" + "A" * 16 + "\n", id="trailing-newline"),
]


SECRET_PLACES = {  # where -> (secret, write_config) -> (environ, kwargs)
    "kwarg": lambda s, cfg: ({}, {"secret": s}),
    "env": lambda s, cfg: ({"XO_WEBHOOKS_SECRET": s}, {}),
    "file": lambda s, cfg: ({"XO_WEBHOOKS_CONFIG": cfg({"secret": s})}, {}),
    "hook": lambda s, cfg: ({}, {"hooks": [hook(secret=s)]}),
    "file-hook": lambda s, cfg: ({"XO_WEBHOOKS_CONFIG": cfg({"hooks": [hook(secret=s)]})}, {}),
}


@pytest.mark.parametrize("secret", MALFORMED_SECRETS)
@pytest.mark.parametrize("where", list(SECRET_PLACES))
def test_malformed_secret_is_rejected_unechoed(tmp_path: Path, secret: str, where: str) -> None:
    environ, kwargs = SECRET_PLACES[where](secret, lambda doc: write_config(tmp_path, doc))
    message = config_error(environ=environ, **kwargs)
    assert "secret" in message.lower()
    assert secret.strip() not in message
    assert secret.removeprefix("whsec_").strip() not in message


@pytest.mark.parametrize(
    ("environ", "kwargs", "hidden"),
    [
        pytest.param(
            {"XO_WEBHOOKS_HOOKS": json.dumps(hook(secret=OTHER_SECRET))},
            {},
            OTHER_SECRET,
            id="hooks-an-object",
        ),
        pytest.param({}, {"hooks": [[hook(secret=OTHER_SECRET)]]}, OTHER_SECRET, id="hook-a-list"),
        pytest.param({}, {"broker_url": "amqp://user:pa55@q/0"}, "pa55", id="broker-url-password"),
    ],
)
def test_credentials_not_echoed(environ: dict, kwargs: dict, hidden: str) -> None:
    assert hidden not in config_error(environ=environ, **kwargs)


@pytest.mark.parametrize(
    ("environ", "kwargs"),
    [
        pytest.param({"XO_WEBHOOKS_TIMEOUT": "nan"}, {}, id="env-timeout"),
        pytest.param({}, {"backoff": math.nan}, id="kwarg-backoff"),
        pytest.param({}, {"shutdown_timeout": math.nan}, id="kwarg-shutdown-timeout"),
    ],
)
def test_nan_is_rejected(environ: dict, kwargs: dict) -> None:
    config_error(environ=environ, **kwargs)


def test_url_with_trailing_newline_is_rejected() -> None:
    assert config_error(environ={}, hooks=[hook(url=URL + "\n")]).startswith("hooks[0].url: ")


@pytest.mark.parametrize("name", ["max_workers", "max_body", "retries", "queue_size"])
def test_integer_settings_are_ints(name: str) -> None:
    # Settings are validated against the JSON schema, where 4.0 is an integer: it is
    # accepted, and converted (range() and the queue bound want an int).
    value = getattr(load_settings(environ={}, **{name: 4.0}), name)
    assert type(value) is int and value == 4
    with pytest.raises(ConfigError, match=rf"^{name}: 4.5 is not of type 'integer'"):
        load_settings(environ={}, **{name: 4.5})


@pytest.mark.parametrize("name", ["XO_WEBHOOKS_HOOKS", "XO_WEBHOOKS_TIMEOUT", "XO_WEBHOOKS_SECRET"])
def test_an_empty_variable_is_unset(name: str) -> None:
    assert load_settings(environ={name: "  "}) == load_settings(environ={})


def test_header_values_with_line_breaks_are_rejected() -> None:
    bad = [
        {"method": "a", "type": "pre", "url": "http://127.0.0.1/", "headers": {"X": "a\r\nB: c"}}
    ]
    with pytest.raises(ConfigError, match=r"hooks\[0\]\.headers\.X: invalid value \(not shown\)"):
        load_settings(bad, {})


def _hook(**extra: object) -> list[dict[str, object]]:
    return [{"method": "a", "type": "pre", "url": "http://127.0.0.1/", **extra}]


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param({"headers": {"Content-Length": "5"}}, r"headers\.Content-Length: set by",
                     id="content-length"),
        pytest.param({"headers": {"host": "x"}}, r"headers\.host: set by", id="host"),
        pytest.param({"headers": {"Webhook-Signature": "v1,x"}}, r"headers\.Webhook-Signature: set",
                     id="signature"),
        pytest.param({"headers": {"X": "ok\n"}}, r"headers\.X: invalid value \(not shown\)",
                     id="trailing-newline"),
        pytest.param({"headers": {"X": "Bearer ő"}}, r"headers\.X: invalid value \(not shown\): an",
                     id="not-latin-1"),
        pytest.param({"url": "http://127.0.0.1:99999/"}, r"hooks\[0\]\.url: Port", id="port"),
        pytest.param({"url": "http://[::1/x"}, r"hooks\[0\]\.url: ", id="broken-ipv6"),
    ],
)  # fmt: skip
def test_hooks_that_would_fail_at_request_time_fail_at_start(extra, message) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load_settings(_hook(**extra), {})
    assert "ő" not in str(raised.value)


def test_a_url_password_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_hook(url="ftp://user:SEKRIT@127.0.0.1/"), {})
    assert "SEKRIT" not in str(raised.value) and "user:***@" in str(raised.value)


def test_an_unreadable_ca_bundle_fails_at_start(tmp_path) -> None:
    environ = {"XO_WEBHOOKS_CA_BUNDLE": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError, match=r"^XO_WEBHOOKS_CA_BUNDLE: cannot load the CA bundle"):
        load_settings(_hook(), environ)
