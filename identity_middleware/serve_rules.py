"""Serve mode's first rule: answer before Flask only what no code of the app could have changed.

Serve mode answers a static file in the middleware, so nothing of the Flask
app runs for it: no ``before_request`` login gate, no wrapped static view, no
``after_request`` that adds a header. Answering like that is only a pure
optimisation when none of that code would have run for the request, or when
what would have run cannot change the answer. This module decides it, once per
static mount, at startup, and says why -- the verdicts are what the startup
line and ``flask identity status`` print.

A mount of the app (``/static/``, ``/<blueprint>/static/``) is served before
Flask only when all of these hold; otherwise its requests go to Flask (they
are still marked, so identity is still skipped there):

* the endpoint's view is Flask's own, unwrapped static view
  (:func:`~identity_middleware.matching.is_flask_static_view`);
* no function would run for it among the app's and the serving blueprint's
  (and its parents') ``url_value_preprocessors``, ``before_request`` and
  ``after_request`` functions, nor any receiver of the ``request_started``,
  ``request_finished`` or ``appcontext_pushed`` signals -- each of them can
  refuse the request or change the response -- except functions declared safe;
* the app's class overrides none of the methods of Flask's request cycle, and
  its ``request_class``/``response_class`` are Flask's own (or declared safe);
* the middleware wraps the app's own ``wsgi_app`` (through werkzeug's
  ``ProxyFix`` at most, which changes no static answer): any other middleware
  in between would be skipped too;
* the URL map does not depend on the request's host.

Declared safe: the functions (or classes) the owner lists in
``static_safe_hooks`` / ``app.config["IDENTITY_STATIC_SAFE_HOOKS"]``, any
function carrying ``_identity_middleware_static_safe = True`` (the
:func:`static_safe` decorator sets it), and functions known to be harmless for
a GET of a static file: Flask-Principal's ``Principal._on_before_request``
(loads an identity nobody reads on a static answer), Flask-Login's
``LoginManager._update_remember_cookie`` (refreshes a remember cookie only in
the request that logged in or out), Flask-WTF's ``CSRFProtect`` check while
``WTF_CSRF_METHODS`` leaves out ``GET`` and ``HEAD`` (it returns at once for
them), and this package's own hooks.
Flask-Security-Too's ``_add_cache_control`` is *not* harmless: it sets
``Cache-Control: private, no-store`` on every answer of its blueprint,
``/fs-static`` files included, so that mount stays with Flask unless declared.

``teardown_request``/``teardown_appcontext`` functions and the
``request_tearing_down``/``appcontext_tearing_down`` receivers run after the
answer is made and cannot change it; they do not block serving, and the
report lists them as skipped.

A ``static_dirs`` folder has no endpoint: it is served when the app-level
conditions above hold and the URL map does not send its paths to a view.
Without a Flask app (a plain WSGI callable was wrapped) there is no app code
to skip and the folders are served.

The verdicts are computed from the app as it is at the first request (or at
:meth:`IdentityMiddleware.rebuild`); hooks added later by editing Flask's
lists directly are not seen until the next rebuild.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

from .config import ConfigError
from .matching import is_flask_static_view, path_adapter

if TYPE_CHECKING:
    from flask import Flask

__all__ = [
    "SAFE_ATTRIBUTE",
    "SAFE_HOOKS_SETTING",
    "MountVerdict",
    "ServePlan",
    "plan",
    "resolve_safe_hooks",
    "static_safe",
]

#: A function carrying this attribute set to ``True`` is declared safe to skip on static files.
SAFE_ATTRIBUTE = "_identity_middleware_static_safe"

#: The ``app.config`` key (never the environment: functions only come from code).
SAFE_HOOKS_SETTING = "IDENTITY_STATIC_SAFE_HOOKS"

#: Methods of ``Flask`` that run for every request; an app subclass overriding one
#: has code in the request cycle that serve mode would skip.
_REQUEST_CYCLE = (
    "wsgi_app",
    "request_context",
    "app_context",
    "full_dispatch_request",
    "preprocess_request",
    "dispatch_request",
    "finalize_request",
    "make_response",
    "process_response",
    "ensure_sync",
)

#: Signals sent before the answer is final: a receiver can raise or edit the response.
_BLOCKING_SIGNALS = ("request_started", "request_finished", "appcontext_pushed")
#: Signals sent after the answer is made.
_AFTER_SIGNALS = ("request_tearing_down", "appcontext_tearing_down")

F = TypeVar("F")


def static_safe(function: F) -> F:
    """Declare a hook safe to skip when serve mode answers a static file itself.

    Use it on ``before_request``/``after_request`` functions (or signal receivers)
    that neither refuse a static GET nor change its response -- an audit log of
    page views, a request timer::

        @app.after_request
        @static_safe
        def count(response): ...

    Bound methods cannot carry attributes: list them in ``static_safe_hooks``.
    """
    try:
        setattr(function, SAFE_ATTRIBUTE, True)
    except (AttributeError, TypeError):
        raise TypeError(
            f"static_safe cannot mark {_name(function)}; list it in static_safe_hooks instead"
        ) from None
    return function


_EXPECTED = (
    "a list of the functions (or bound methods, or classes) serve mode may skip for static "
    "files, given in code: static_safe_hooks=[...] or app.config['IDENTITY_STATIC_SAFE_HOOKS']"
)


def resolve_safe_hooks(
    argument: Iterable[Any] | None, app: Flask | None, environ: Mapping[str, str] | None = None
) -> tuple[tuple[Any, ...], str]:
    """The declared-safe functions and where they came from (argument > ``app.config`` > none).

    Raises :class:`ConfigError` for anything but callables, and when the
    environment sets ``IDENTITY_STATIC_SAFE_HOOKS``: a function cannot come from
    there, and silently ignoring an operator's setting would be worse.
    """
    environ = os.environ if environ is None else environ
    if SAFE_HOOKS_SETTING in environ:
        raise ConfigError(SAFE_HOOKS_SETTING, environ[SAFE_HOOKS_SETTING], _EXPECTED + " (not the environment)")
    if argument is not None:
        raw, source, name = argument, "argument", "static_safe_hooks"
    elif app is not None and app.config.get(SAFE_HOOKS_SETTING) is not None:
        raw, source, name = app.config[SAFE_HOOKS_SETTING], "app.config", SAFE_HOOKS_SETTING
    else:
        return (), "default"
    if isinstance(raw, (str, bytes)) or callable(raw):
        raise ConfigError(name, raw, f"{_EXPECTED} (from {source})")
    try:
        hooks = tuple(raw)
    except TypeError:
        raise ConfigError(name, raw, f"{_EXPECTED} (from {source})") from None
    for hook in hooks:
        if not callable(hook):
            raise ConfigError(name, hook, f"{_EXPECTED} (from {source})")
    return hooks, source


@dataclass(frozen=True)
class MountVerdict:
    """Whether one static mount is answered before Flask, and why."""

    prefix: str
    folder: str | None
    endpoint: str | None  # None for a static_dirs folder
    served: bool
    reason: str
    #: what keeps the mount from being served before Flask ("before_request myapp.gate")
    blockers: tuple[str, ...] = ()
    #: app code serve mode skips for it: declared or known safe, or run after the answer
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for logs and the CLI."""
        what = self.endpoint or "static_dirs"
        if self.served:
            return f"{self.prefix} ({what}): served before Flask"
        return f"{self.prefix} ({what}): not served before Flask -- {self.reason}"


@dataclass(frozen=True)
class ServePlan:
    """The verdicts for every mount, and the per-file test ``StaticFiles(routed=...)`` needs."""

    verdicts: tuple[MountVerdict, ...]
    mounts: dict[str, str] = field(default_factory=dict)  # served prefix -> folder
    routed: Callable[[str], bool] | None = None
    #: served blueprint prefix -> the blueprint's get_send_file_max_age, which its view calls
    max_age_for: dict[str, Callable[[str], int | None]] = field(default_factory=dict)
    #: the app's ``TRUSTED_HOSTS``: a request for another host goes to Flask, which refuses it
    trusted_hosts: tuple[str, ...] | None = None
    #: the app has an error handler that answers a 416: unsatisfiable ranges go to Flask
    unsatisfiable_to_app: bool = False

    def summary(self) -> str:
        """The verdicts in one clause, for the startup line."""
        if not self.verdicts:
            return "serve mode: no static folder"
        return "serve mode: " + "; ".join(v.describe() for v in self.verdicts)


def plan(
    app: Flask | None,
    mounts: Mapping[str, str],
    folders: Mapping[str, str | None],
    static_dirs: Mapping[str, str],
    wsgi_app: Any,
    declared: Sequence[Any] = (),
) -> ServePlan:
    """Decide, for each app mount (``prefix -> endpoint``) and ``static_dirs`` folder, whether to serve it.

    ``folders`` maps each app mount's prefix to its folder (``None``: none on disk).
    """
    if app is None:
        plain = tuple(
            MountVerdict(prefix, folder, None, True, "no Flask app is known, so no app code is skipped")
            for prefix, folder in static_dirs.items()
        )
        return ServePlan(plain, dict(static_dirs), None)

    judge = _Judge(app, declared)
    app_blockers = judge.app_wide_blockers(wsgi_app)
    adapter = path_adapter(app)
    verdicts: list[MountVerdict] = []
    served_endpoints: set[str] = set()
    served_mounts: dict[str, str] = {}
    max_age_for: dict[str, Callable[[str], int | None]] = {}
    for prefix, endpoint in mounts.items():
        folder = folders.get(prefix)
        blockers = list(app_blockers)
        if not is_flask_static_view(app, endpoint):
            view = app.view_functions.get(endpoint)
            replaced = vars(app).get("send_static_file") if endpoint == "static" else None
            if replaced is not None:
                blockers.insert(0, f"app.send_static_file is replaced by {_name(replaced)}")
            else:
                blockers.insert(0, f"view {_name(view)} is not Flask's own static view")
        if app.config.get("USE_X_SENDFILE"):
            # Flask's view then answers with an X-Sendfile header and no body, for the front server
            blockers.append("USE_X_SENDFILE is on: Flask's static view answers with an X-Sendfile header")
        blockers += judge.blueprint_blockers(endpoint)
        verdict = _verdict(prefix, folder, endpoint, blockers, judge.skipped(endpoint), adapter)
        verdicts.append(verdict)
        if verdict.served and folder is not None:
            served_endpoints.add(endpoint)
            served_mounts.setdefault(prefix, folder)
            # Flask's view of a blueprint folder asks the blueprint, not the app
            max_age = getattr(app.blueprints.get(endpoint.rpartition(".")[0]), "get_send_file_max_age", None)
            if max_age is not None:
                max_age_for[prefix] = max_age
    served_dirs: list[str] = []
    for prefix, folder in static_dirs.items():
        verdict = _verdict(prefix, folder, None, list(app_blockers), judge.skipped(None), adapter)
        verdicts.append(verdict)
        if verdict.served:
            served_dirs.append(prefix)
            served_mounts[prefix] = folder
    routed = _routed(adapter, frozenset(served_endpoints), tuple(served_dirs)) if adapter is not None else None
    if adapter is None:
        served_mounts = {}
    trusted = app.config.get("TRUSTED_HOSTS")
    return ServePlan(
        tuple(verdicts),
        served_mounts,
        routed if routed is not None else _nothing,
        max_age_for,
        trusted_hosts=tuple(trusted) if trusted is not None else None,
        unsatisfiable_to_app=_handles_unsatisfiable_range(app),
    )


def _handles_unsatisfiable_range(app: Flask) -> bool:
    """Whether an error handler of the app (or of any blueprint) would answer a 416.

    Flask's static view raises ``RequestedRangeNotSatisfiable`` for a range it
    cannot satisfy, and the app's handler for that code, or for a base class
    (``HTTPException``, ``Exception``), turns it into the app's own answer.
    Which handler wins depends on the blueprint; any of them is enough to
    leave those (rare) requests to Flask.
    """
    from werkzeug.exceptions import RequestedRangeNotSatisfiable

    classes = RequestedRangeNotSatisfiable.__mro__
    for by_code in app.error_handler_spec.values():
        for code in (416, None):
            handlers = by_code.get(code) or {}
            if any(cls in handlers for cls in classes):
                return True
    return False


def _nothing(path: str) -> bool:
    return False


def _verdict(
    prefix: str,
    folder: str | None,
    endpoint: str | None,
    blockers: list[str],
    skipped: tuple[str, ...],
    adapter: Any,
) -> MountVerdict:
    if adapter is None:
        blockers.append("the URL map matches hosts, so which view answers depends on the request")
    if folder is None and not blockers:
        return MountVerdict(prefix, None, endpoint, False, "no static folder on disk", (), skipped)
    if blockers:
        return MountVerdict(prefix, folder, endpoint, False, "; ".join(blockers), tuple(blockers), skipped)
    return MountVerdict(prefix, folder, endpoint, True, "no app code would run for it", (), skipped)


def _routed(
    adapter: Any, endpoints: frozenset[str], dirs: tuple[str, ...]
) -> Callable[[str], bool]:
    """Per file, at startup: serve a URL only if Flask would route it to a served static view,
    or, under a served ``static_dirs`` prefix, to no view at all."""
    from werkzeug.exceptions import MethodNotAllowed, NotFound

    def routed(path: str) -> bool:
        try:
            rule, _ = adapter.match(path, "GET", return_rule=True)
        except (NotFound, MethodNotAllowed):
            return path.startswith(dirs) if dirs else False
        except Exception:  # noqa: BLE001 -- a redirect or a refusal: Flask's to answer
            return False
        return rule.endpoint in endpoints

    return routed


class _Judge:
    """Sorts the app's hooks into blockers and skipped functions."""

    def __init__(self, app: Flask, declared: Sequence[Any]) -> None:
        self.app = app
        self.declared = tuple(declared)

    # -- what is safe ------------------------------------------------------------------

    def safe(self, function: Any) -> bool:
        if any(function is d or function == d for d in self.declared):
            return True
        if getattr(function, SAFE_ATTRIBUTE, False) is True:
            return True
        return _known_harmless(function) or _harmless_csrf_check(function, self.app)

    # -- what runs -----------------------------------------------------------------------

    def app_wide_blockers(self, wsgi_app: Any) -> list[str]:
        app = self.app
        blockers: list[str] = []
        problem = _wsgi_chain_problem(wsgi_app, app)
        if problem is not None:
            blockers.append(problem)
        from flask import Flask, Request, Response

        for method in _REQUEST_CYCLE:
            mine = getattr(type(app), method, None)
            if mine is not getattr(Flask, method, None) and not self.safe(mine):
                blockers.append(f"{type(app).__qualname__}.{method} overrides Flask's request cycle")
            # app.wsgi_app on the instance is where middleware goes; the chain check covers it
            replaced = vars(app).get(method)
            if replaced is not None and method != "wsgi_app" and not self.safe(replaced):
                blockers.append(f"app.{method} is replaced by {_name(replaced)}")
        for attribute, default in (("request_class", Request), ("response_class", Response)):
            cls = getattr(app, attribute)
            if cls is not default and not self.safe(cls):
                blockers.append(f"app.{attribute} is {_name(cls)}, not Flask's own")
        for kind, functions in self._hooks(None):
            blockers += [f"{kind} {_name(f)}" for f in functions if not self.safe(f)]
        for signal, receivers in self._receivers(_BLOCKING_SIGNALS):
            blockers += [f"{signal} receiver {_name(r)}" for r in receivers if not self.safe(r)]
        return blockers

    def blueprint_blockers(self, endpoint: str) -> list[str]:
        blockers: list[str] = []
        for name in _blueprint_chain(endpoint):
            for kind, functions in self._hooks(name):
                blockers += [
                    f"{kind} {_name(f)} of blueprint {name!r}" for f in functions if not self.safe(f)
                ]
        return blockers

    def skipped(self, endpoint: str | None) -> tuple[str, ...]:
        app = self.app
        found: list[str] = []
        keys: list[str | None] = [None, *(_blueprint_chain(endpoint) if endpoint else [])]
        for key in keys:
            for kind, functions in self._hooks(key):
                for function in functions:
                    if not self.safe(function):
                        continue
                    # Our own hooks are not app code; the extension function one of them
                    # stands in for (Principal's identity load, say) is.
                    shown = getattr(function, "__wrapped__", None) if _ours(function) else function
                    if shown is not None:
                        found.append(f"{kind} {_name(shown)}")
            for function in app.teardown_request_funcs.get(key, ()):
                found.append(f"teardown_request {_name(function)}")
        found += [f"teardown_appcontext {_name(f)}" for f in app.teardown_appcontext_funcs]
        for signal, receivers in self._receivers(_BLOCKING_SIGNALS):
            found += [f"{signal} receiver {_name(r)}" for r in receivers if self.safe(r)]
        for signal, receivers in self._receivers(_AFTER_SIGNALS):
            found += [f"{signal} receiver {_name(r)}" for r in receivers]
        return tuple(dict.fromkeys(found))

    def _hooks(self, key: str | None) -> list[tuple[str, list[Any]]]:
        app = self.app
        return [
            ("url_value_preprocessor", list(app.url_value_preprocessors.get(key, ()))),
            ("before_request", list(app.before_request_funcs.get(key, ()))),
            ("after_request", list(app.after_request_funcs.get(key, ()))),
        ]

    def _receivers(self, names: Sequence[str]) -> list[tuple[str, list[Any]]]:
        from flask import signals

        found = []
        for name in names:
            signal = getattr(signals, name, None)
            if signal is not None:
                found.append((name, list(signal.receivers_for(self.app))))
        return found


def _blueprint_chain(endpoint: str) -> list[str]:
    """Names whose hooks run for ``endpoint``: ``a.b.static`` -> ``["a.b", "a"]``."""
    name = endpoint.rpartition(".")[0]
    chain = []
    while name:
        chain.append(name)
        name = name.rpartition(".")[0]
    return chain


def _known_harmless(function: Any) -> bool:
    """Functions of Flask-Principal, Flask-Login and this package known not to touch a static GET."""
    from . import timing

    # The hooks flask_hooks installs carry SAFE_ATTRIBUTE, so the declared check finds them.
    if function is getattr(timing, "_add_header", None):
        return True
    func = getattr(function, "__func__", None)
    if func is None:
        return False
    try:
        from flask_principal import Principal
    except ImportError:  # pragma: no cover - a hard dependency
        Principal = None  # noqa: N806
    if Principal is not None and func is Principal._on_before_request:
        return True
    try:
        from flask_login import LoginManager
    except ImportError:  # pragma: no cover - a hard dependency
        return False
    return func is getattr(LoginManager, "_update_remember_cookie", None)


def _harmless_csrf_check(function: Any, app: Flask) -> bool:
    """Flask-WTF's ``CSRFProtect`` check, as long as it does not check ``GET``/``HEAD``.

    The ``before_request`` function ``CSRFProtect.init_app`` registers returns at
    once for a method not in ``WTF_CSRF_METHODS`` (by default POST, PUT, PATCH,
    DELETE), provided ``protect`` is Flask-WTF's own.
    """
    code = getattr(function, "__code__", None)
    if code is None or getattr(function, "__name__", None) != "csrf_protect":
        return False
    try:
        from flask_wtf.csrf import CSRFProtect  # type: ignore[import-untyped]
    except ImportError:
        return False
    if code not in CSRFProtect.init_app.__code__.co_consts:
        return False
    for cell in function.__closure__ or ():
        owner = cell.cell_contents
        if isinstance(owner, CSRFProtect) and type(owner).protect is not CSRFProtect.protect:
            return False
    methods = app.config.get("WTF_CSRF_METHODS") or ()
    return "GET" not in methods and "HEAD" not in methods


def _ours(function: Any) -> bool:
    """This package's own hooks: not app code, so not worth reporting as skipped."""
    module = getattr(function, "__module__", None) or getattr(getattr(function, "__func__", None), "__module__", "")
    return isinstance(module, str) and module.startswith(__package__ + ".")


def _wsgi_chain_problem(wsgi_app: Any, app: Flask) -> str | None:
    """Why the wrapped callable is not (a ProxyFix around) the app's own ``wsgi_app``, or None."""
    import inspect

    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    current = wsgi_app
    for _ in range(8):
        if current is app:  # Flask.__call__ runs app.wsgi_app, which may be a middleware
            inner = vars(app).get("wsgi_app")
            if inner is None:
                return None
            current = inner
            continue
        if inspect.ismethod(current) and current.__self__ is app and current.__func__ is Flask.wsgi_app:
            return None
        if isinstance(current, ProxyFix):
            current = current.app
            continue
        break
    return f"the middleware wraps {_name(current)}, not the app's wsgi_app: that code would be skipped"


def _name(obj: Any) -> str:
    """``module.qualname`` of a function, bound method or class; a repr otherwise."""
    qualname = getattr(obj, "__qualname__", None)
    module = getattr(obj, "__module__", None)
    if qualname is None:
        func = getattr(obj, "__func__", None)
        qualname = getattr(func, "__qualname__", None)
        module = getattr(func, "__module__", module)
    if qualname is None:
        return repr(obj)
    return f"{module}.{qualname}" if module else qualname
