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

__all__ = [
    "ConfigError",
    "Setting",
    "Resolved",
    "SETTINGS",
    "resolve",
    "resolve_one",
    "redacted",
    "redacted_words",
    "MASK",
]


class ConfigError(ValueError):
    """A setting has a value we cannot use. Raised at startup, never mid-request.

    The message names the setting, the value, what is wrong with it when that can
    be said more precisely than "not valid", and what was expected. The value
    passes through :func:`redacted` first -- in the message and in :attr:`value`
    -- since startup errors end up in logs and error trackers.
    """

    def __init__(self, name: str, value: Any, expected: str, problem: str | None = None) -> None:
        self.name = name
        self.value = redacted(value)
        self.expected = expected
        self.problem = problem
        why = f" ({problem})" if problem else ""
        super().__init__(f"{name}={self.value!r} is not valid{why}: expected {expected}")


# -- redaction: the one rule for every URL or setting value that can be printed -----------

#: What replaces a secret.
MASK = "***"

#: Query parameters shown as they are: redis-py's own typed options, none a credential.
#: A credential parameter keeps only its name; any other parameter is masked whole.
SAFE_QUERY_PARAMETERS = frozenset(
    {
        "db", "socket_timeout", "socket_connect_timeout", "socket_read_size", "socket_keepalive",
        "retry_on_timeout", "retry_on_error", "max_connections", "health_check_interval",
        "ssl_check_hostname", "ssl_include_verify_flags", "ssl_exclude_verify_flags",
        "ssl_min_version", "ssl_cert_reqs", "timeout", "protocol", "legacy_responses",
        "client_name", "decode_responses", "encoding", "encoding_errors",
    }
)  # fmt: skip

#: Query parameters that carry a credential: the name is shown, never the value.
CREDENTIAL_QUERY_PARAMETERS = frozenset(
    {
        "password", "username", "ssl_password", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
        "ssl_ca_data", "ssl_ca_path", "credential_provider",
    }
)  # fmt: skip

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?://)?")


def redacted(value: Any) -> Any:
    """``value`` fit for logs, error messages, reprs and CLI output: no credential left.

    The one rule, for every string that is not a path (paths start with ``/`` and
    are shown as they are):

    * everything between the scheme (``redis://``) and the **last** ``@`` is
      user information and becomes ``***`` -- user name and password alike, and
      also when an unencoded ``/`` or ``@`` in the password makes the URL
      malformed (``redis://:abc/def@host`` shows as ``redis://***@host``); when
      that ``@`` comes after a ``?`` or ``#`` (an unencoded ``?``/``#`` in the
      password, or an ``@`` in a query value) nothing after the scheme is shown;
    * after the first ``?``, a parameter in :data:`SAFE_QUERY_PARAMETERS` is
      shown, one in :data:`CREDENTIAL_QUERY_PARAMETERS` keeps its name
      (``password=***``), any other becomes ``***``, name and all;
    * everything after the first ``#`` becomes ``***``.

    Tuples, lists and dicts are redacted item by item; other values come back
    unchanged. Over-masking is the safe side: a value that merely looks like a
    URL may lose more than its secret, never less.
    """
    if isinstance(value, str):
        return _redacted_text(value)
    if isinstance(value, (tuple, list)):
        return type(value)(redacted(item) for item in value)
    if isinstance(value, dict):
        return {redacted(k): redacted(v) for k, v in value.items()}
    return value


def redacted_words(text: str) -> str:
    """Free text (a repr, an exception message) with :func:`redacted` applied to each word."""
    return " ".join(_redacted_text(word) for word in text.split(" "))


def _redacted_text(text: str) -> str:
    if (text.startswith("/") and not text.startswith("//")) or not any(c in text for c in "@?#"):
        return text
    scheme = _SCHEME.match(text)
    head = scheme.group(0) if scheme else ""
    rest = text[len(head) :]
    at = rest.rfind("@")
    if at >= 0:
        query_or_fragment = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        if at > query_or_fragment:
            # Either a password with an unencoded '?' or '#', or an '@' inside a query
            # value or the fragment: no reading is safe for the text after the '@'.
            return head + MASK
        rest = MASK + rest[at:]
    rest, hash_, _fragment = rest.partition("#")
    base, question, query = rest.partition("?")
    if question:
        base += "?" + "&".join(_redacted_parameter(p) for p in query.split("&"))
    if hash_:
        base += "#" + MASK
    return head + base


def _redacted_parameter(parameter: str) -> str:
    from urllib.parse import unquote

    name, equals, _value = parameter.partition("=")
    known = unquote(name).strip().lower()
    if known in SAFE_QUERY_PARAMETERS:
        return parameter
    if known in CREDENTIAL_QUERY_PARAMETERS:
        return f"{name}={MASK}" if equals else name
    return MASK  # an unknown name may itself be the secret (a misplaced password)


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
_BOOLEAN_EXPECTED = (
    "1, true, yes or on to turn it on; 0, false, no, off or empty to turn it off "
    "(any case, surrounding spaces ignored; in code also True/False and 0/1)"
)


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
            raise ValueError(f"{item!r} is not a string")
        path = item.strip()
        if not path:
            continue
        problem = text_path_problem(path)  # the same test requests must pass
        if problem is not None:
            raise ValueError(f"{path!r} {problem}")
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
    """Reject Redis URLs that redis-py would silently misread, saying which part is wrong.

    redis-py ignores a database path it cannot parse (``/abc`` becomes db 0) and
    glues ``/1/2`` into db 12, so a typo would point every worker at the wrong
    database without an error. We accept only what means one thing. The reasons
    never quote the user information, the query or the fragment: a malformed URL
    may have its password there.
    """
    from urllib.parse import parse_qsl, urlsplit

    scheme = text.partition(":")[0]
    if scheme not in ("redis", "rediss", "unix") or not text.startswith(scheme + "://"):
        raise ValueError("the URL must start with redis://, rediss:// or unix://")
    if any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise ValueError("the URL contains a space or a control character")
    parts = urlsplit(text)
    if "@" in text and "@" not in parts.netloc or parts.fragment:
        raise ValueError(
            "a '/', '?', '#' or '@' in the user name or password must be percent-encoded "
            "(%2F, %3F, %23, %40)"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("the query must be name=value pairs joined by '&'") from None
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError("the URL names no host")
        if port == 0:
            raise ValueError("the port must be a number from 1 to 65535")
        path = parts.path
        if path not in ("", "/") and not _DIGITS.fullmatch(path[1:]):
            raise ValueError(f"the database must be a number after the port, like /0, not {path!r}")
    elif parts.hostname or not parts.path.startswith("/") or parts.path.endswith("/"):
        # unix://relative/x.sock would silently mean /x.sock: no host part allowed.
        raise ValueError("a unix:// URL must name an absolute socket path, like unix:///run/redis.sock")
    for name, value in query:
        if name == "db" and not _DIGITS.fullmatch(value):
            raise ValueError("the db query parameter must be a number")
    try:  # redis-py checks its own query options (timeouts, ssl_cert_reqs, ...)
        from redis.connection import parse_url
    except ImportError:  # the redis extra is not installed: nothing more to check
        return
    try:
        parse_url(text)
    except ValueError as exc:  # names the option, never its value
        raise ValueError(f"redis-py: {exc}") from None
    unknown = {name for name, _ in query} - _redis_url_options()
    if unknown:
        # redis-py would fail later, naming the parameter; its name may be a secret.
        raise ValueError(
            f"the query has {len(unknown)} parameter(s) redis-py does not accept "
            "(names not shown: a misplaced password could be one)"
        )


def _redis_url_options() -> frozenset[str]:
    """Every query parameter a redis-py client built from a URL accepts."""
    import inspect

    from redis import connection

    names = set(SAFE_QUERY_PARAMETERS) | CREDENTIAL_QUERY_PARAMETERS
    for cls in (
        connection.ConnectionPool,
        connection.AbstractConnection,
        connection.Connection,
        connection.SSLConnection,
        connection.UnixDomainSocketConnection,
    ):
        names.update(inspect.signature(cls.__init__).parameters)
    return frozenset(names - {"self", "args", "kwargs", "connection_kwargs"})


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
    #: The environment adds to the code's value (argument or ``app.config``)
    #: instead of replacing it: for lists an operator extends without a deploy.
    extends: bool = False


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
            "comma-separated paths starting with '/' without '//', '.' or '..' segments, "
            "backslashes or NUL, e.g. '/favicon.ico,/assets/' (a prefix ends with '/')",
            "extra paths to treat as static: exact paths, or prefixes ending in '/'",
            extends=True,
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
            _BOOLEAN_EXPECTED,
            "answer indexed static files in the middleware, before Flask",
        ),
        Setting(
            "IDENTITY_DEBUG_HEADERS",
            False,
            _boolean,
            _BOOLEAN_EXPECTED,
            "add a Server-Timing header describing the identity decision",
        ),
    )
}


@dataclass(frozen=True)
class Resolved:
    """An effective value and where it came from."""

    name: str
    value: Any
    #: "environment", "argument", "app.config" or "default"; for a setting the
    #: environment extends, "argument + environment" or "app.config + environment".
    source: str

    def __repr__(self) -> str:
        return f"Resolved(name={self.name!r}, value={redacted(self.value)!r}, source={self.source!r})"


def resolve_one(
    name: str,
    argument: Any = None,
    app: Flask | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Resolve one setting: environment > argument > ``app.config`` > default.

    ``argument=None`` means "not given". For a setting that ``extends``
    (``IDENTITY_STATIC_PATHS``) the environment's items are added after the
    code's (argument, else ``app.config``) instead of replacing them.
    Raises :class:`ConfigError`.
    """
    setting = SETTINGS[name]
    environ = os.environ if environ is None else environ
    from_env = _parsed(setting, environ[name], "environment") if name in environ else None
    if from_env is not None and not setting.extends:
        return from_env  # the code's value is not even read: the operator's wins
    code: Resolved | None = None
    if argument is not None:
        code = _parsed(setting, argument, "argument")
    elif app is not None and app.config.get(name) is not None:
        code = _parsed(setting, app.config[name], "app.config")
    if from_env is not None and code is not None:
        merged = tuple(dict.fromkeys((*code.value, *from_env.value)))
        return Resolved(name, merged, f"{code.source} + environment")
    return from_env or code or Resolved(name, setting.default, "default")


def _parsed(setting: Setting, raw: Any, source: str) -> Resolved:
    try:
        value = setting.parse(raw)
    except (ValueError, TypeError) as exc:
        problem = str(exc) if isinstance(exc, ValueError) and str(exc) else None
        raise ConfigError(setting.name, raw, f"{setting.expected} (from {source})", problem) from None
    return Resolved(setting.name, value, source)


def resolve(
    names: list[str] | tuple[str, ...],
    arguments: Mapping[str, Any] | None = None,
    app: Flask | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Resolved]:
    """Resolve several settings at once; ``arguments`` maps setting names to values."""
    arguments = arguments or {}
    return {name: resolve_one(name, arguments.get(name), app, environ) for name in names}
