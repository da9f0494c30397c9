"""Configuration: the only module that reads the ``XO_WEBHOOKS_*`` variables.

Settings come from three sources, highest priority first: keyword arguments of the
middleware (snake_case), environment variables (``XO_WEBHOOKS_<NAME>``), and the JSON
file named by ``XO_WEBHOOKS_CONFIG`` (camelCase keys). The merged document is validated
against ``schemas/config.schema.json`` once, at start; every error names its source and
the path of the bad field. What comes out is a frozen :class:`Settings`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import ValidationError

from ._urls import ascii_url, fingerprint, mask_passwords, masked_url, parse_http_url, short_url
from .errors import ConfigError
from .schema import error_message, load_schema, validator
from .signing import parse_secret

__all__ = [
    "unknown_variables",
    "Hook",
    "Settings",
    "load_settings",
    "parse_durations",
    "ENV_PREFIX",
    "DEFAULT_REDACT",
    "DEFAULT_RETRY_SCHEDULE",
]

logger = logging.getLogger(__name__)

ENV_PREFIX = "XO_WEBHOOKS_"
DEFAULT_REDACT = (
    "password", "passwd", "secret", "token", "apikey", "api_key",
    "authorization", "cookie", "privatekey", "private_key", "pwd", "passphrase",
    "credential",
)  # fmt: skip
DEFAULTS: dict[str, Any] = {
    "timeout": 10.0,
    "maxWorkers": 4,
    "maxBody": 1024 * 1024,
    "paths": [],
    "retrySchedule": None,  # DEFAULT_RETRY_SCHEDULE, unless retries or backoff is given
    "retries": None,
    "backoff": None,
    "endpointConcurrency": None,  # half of maxWorkers, at least 1
    "breakerThreshold": 5,
    "maxCalls": 1000,
    "queueSize": 10000,
    "deadLetter": None,
    "shutdownTimeout": 10.0,
    "secret": None,
    "redact": list(DEFAULT_REDACT),
    "caBundle": None,
    "dispatcher": "thread",
    "brokerUrl": None,
    "metricsPort": None,
    "spool": None,
    "transport": "http",
    "validate": True,  # a few µs per hook (see sending/payload_check.py)
}
#: Seconds before each retry by default (5s,5m,30m,2h,5h,10h,10h): 27 h 35 min, as
#: the Standard Webhooks spec asks for a schedule spanning more than a day.
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
#: The exponential shorthand (``XO_WEBHOOKS_RETRIES`` and ``XO_WEBHOOKS_BACKOFF``):
#: their defaults when only one is given, and the cap of each delay, in seconds.
SHORTHAND_RETRIES, SHORTHAND_BACKOFF, SHORTHAND_CAP = 5, 1.0, 60.0
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}  # fmt: skip
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Hook:
    """One configured hook: which method triggers it, when, and where it goes.

    :param method: a JSON-RPC method name, or a glob in which ``*`` matches any run
        of characters, dots included (``vm.*`` matches ``vm.start`` and ``vm.snapshot.create``).
    :param type: ``"pre"``, ``"post"`` or ``"pre/post"``.
    :param url: the http(s) URL the POST goes to; its query string is kept.
    :param format: ``"json"`` (default), ``"office365"``, ``"slack"`` or ``"teams"``.
    :param wait_for_response: pre only: the call starts once the pre hook's first
        attempt has completed or timed out.
    :param secret: a ``whsec_`` signing secret for this hook (overrides the global one).
    :param headers: extra request headers, e.g. ``{"Authorization": "Bearer ..."}``.
    """

    method: str
    type: str
    url: str
    format: str = "json"
    wait_for_response: bool = False
    secret: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    index: int | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """How logs name this hook: its position in the configuration and its origin,
        never its whole URL (``hooks[2] https://hooks.slack.com/…``)."""
        where = "hook" if self.index is None else f"hooks[{self.index}]"
        return f"{where} {short_url(self.url)}"

    @property
    def fingerprint(self) -> str:
        """A digest of the URL: how a dead-letter record names this hook."""
        return fingerprint(self.url)

    @property
    def pre(self) -> bool:
        """Whether this hook fires before the call."""
        return self.type in ("pre", "pre/post")

    @property
    def post(self) -> bool:
        """Whether this hook fires after the call."""
        return self.type in ("post", "pre/post")

    @property
    def signed(self) -> bool:
        """Whether requests of this hook carry a Standard Webhooks signature."""
        return self.secret is not None

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], secret: str | None = None, index: int | None = None
    ) -> Hook:
        """Build a hook from its validated camelCase form; *secret* is the global default,
        *index* its position in the configuration. A URL that is not ASCII is
        IDNA- and percent-encoded."""
        return cls(
            method=raw["method"],
            type=raw["type"],
            url=ascii_url(raw["url"]),
            format=raw.get("format", "json"),
            wait_for_response=bool(raw.get("waitForResponse", False)),
            secret=raw.get("secret", secret),
            headers=tuple(raw.get("headers", {}).items()),
            index=index,
        )


@dataclass(frozen=True)
class Settings:
    """The validated, immutable configuration of a middleware and its dispatcher."""

    hooks: tuple[Hook, ...] = ()
    timeout: float = DEFAULTS["timeout"]
    max_workers: int = DEFAULTS["maxWorkers"]
    max_body: int = DEFAULTS["maxBody"]
    paths: tuple[str, ...] = ()
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    endpoint_concurrency: int = 0  # 0: half of max_workers, at least 1
    breaker_threshold: int = DEFAULTS["breakerThreshold"]
    max_calls: int = DEFAULTS["maxCalls"]
    queue_size: int = DEFAULTS["queueSize"]
    dead_letter: str | None = None
    shutdown_timeout: float = DEFAULTS["shutdownTimeout"]
    secret: str | None = field(default=None, repr=False)
    redact: tuple[str, ...] = DEFAULT_REDACT
    ca_bundle: str | None = None
    dispatcher: str = "thread"
    broker_url: str | None = field(default=None, repr=False)
    metrics_port: int | None = None
    spool: str | None = None
    transport: str = "http"
    validate: bool = True

    def __post_init__(self) -> None:
        if not self.endpoint_concurrency:
            object.__setattr__(self, "endpoint_concurrency", max(1, self.max_workers // 2))

    @property
    def retries(self) -> int:
        """Retries after the first attempt: the length of the schedule."""
        return len(self.retry_schedule)


def camel_to_snake(name: str) -> str:
    """``maxWorkers`` -> ``max_workers``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def env_name(key: str) -> str:
    """``maxWorkers`` -> ``XO_WEBHOOKS_MAX_WORKERS``."""
    return ENV_PREFIX + camel_to_snake(key).upper()


CONFIG_PROPERTIES = load_schema("config")["properties"]
SETTING_KEYS = tuple(k for k in CONFIG_PROPERTIES if k != "hooks")
SNAKE_TO_CAMEL = {camel_to_snake(k): k for k in SETTING_KEYS}


def load_settings(
    hooks: list[Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Load, merge and validate the configuration; raise :class:`ConfigError` if it is bad.

    :param hooks: hooks given in code; when ``None`` they come from ``XO_WEBHOOKS_HOOKS``
        or the ``XO_WEBHOOKS_CONFIG`` file.
    :param environ: the environment to read (``os.environ`` by default).
    :param overrides: settings in snake_case (``timeout=2.5``); ``None`` values are ignored.
    """
    environ = os.environ if environ is None else environ
    document: dict[str, Any] = {}
    sources: dict[str, str] = {}  # top-level key -> where it came from, for messages

    file_path = environ.get(ENV_PREFIX + "CONFIG")
    if file_path:
        for key, value in _read_file(file_path).items():
            document[key] = value
            sources[key] = f"{file_path}: {key}"

    for key in ("hooks", *SETTING_KEYS):
        name = env_name(key)
        # An empty variable is unset (as compose files write them), except REDACT,
        # where empty means "redact nothing".
        if environ.get(name, "").strip() or (key == "redact" and name in environ):
            document[key] = _parse_env(name, environ[name], key)
            sources[key] = name

    if hooks is not None:
        document["hooks"] = hooks if isinstance(hooks, Mapping) else list(hooks)
        sources["hooks"] = "hooks"
    for snake, value in overrides.items():
        if snake not in SNAKE_TO_CAMEL:
            raise TypeError(f"unknown setting {snake!r}; expected one of {sorted(SNAKE_TO_CAMEL)}")
        if value is not None:
            key = SNAKE_TO_CAMEL[snake]
            if key == "retrySchedule" and isinstance(value, str):
                value = parse_durations(value, snake)
            document[key] = list(value) if isinstance(value, (tuple, set, frozenset)) else value
            sources[key] = snake

    _validate(document, sources)
    for name, closest in unknown_variables(environ):
        logger.warning(
            "%s is not an xo-webhooks setting and is ignored%s", name,
            f" (did you mean {closest}?)" if closest else "",
        )  # fmt: skip
    return _build(document)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``XO_WEBHOOKS_*`` variables of *environ* that name no setting (a typo such as
    ``XO_WEBHOOKS_TIMOUT`` would leave the default in force), each with the closest
    known name, or ``None``."""
    known = {ENV_PREFIX + "CONFIG", *(env_name(k) for k in ("hooks", *SETTING_KEYS))}
    suffixes = [name[len(ENV_PREFIX) :] for name in known]  # the shared prefix matches all

    def closest(name: str) -> str | None:
        found = difflib.get_close_matches(name[len(ENV_PREFIX) :], suffixes, n=1, cutoff=0.6)
        return ENV_PREFIX + found[0] if found else None

    return [
        (name, closest(name))
        for name in sorted(environ)
        if name.startswith(ENV_PREFIX) and name not in known
    ]


def _read_file(path: str) -> dict[str, Any]:
    where = f"{ENV_PREFIX}CONFIG={path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the file: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f'{where}: expected a JSON object {{"hooks": [...], ...}}')
    return data


def _parse_env(name: str, raw: str, key: str) -> Any:
    """Turn an environment string into the type the schema wants; leave it for the
    schema to reject when it does not convert."""
    kind = CONFIG_PROPERTIES[key].get("type")
    text = raw.strip()
    if key == "hooks":
        try:
            return json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{name}: not valid JSON: {e}") from None
    if key == "retrySchedule":
        return parse_durations(text, name)
    if kind == "array":
        return [word.strip() for word in text.split(",") if word.strip()]
    if kind == "boolean":  # 1/0, true/false, yes/no, on/off; anything else is rejected
        return BOOLEANS.get(text.lower(), raw)
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)  # "nan" converts; _validate rejects it by name
    except ValueError:
        return raw
    return raw


def _validate(document: dict[str, Any], sources: dict[str, str]) -> None:
    errors = sorted(validator("config").iter_errors(document), key=_error_order)
    if errors:
        raise ConfigError(_describe(errors[0], sources))
    for key in SETTING_KEYS:  # NaN slips through every minimum and maximum
        value = document.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{sources[key]}: must be a finite number, not {value}")
    shorthand = [sources[k] for k in ("retries", "backoff") if k in document]
    if "retrySchedule" in document and shorthand:
        raise ConfigError(
            f"{sources['retrySchedule']} and {' and '.join(shorthand)}: give either a retry "
            "schedule or the retries and backoff shorthand for one, not both"
        )
    _check_hooks(document.get("hooks", []), sources.get("hooks", "hooks"))
    if document.get("caBundle"):
        try:
            ssl.create_default_context(cafile=document["caBundle"])
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or e
            where = sources["caBundle"]
            raise ConfigError(f"{where}: cannot load the CA bundle: {reason}") from None
    if document.get("spool") and document.get("dispatcher") == "celery":
        raise ConfigError(
            f"{sources['spool']}: the Celery dispatcher keeps its hooks in the broker; the "
            "spool is for the thread dispatcher (unset one of them)"
        )
    if document.get("spool"):
        problem = _path_problem(document["spool"])
        if problem:
            raise ConfigError(f"{sources['spool']}: cannot keep the spool there: {problem}")
    dead_letter = document.get("deadLetter")
    if dead_letter and not dead_letter.startswith(("redis://", "rediss://")):
        problem = _path_problem(dead_letter)
        if problem:
            where = sources["deadLetter"]
            raise ConfigError(f"{where}: cannot write dead letters there: {problem}")
    secrets = [("secret", document.get("secret"))]
    secrets += [
        (f"{sources['hooks']}[{i}].secret", hook.get("secret"))
        for i, hook in enumerate(document.get("hooks", []))
    ]
    for where, secret in secrets:
        if secret is None:
            continue
        try:
            parse_secret(secret)
        except ValueError as e:
            raise ConfigError(f"{sources.get(where, where)}: {e}") from None


def _path_problem(path: str) -> str | None:
    """Why *path* cannot hold a file this process writes (a spool, dead letters): a
    folder, not writable; or ``None``. The file and its folder need not exist yet (a
    spool's SQLite writes two more files beside it)."""
    if os.path.isdir(path):
        return "it is a folder"
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return "the file is not readable and writable"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    try:  # what the process may really do there (a read-only mount, another owner)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"cannot write in {folder}: {e.strerror or e}"
    return None


# Headers xo-webhooks writes itself: configured twice, they would make a request that
# servers and proxies may read differently (request smuggling), or forge a signature.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection",
    "webhook-id", "webhook-timestamp", "webhook-signature",
})  # fmt: skip


def _check_hooks(hooks: list[dict[str, Any]], source: str) -> None:
    """What the schema cannot say: the URL as the transport will read it, and headers
    that HTTP can carry."""
    for i, hook in enumerate(hooks):
        where = f"{source}[{i}]"
        try:
            parse_http_url(ascii_url(hook["url"]))
        except ValueError as e:
            raise ConfigError(f"{where}.url: {mask_passwords(str(e))}") from None
        for name, value in hook.get("headers", {}).items():
            if name.lower() in RESERVED_HEADERS:
                raise ConfigError(f"{where}.headers.{name}: set by xo-webhooks itself")
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise ConfigError(
                    f"{where}.headers.{name}: invalid value (not shown): "
                    "an HTTP header holds Latin-1 characters only"
                ) from None


def _error_order(error: ValidationError) -> list[tuple[int, Any]]:
    # Shallowest first, then in document order (hooks[2] before hooks[10]).
    path = [(0, p) if isinstance(p, int) else (1, str(p)) for p in error.absolute_path]
    return [(len(path), 0), *path]


def _describe(error: ValidationError, sources: dict[str, str]) -> str:
    path = list(error.absolute_path)
    if not path:  # an unknown top-level key, or the document itself is wrong
        extra = _unexpected_keys(error)
        where = ", ".join(sources.get(k, k) for k in extra) or "configuration"
        return f"{where}: {error_message(error)}"
    where = sources.get(str(path[0]), str(path[0]))
    for part in path[1:]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    if SENSITIVE & {str(p) for p in path}:  # never echo a secret, even a malformed one
        return f"{where}: invalid value (not shown): {_reason(error)}"
    message = error_message(error)
    if isinstance(error.instance, str) and path[-1] in URL_FIELDS:  # a credential, often
        message = message.replace(repr(error.instance), repr(masked_url(error.instance)))
    return f"{where}: {mask_passwords(message)}"


SENSITIVE = {"secret", "headers", "brokerUrl"}
URL_FIELDS = {"url", "deadLetter", "spool"}


def _reason(error: ValidationError) -> str:
    if error.validator == "type":
        return f"must be of type {error.validator_value}"
    return str(error.schema.get("description") or f"fails {error.validator!r}")


def _unexpected_keys(error: ValidationError) -> list[str]:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        return [k for k in error.instance if k not in allowed]
    return []


def _build(document: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {**DEFAULTS, **{k: v for k, v in document.items() if k != "hooks"}}
    for key, value in values.items():
        if value is None:
            continue
        if CONFIG_PROPERTIES[key].get("type") == "integer":
            values[key] = int(value)  # 4.0 is a valid integer to the schema; range() wants 4
        elif isinstance(value, list):
            values[key] = tuple(value)
    values["retrySchedule"] = _schedule(
        values["retrySchedule"], values.pop("retries"), values.pop("backoff")
    )
    values["endpointConcurrency"] = values["endpointConcurrency"] or 0
    hooks = tuple(
        Hook.from_dict(raw, values["secret"], i) for i, raw in enumerate(document.get("hooks", []))
    )
    return Settings(hooks=hooks, **{camel_to_snake(k): v for k, v in values.items()})


def _schedule(
    schedule: tuple[float, ...] | None, retries: int | None, backoff: float | None
) -> tuple[float, ...]:
    """The retry schedule: the one given, else the exponential shorthand (``backoff *
    2**n``, capped) when retries or backoff is given, else the default."""
    if schedule is not None:
        return tuple(float(delay) for delay in schedule)
    if retries is None and backoff is None:
        return DEFAULT_RETRY_SCHEDULE
    retries = SHORTHAND_RETRIES if retries is None else retries
    backoff = SHORTHAND_BACKOFF if backoff is None else backoff
    return tuple(min(SHORTHAND_CAP, backoff * 2**n) for n in range(retries))


def parse_durations(text: str, where: str) -> list[float]:
    """Seconds from comma-separated durations with units (``5s,5m,30m,2h,1d``, also
    ``ms``); raise :class:`ConfigError` naming *where* and the bad item."""
    seconds = []
    for n, item in enumerate(text.split(","), 1):
        word = item.strip()
        match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)", word)
        if not match:
            shown = repr(word) if word else "empty"
            raise ConfigError(
                f"{where}: item {n} ({shown}) is not a duration: "
                "expected a number and a unit (ms, s, m, h, d), e.g. 5s,5m,30m,2h"
            )
        seconds.append(float(match[1]) * DURATION_UNITS[match[2]])
    return seconds
