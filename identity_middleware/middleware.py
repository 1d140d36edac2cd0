"""The WSGI middleware: recognise static requests before Flask sees them.

Wrap a Flask app's ``wsgi_app`` and static files, favicons and other assets
stop loading the user and the identity -- no SQL, no ``identity_loaded``, no
``Set-Cookie``/``Vary: Cookie`` -- while every piece of the app's code still
sees exactly what it would see without the middleware::

    app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=["/favicon.ico"])

The middleware classifies ``PATH_INFO`` (see :mod:`identity_middleware.matching`),
marks static requests in the environ and installs the Flask-side hooks
(:mod:`identity_middleware.flask_hooks`) that read the mark. A marked request
does no identity work *eagerly*; code that asks for ``current_user``, the
session or the identity gets the real one, loaded on demand. So a mark only
ever saves work: it never changes what a view, a hook or a template sees.

Finding the app: a bound ``app.wsgi_app`` knows its app, and so does a wrapper
that keeps the wrapped callable as ``.app`` (werkzeug's ``ProxyFix``), so
``IdentityMiddleware(ProxyFix(app.wsgi_app))`` works. Best of all, wrap
``app.wsgi_app`` itself and put other middleware outside:
``app.wsgi_app = ProxyFix(IdentityMiddleware(app.wsgi_app))``. A wrapper
that is not known to keep ``PATH_INFO`` as it is (a dispatcher, a prefix
middleware) is named in a WARNING at startup; the mark records the path it
classified, and the Flask side ignores it when the path Flask sees differs,
so a rewritten path is never treated as static. When no Flask app can be
found, only listed paths are marked, no Flask-side hooks are installed, and a
WARNING says so. Other frameworks read the mark with :func:`is_static_request`.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple

from flask import Flask

from . import config, timing
from .config import ConfigError
from .flask_hooks import MARK, MARKED_PATH, is_marked
from .matching import Classifier, Decision, named_static_mounts, static_folder, text_path_problem
from .serve_rules import MountVerdict, ServePlan, resolve_safe_hooks

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["IdentityMiddleware", "is_static_request", "MARK", "MARKED_PATH"]

_SETTINGS = ("IDENTITY_STATIC_PATHS", "IDENTITY_SERVE_STATIC", "IDENTITY_DEBUG_HEADERS")

_log = logging.getLogger(__name__)


class IdentityMiddleware:
    """Mark static requests so they skip identity loading; optionally serve them.

    :param wsgi_app: the WSGI callable to wrap, normally a Flask app's
        ``app.wsgi_app``. Then the Flask-side hooks are installed on the
        first request, and static mounts come from ``app.url_map``.
    :param static_paths: extra static paths (``IDENTITY_STATIC_PATHS``): exact
        paths such as ``/favicon.ico`` or prefixes ending in ``/``; a list or
        a comma-separated string. ``/`` alone is refused.
    :param serve_static: answer indexed static files in the middleware,
        before Flask (``IDENTITY_SERVE_STATIC``).
    :param static_dirs: extra folders to serve, ``{"/assets/": "build/assets"}``;
        their prefixes are also listed static paths.
    :param debug_headers: add a ``Server-Timing`` header describing the
        decision (``IDENTITY_DEBUG_HEADERS``).
    :param static_safe_hooks: serve mode only: the app's ``before_request``,
        ``after_request``, ``url_value_preprocessor`` functions and signal
        receivers that are harmless for a GET of a static file, so that they do
        not keep a mount from being answered before Flask (also
        ``app.config["IDENTITY_STATIC_SAFE_HOOKS"]``; never the environment).
        See :mod:`identity_middleware.serve_rules`.
    :param static_options: serve mode only: keyword arguments for
        :class:`~identity_middleware.static.StaticFiles`, such as
        ``immutable_pattern``, ``immutable_manifest`` or ``recheck_interval``.

    Settings resolve as environment > argument > ``app.config`` > default,
    at construction; a bad value raises :class:`ConfigError` then.

    Environ keys written on static requests (absent otherwise):
    ``identity_middleware.static`` (``True``) and
    ``identity_middleware.static_path`` (the ``PATH_INFO`` classified).

    Wrapping anything but a Flask app's ``wsgi_app`` (or a known
    path-preserving wrapper of it, such as ``ProxyFix``) logs a WARNING at
    construction naming the wrapper and the fix; ``wrappers`` lists the
    wrappers found between this middleware and the app.
    """

    __slots__ = (
        "wsgi_app",
        "app",
        "wrappers",
        "settings",
        "static_dirs",
        "listed",
        "_classifier",
        "_files",
        "_serve_plan",
        "_trusted_hosts",
        "_safe_hooks",
        "_static_options",
        "_debug_headers",
        "_ready",
        "_lock",
    )

    def __init__(
        self,
        wsgi_app: WSGIApplication,
        static_paths: Iterable[str] | str | None = None,
        *,
        serve_static: bool | None = None,
        static_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
        debug_headers: bool | None = None,
        static_safe_hooks: Iterable[Any] | None = None,
        static_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.wsgi_app = wsgi_app
        found = _find_flask_app(wsgi_app)
        self.app: Flask | None = found.app
        #: Wrappers between this middleware and the Flask app, outermost first.
        self.wrappers: tuple[Any, ...] = found.wrappers
        _warn_about_wrapping(wsgi_app, found)
        arguments = {
            "IDENTITY_STATIC_PATHS": static_paths,
            "IDENTITY_SERVE_STATIC": serve_static,
            "IDENTITY_DEBUG_HEADERS": debug_headers,
        }
        self.settings: dict[str, config.Resolved] = config.resolve(_SETTINGS, arguments, self.app)
        listed_paths = self.settings["IDENTITY_STATIC_PATHS"]
        if "/" in listed_paths.value:
            raise ConfigError(
                "IDENTITY_STATIC_PATHS",
                "/",
                "paths narrower than '/' (listing '/' would mark every GET of every page) "
                f"(from {listed_paths.source})",
            )
        self.static_dirs: dict[str, str] = _checked_static_dirs(static_dirs)
        #: Listed paths: the setting plus the prefixes of ``static_dirs``.
        self.listed: tuple[str, ...] = tuple(dict.fromkeys((*listed_paths.value, *self.static_dirs)))
        self._files: Callable[[WSGIEnvironment, StartResponse], Any] | None = None
        self._serve_plan: ServePlan | None = None
        self._trusted_hosts: tuple[str, ...] | None = None
        self._safe_hooks: tuple[Any, ...] = resolve_safe_hooks(static_safe_hooks, self.app)[0]
        self._static_options: dict[str, Any] = _checked_static_options(static_options)
        self._debug_headers: bool = self.settings["IDENTITY_DEBUG_HEADERS"].value
        self._lock = threading.Lock()
        if self.app is None:
            self._classifier: Classifier | None = Classifier(None, self.listed)
            self._ready = not self.settings["IDENTITY_SERVE_STATIC"].value
        else:
            from . import flask_hooks

            flask_hooks.verify_internals()  # a missing internal fails here, at startup
            self.app.extensions["identity_middleware"] = self
            timing.install(self.app, enabled=self._debug_headers)
            # Routes, blueprints and extensions may still be added after wrapping;
            # the classifier and the hooks are built on the first request.
            self._classifier = None
            self._ready = False
        from . import log

        log.configured(self)  # the settings line, at construction

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not self._ready:
            self._setup()
        marked = self._classifier.classify(environ)  # type: ignore[union-attr]
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s %r static=%s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), marked)
        if marked:
            environ[MARK] = True
            environ[MARKED_PATH] = environ.get("PATH_INFO")
            if self._files is not None:
                return self._serve(environ, start_response)
        return self.wsgi_app(environ, start_response)

    def _serve(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Answer an indexed file before Flask, or fall through to the app."""
        trusted = self._trusted_hosts
        if trusted is not None and not _trusted_host(environ, trusted):
            return self.wsgi_app(environ, start_response)  # Flask answers 400 for a host it does not trust
        respond = start_response
        if self._debug_headers:
            respond = timing.start_response_with_header(start_response, "static")
        response = self._files(environ, respond)  # type: ignore[misc]
        if response is not None:
            return response  # type: ignore[no-any-return]
        return self.wsgi_app(environ, start_response)

    # -- setup ------------------------------------------------------------------------

    def _setup(self) -> None:
        with self._lock:
            if self._ready:
                return
            self._build()
            self._ready = True

    def _build(self) -> None:
        classifier = self._new_classifier()
        if self.app is not None:
            from . import flask_hooks

            flask_hooks.install(self.app)
        files = None
        if self.settings["IDENTITY_SERVE_STATIC"].value:
            files = self._static_files(classifier)
        self._classifier, self._files = classifier, files
        from . import log

        log.first_request(self, classifier)  # mounts and route warnings, once routes are known

    def _static_files(self, classifier: Classifier) -> Callable[..., Any]:
        """Serve mode's file index, over the mounts no app code keeps from being served."""
        from .static import StaticFiles  # serve mode only

        plan = self._plan()
        self._serve_plan = plan
        self._trusted_hosts = plan.trusted_hosts
        # Mounts that are not served still own their subtree: ``routed`` refuses their
        # URLs, so an outer folder never answers for them.
        return StaticFiles(  # type: ignore[no-any-return]
            plan.mounts,
            app=self.app,
            routed=plan.routed,
            max_age_for=plan.max_age_for,
            unsatisfiable_to_app=plan.unsatisfiable_to_app,
            **self._static_options,
        )

    def _plan(self) -> ServePlan:
        from . import serve_rules

        # Every rule with a static endpoint *name*, so the report can say why a wrapped
        # static view is not served; plan() serves only Flask's own static view.
        mounts: dict[str, str] = {}
        folders: dict[str, str | None] = {}
        if self.app is not None:
            mounts = named_static_mounts(self.app)
            folders = {prefix: static_folder(self.app, endpoint) for prefix, endpoint in mounts.items()}
        return serve_rules.plan(self.app, mounts, folders, self.static_dirs, self.wsgi_app, self._safe_hooks)

    def serve_verdicts(self) -> tuple[MountVerdict, ...]:
        """Per static mount: answered before Flask or not, and which function keeps it from it.

        Empty when serve mode is off. Before the first request, computed from the
        app as it is now (the CLI does this).
        """
        if not self.settings["IDENTITY_SERVE_STATIC"].value:
            return ()
        plan = self._serve_plan or self._plan()
        return plan.verdicts

    def serve_summary(self) -> str | None:
        """The verdicts in one clause for the startup line; ``None`` when serve mode is off."""
        if not self.settings["IDENTITY_SERVE_STATIC"].value:
            return None
        plan = self._serve_plan or self._plan()
        return plan.summary()

    def rebuild(self) -> None:
        """Rebuild the classifier (and the static file index) from the app as it is now.

        The first request does this by itself; call it after changing routes
        later, or to inspect decisions before any request (the CLI does).
        Reinstalling the hooks is harmless: it is idempotent.
        """
        with self._lock:
            self._build()

    # -- inspection -------------------------------------------------------------------

    @property
    def classifier(self) -> Classifier:
        """The classifier in use, or, before the first request, one built from the app now."""
        classifier = self._classifier
        if classifier is None or not self._ready:
            classifier = self._new_classifier()
        return classifier

    def _new_classifier(self) -> Classifier:
        # A wrapper between us and Flask (ProxyFix) may change the host Flask routes on.
        return Classifier(self.app, self.listed, host_as_seen=not self.wrappers)

    def explain(self, path: str, method: str = "GET", *, host: str | None = None) -> Decision:
        """Why a request for the text ``path`` would or would not be static."""
        return self.classifier.explain(path, method, host=host)


def is_static_request(environ: WSGIEnvironment | None = None) -> bool:
    """True when the middleware marked the request as static (and its path is unchanged).

    Without an argument, reads the current Flask request; outside a request
    it returns False.
    """
    if environ is None:
        from flask import has_request_context, request

        if not has_request_context():
            return False
        environ = request.environ
    return is_marked(environ)


#: Wrappers known to pass ``PATH_INFO`` through unchanged. ``ProxyFix`` sets
#: ``SCRIPT_NAME`` (``x_prefix``), the scheme, host and remote address, never the path.
_PATH_PRESERVING = frozenset(
    {
        "werkzeug.middleware.proxy_fix.ProxyFix",
        "werkzeug.middleware.lint.LintMiddleware",
    }
)

#: Attributes under which wrappers commonly keep the callable they wrap.
_INNER_ATTRIBUTES = ("app", "wsgi_app", "application", "__wrapped__")

_MAX_DEPTH = 16


class _Found(NamedTuple):
    app: Flask | None
    wrappers: tuple[Any, ...]  # between the middleware and the app (or the end), outermost first


def _is_bound_wsgi_app(candidate: Any) -> bool:
    return (
        inspect.ismethod(candidate)
        and isinstance(candidate.__self__, Flask)
        and candidate.__func__.__name__ == "wsgi_app"
    )


def _find_flask_app(wsgi_app: Any) -> _Found:
    """The Flask app behind ``wsgi_app``, looking through wrappers that expose what they wrap."""
    wrappers: list[Any] = []
    current = wsgi_app
    seen: set[int] = set()
    while len(wrappers) <= _MAX_DEPTH and id(current) not in seen:
        if isinstance(current, Flask):
            return _Found(current, tuple(wrappers))
        if _is_bound_wsgi_app(current):
            return _Found(current.__self__, tuple(wrappers))
        seen.add(id(current))
        inner = next(
            (getattr(current, a) for a in _INNER_ATTRIBUTES if callable(getattr(current, a, None))),
            None,
        )
        if inner is None:
            break
        wrappers.append(current)
        current = inner
    return _Found(None, tuple(wrappers))


def _qualified_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _warn_about_wrapping(wsgi_app: Any, found: _Found) -> None:
    """Say loudly when the app cannot be found, or a wrapper may rewrite the path."""
    if found.app is None:
        _log.warning(
            "IdentityMiddleware wraps %s and found no Flask app inside it: only the listed "
            "static paths are marked and the Flask-side hooks are not installed, so "
            "Flask-Login and Flask-Principal still load identity for every static file. "
            "For a Flask app, wrap app.wsgi_app itself and put other middleware outside: "
            "app.wsgi_app = Other(IdentityMiddleware(app.wsgi_app)). "
            "Wrapping another framework's app this way is fine; this message is then expected.",
            _qualified_name(wsgi_app),
        )
        return
    unknown = [w for w in found.wrappers if _qualified_name(w) not in _PATH_PRESERVING]
    if unknown:
        names = ", ".join(_qualified_name(w) for w in unknown)
        _log.warning(
            "IdentityMiddleware wraps %s, which is not known to keep PATH_INFO unchanged, "
            "around the Flask app %r. Static requests are classified on the path as it "
            "arrives here; the Flask side ignores a mark when the path Flask sees differs, "
            "so nothing is mis-marked, but a rewritten path never skips identity. "
            "Wrap app.wsgi_app itself and put the other middleware outside: "
            "app.wsgi_app = Other(IdentityMiddleware(app.wsgi_app)).",
            names,
            found.app.name,
        )


def _trusted_host(environ: WSGIEnvironment, trusted_hosts: tuple[str, ...]) -> bool:
    """Whether Flask would accept the request's host under ``TRUSTED_HOSTS``.

    The same check Flask makes before routing (``werkzeug.wsgi.get_host``); a host
    it refuses gets a 400 from Flask, never a file from serve mode.
    """
    from werkzeug.exceptions import SecurityError
    from werkzeug.wsgi import get_host

    try:
        get_host(environ, trusted_hosts)
    except SecurityError:
        return False
    return True


def _checked_static_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError("static_options", options, "a mapping of StaticFiles keyword arguments")
    from .static import OPTIONS, StaticFiles

    for name in options:
        if name not in OPTIONS:
            raise ConfigError("static_options", name, "one of " + ", ".join(sorted(OPTIONS)))
    StaticFiles({}, **options)  # the values are checked now, at construction, not at the first request
    return dict(options)


_STATIC_DIRS_EXPECTED = (
    "a mapping of URL prefixes (starting and ending with '/', canonical, not '/' alone) "
    "to existing folders"
)


def _checked_static_dirs(static_dirs: Mapping[str, Any] | None) -> dict[str, str]:
    if static_dirs is None:
        return {}
    if not isinstance(static_dirs, Mapping):
        raise ConfigError("static_dirs", static_dirs, _STATIC_DIRS_EXPECTED)
    checked: dict[str, str] = {}
    for prefix, folder in static_dirs.items():
        if (
            not isinstance(prefix, str)
            or prefix == "/"
            or not prefix.endswith("/")
            or text_path_problem(prefix) is not None
        ):
            raise ConfigError("static_dirs", {prefix: folder}, _STATIC_DIRS_EXPECTED)
        try:
            path = os.fspath(folder)
        except TypeError:
            raise ConfigError("static_dirs", {prefix: folder}, _STATIC_DIRS_EXPECTED) from None
        if not os.path.isdir(path):
            raise ConfigError("static_dirs", {prefix: folder}, _STATIC_DIRS_EXPECTED)
        checked[prefix] = os.path.abspath(path)
    return checked
