"""Flask-Login's session-protection identifier, remembered per LoginManager.

Session protection (on by default) hashes the client's ``X-Forwarded-For`` or
remote address and its ``User-Agent`` with SHA-512 each time a request loads
the user (5-9 us of a logged-in API request). :func:`memoise` gives an app's
LoginManager a memo of that function (:class:`_SessionIdentifierMemo`, as its
``_session_identifier_generator``: per LoginManager, never globally), keyed on
exactly the three values Flask-Login reads and bounded in bytes. It is
installed only while the LoginManager still has Flask-Login's own function and
:func:`session_identifier_memo_problem` finds that function as in Flask-Login
0.6.3; otherwise a WARNING says why and Flask-Login's function stays.
:func:`identity_middleware.flask_hooks.install` calls :func:`memoise`.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask, request
from werkzeug.datastructures import EnvironHeaders as _EnvironHeaders

from .memo import BoundedMemo

if TYPE_CHECKING:
    from flask import Request

__all__ = ["IDENTIFIER_MEMO_BYTES", "IDENTIFIER_MEMO_MAX_CHARS", "memoise", "session_identifier_memo_problem"]

_log = logging.getLogger(__name__)

#: The current request object itself, past the proxy (werkzeug's documented way).
_current_request: Callable[[], Request] = request._get_current_object  # type: ignore[attr-defined]

#: Bytes the session-identifier memo of one LoginManager may hold.
IDENTIFIER_MEMO_BYTES = 1024 * 1024

#: Longest User-Agent + X-Forwarded-For + remote address (in characters) whose
#: identifier is remembered; a longer one is computed afresh each time.
IDENTIFIER_MEMO_MAX_CHARS = 2048

#: What an entry costs besides its strings (the key tuple and the dict slot).
_IDENTIFIER_ENTRY_OVERHEAD = 300


class _Absent:
    """The type of :data:`_ABSENT`."""

    __slots__ = ()


#: Stands for a missing X-Forwarded-For header in a memo key (Flask-Login reads the
#: remote address then; a header present as ``None`` would be read as ``None``).
_ABSENT = _Absent()

#: The types a memo key is made of: values of any other type go to Flask-Login.
_PLAIN_TYPES = frozenset({str, type(None), _Absent})

#: Flask-Login 0.6.3's ``_create_identifier`` and ``_get_remote_addr``, as
#: (names, string constants) of their code: what the memo's key is derived from.
_IDENTIFIER_CODE = {
    "_create_identifier": (
        ("request", "headers", "get", "encode", "_get_remote_addr", "str", "bytes", "sha512", "update", "hexdigest"),
        frozenset({"User-Agent", "utf-8", "|", "replace", "utf8"}),
    ),
    "_get_remote_addr": (
        ("request", "headers", "get", "remote_addr", "encode", "split", "strip"),
        frozenset({"X-Forwarded-For", "utf-8"}),
    ),
}


def _flask_login_identifier_functions() -> tuple[Any, Any, dict[str, Any]]:
    import flask_login.utils

    namespace = vars(flask_login.utils)
    return namespace.get("_create_identifier"), namespace.get("_get_remote_addr"), namespace


def session_identifier_memo_problem() -> str | None:
    """Why Flask-Login's session identifier cannot be memoised exactly, or None if it can.

    Flask-Login (session protection, on by default) hashes the request's
    ``X-Forwarded-For`` (or else its remote address) and ``User-Agent`` with
    SHA-512 on every request that loads the user. The memo keys the result on
    exactly those values, so it must know that nothing else goes in: checked here
    by the code of ``_create_identifier`` and ``_get_remote_addr`` (names and
    constants as in Flask-Login 0.6.3), the module globals they use, and by
    computing identifiers for sample requests that agree on those values and
    differ in everything else.
    """
    import hashlib

    from werkzeug.datastructures import EnvironHeaders

    create, remote_addr, namespace = _flask_login_identifier_functions()
    for function, name in ((create, "_create_identifier"), (remote_addr, "_get_remote_addr")):
        code = getattr(function, "__code__", None)
        if code is None:
            return f"flask_login.utils.{name} is missing or not a Python function"
        names, constants = _IDENTIFIER_CODE[name]
        strings = frozenset(c for c in code.co_consts if isinstance(c, str))
        if code.co_names != names or strings != constants or code.co_argcount or code.co_freevars:
            return f"flask_login.utils.{name} is not the function of Flask-Login 0.6.3"
    if namespace.get("request") is not request or namespace.get("sha512") is not hashlib.sha512:
        return "flask_login.utils no longer uses flask.request and hashlib.sha512"
    app = Flask("identity_middleware_identifier_check")
    memo = _SessionIdentifierMemo(create)
    same = {"REMOTE_ADDR": "192.0.2.1", "HTTP_USER_AGENT": "Agent/1.0 (\xe9)"}
    samples = [
        {},
        {"HTTP_X_FORWARDED_FOR": "198.51.100.7, 192.0.2.1"},
        {"HTTP_X_FORWARDED_FOR": ""},
    ]
    try:
        for extra in samples:
            seen = []
            for other in ("a", "b"):
                environ = {**same, **extra, "HTTP_ACCEPT_LANGUAGE": other, "HTTP_HOST": f"{other}.example"}
                with app.test_request_context(f"/{other}", environ_overrides=environ):
                    if type(request.headers) is not EnvironHeaders:
                        return "Flask's request.headers is no longer werkzeug's EnvironHeaders"
                    seen += [create(), memo(), memo()]
            if len(set(seen)) != 1:
                return f"Flask-Login's identifier depends on more than the memo's key: {extra!r}"
    except Exception as exc:  # any surprise means: leave Flask-Login's function alone
        return f"computing a session identifier failed: {exc!r}"
    return None


class _SessionIdentifierMemo(BoundedMemo[str]):
    """Flask-Login's ``_create_identifier``, remembered per (User-Agent, X-Forwarded-For, remote address).

    Installed per LoginManager as its ``_session_identifier_generator`` (the
    attribute Flask-Login calls), only after :func:`session_identifier_memo_problem`
    found nothing. The identifier is a function of those three values as
    Flask-Login reads them -- ``request.headers`` (werkzeug's ``EnvironHeaders``,
    so the environ's ``HTTP_USER_AGENT`` and ``HTTP_X_FORWARDED_FOR``) and
    ``request.remote_addr`` -- so a request whose values were seen before gets the
    identifier computed then; anything else, and any request whose headers are
    not an ``EnvironHeaders``, whose values are not plain strings, or for which
    Flask-Login's module functions were replaced since, runs Flask-Login's own
    function. The values come from clients, so the memo is bounded in bytes
    (:data:`IDENTIFIER_MEMO_BYTES`, oldest entry out first) and long values are
    never stored (:data:`IDENTIFIER_MEMO_MAX_CHARS`).
    """

    __slots__ = ("__wrapped__", "_remote_addr", "_namespace")

    def __init__(self, create: Callable[[], str]) -> None:
        super().__init__(IDENTIFIER_MEMO_BYTES)
        self.__wrapped__ = create
        _, self._remote_addr, self._namespace = _flask_login_identifier_functions()

    def __call__(self) -> str:
        current = _current_request()
        headers = current.headers
        namespace = self._namespace
        if (
            type(headers) is _EnvironHeaders
            and namespace["_get_remote_addr"] is self._remote_addr
            and namespace["request"] is request
        ):
            environ = headers.environ
            agent = environ.get("HTTP_USER_AGENT")
            forwarded = environ.get("HTTP_X_FORWARDED_FOR", _ABSENT)
            address = current.remote_addr
            plain = _PLAIN_TYPES  # not a str subclass: equal to a key, it may still encode otherwise
            if type(agent) in plain and type(forwarded) in plain and type(address) in plain:
                key = (agent, forwarded, address)
                found = self._find(key)
                if found is not None:
                    return found[1]
                identifier = self.__wrapped__()
                if type(identifier) is str:  # Flask-Login returns a hex digest
                    strings = [value for value in key if type(value) is str]
                    if sum(map(len, strings)) <= IDENTIFIER_MEMO_MAX_CHARS:
                        size = _IDENTIFIER_ENTRY_OVERHEAD + sum(map(sys.getsizeof, strings)) + sys.getsizeof(identifier)
                        self._store(key, size, identifier)
                return identifier
        return self.__wrapped__()


def memoise(manager: Any) -> None:
    """Put Flask-Login's default session identifier behind a memo on ``manager``, if exact."""
    create, _, _ = _flask_login_identifier_functions()
    current = getattr(manager, "_session_identifier_generator", None)
    if isinstance(current, _SessionIdentifierMemo) or current is not create:
        return  # already ours, or the app set its own generator: leave it alone
    problem = session_identifier_memo_problem()
    if problem is not None:
        _log.warning(
            "identity_middleware: Flask-Login's session identifier is computed on every request "
            "(a few microseconds more) because %s",
            problem,
        )
        return
    manager._session_identifier_generator = _SessionIdentifierMemo(current)
