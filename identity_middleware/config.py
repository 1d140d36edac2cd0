"""Settings: one place for names, defaults, parsing and precedence.

Every setting can come from four places. The environment wins, so an operator
can tune a deployed app without a code change; then the constructor argument;
then ``app.config``; then the default below. Values are parsed and checked
here, at startup, so a typo becomes a :class:`ConfigError` that names the
setting, the value and what was expected -- never a crash in the middle of a
request.

:func:`resolve` returns the effective values together with where each came
from, which is what ``flask identity status`` prints.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .matching import text_path_problem

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["ConfigError", "Setting", "Resolved", "SETTINGS", "resolve", "resolve_one", "redacted_url"]


class ConfigError(ValueError):
    """A setting has a value we cannot use. Raised at startup, never mid-request.

    The message names the setting, the value and what was expected; a password in
    a URL is masked there, since startup errors end up in logs.
    """

    def __init__(self, name: str, value: Any, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"{name}={redacted_url(value)!r} is not valid: expected {expected}")


def redacted_url(url: Any) -> Any:
    """``url`` with any password replaced by ``***``, fit for logs and error messages.

    Anything that is not a URL with a password comes back unchanged.
    """
    if not isinstance(url, str) or "@" not in url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return url.rpartition("@")[0].partition("://")[0] + "://***@" + url.rpartition("@")[2]


# -- parsers: take a raw value (str from the environment, anything from code) ----------


def _float_at_least_zero(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError
    value = float(raw.strip() if isinstance(raw, str) else raw)
    if not (value >= 0) or value == float("inf"):  # also rejects NaN
        raise ValueError
    return value


def _int_at_least_one(raw: Any) -> int:
    if isinstance(raw, bool) or isinstance(raw, float):
        raise ValueError
    value = int(raw.strip() if isinstance(raw, str) else raw)
    if value < 1:
        raise ValueError
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError


def _static_paths(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    paths = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError
        path = item.strip()
        if not path:
            continue
        if text_path_problem(path) is not None:  # the same test requests must pass
            raise ValueError
        paths.append(path)
    return tuple(paths)


def _version_store(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError
    text = raw.strip()
    if text == "local":
        return text
    _check_redis_url(text)
    return text


def _check_redis_url(text: str) -> None:
    """Reject Redis URLs that redis-py would silently misread.

    redis-py ignores a database path it cannot parse (``/abc`` becomes db 0) and
    glues ``/1/2`` into db 12, so a typo would point every worker at the wrong
    database without an error. We accept only what means one thing.
    """
    from urllib.parse import parse_qsl, urlsplit

    try:
        parts = urlsplit(text)
        port = parts.port
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError from None
    if parts.fragment or any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise ValueError
    if parts.scheme in ("redis", "rediss"):
        path = parts.path
        if (
            not text.startswith(parts.scheme + "://")
            or not parts.hostname
            or port == 0
            or (path not in ("", "/") and not _DIGITS.fullmatch(path[1:]))
        ):
            raise ValueError
    elif parts.scheme == "unix":
        # unix://relative/x.sock would silently mean /x.sock: no host part allowed.
        if parts.hostname or not parts.path.startswith("/") or parts.path.endswith("/"):
            raise ValueError
    else:
        raise ValueError
    for name, value in query:
        if name == "db" and not _DIGITS.fullmatch(value):
            raise ValueError
    try:  # redis-py checks its own query options (timeouts, ssl_cert_reqs, ...)
        from redis.connection import parse_url
    except ImportError:  # the redis extra is not installed: nothing more to check
        return
    parse_url(text)


_DIGITS = re.compile(r"[0-9]+")


def _key_prefix(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError
    text = raw.strip()
    if not text or len(text) > 100 or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError
    return text


@dataclass(frozen=True)
class Setting:
    """One setting: its name (also the ``app.config`` key and environment variable)."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    expected: str
    help: str


#: Defaults are chosen for a production app; README explains each.
SETTINGS: Mapping[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "IDENTITY_CACHE_TTL",
            60.0,
            _float_at_least_zero,
            "a number of seconds >= 0 (0 turns the cache off)",
            "seconds a cached user is trusted when nothing invalidates it",
        ),
        Setting(
            "IDENTITY_CACHE_MAXSIZE",
            10_000,
            _int_at_least_one,
            "an integer >= 1",
            "most users kept in memory per process (least recently used go first)",
        ),
        Setting(
            "IDENTITY_CACHE_NEGATIVE_TTL",
            5.0,
            _float_at_least_zero,
            "a number of seconds >= 0 (0 never caches a missing user)",
            "seconds a 'no such user' answer is trusted",
        ),
        Setting(
            "IDENTITY_STATIC_PATHS",
            (),
            _static_paths,
            "comma-separated absolute paths without '.' or '..' segments, "
            "e.g. '/favicon.ico,/assets/'",
            "extra paths to treat as static: exact paths, or prefixes ending in '/'",
        ),
        Setting(
            "IDENTITY_VERSION_STORE",
            "local",
            _version_store,
            "'local' or a Redis URL such as 'redis://127.0.0.1:6379/0'",
            "where version stamps live: this process, or Redis for all processes",
        ),
        Setting(
            "IDENTITY_VERSION_PREFIX",
            "identity:",
            _key_prefix,
            "1 to 100 printable characters without spaces, e.g. 'myapp:identity:'",
            "Redis key prefix, so several apps can share one Redis without reloading each other's users",
        ),
        Setting(
            "IDENTITY_SERVE_STATIC",
            False,
            _boolean,
            "0 or 1",
            "answer indexed static files in the middleware, before Flask",
        ),
        Setting(
            "IDENTITY_DEBUG_HEADERS",
            False,
            _boolean,
            "0 or 1",
            "add a Server-Timing header describing the identity decision",
        ),
    )
}


@dataclass(frozen=True)
class Resolved:
    """An effective value and where it came from."""

    name: str
    value: Any
    source: str  # "environment", "argument", "app.config" or "default"


def resolve_one(
    name: str,
    argument: Any = None,
    app: Flask | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Resolve one setting: environment > argument > ``app.config`` > default.

    ``argument=None`` means "not given". Raises :class:`ConfigError`.
    """
    setting = SETTINGS[name]
    environ = os.environ if environ is None else environ
    if name in environ:
        raw, source = environ[name], "environment"
    elif argument is not None:
        raw, source = argument, "argument"
    elif app is not None and app.config.get(name) is not None:
        raw, source = app.config[name], "app.config"
    else:
        return Resolved(name, setting.default, "default")
    try:
        value = setting.parse(raw)
    except (ValueError, TypeError):
        raise ConfigError(name, raw, f"{setting.expected} (from {source})") from None
    return Resolved(name, value, source)


def resolve(
    names: list[str] | tuple[str, ...],
    arguments: Mapping[str, Any] | None = None,
    app: Flask | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Resolved]:
    """Resolve several settings at once; ``arguments`` maps setting names to values."""
    arguments = arguments or {}
    return {name: resolve_one(name, arguments.get(name), app, environ) for name in names}
