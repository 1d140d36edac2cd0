"""Flask-side hooks: a request the middleware marked as static skips identity.

Flask-Login loads the user lazily, the first time ``current_user`` is
touched; Flask-Principal loads an identity in a ``before_request`` function
and sends ``identity_loaded`` (whose usual handler touches ``current_user``);
Flask adds ``Vary: Cookie`` to every response whose session was read and
``Set-Cookie`` to every response whose session was written. For a static file
all of that is waste: two SQL queries and an uncacheable response.

Neither extension offers a public hook to opt a request out, so we use the
seams their code has, and check at startup that those seams are still there
(:func:`verify_internals`) -- with another version of Flask-Login,
Flask-Principal or Flask we refuse to start rather than silently doing
nothing. The seams (Flask-Login 0.6.3, Flask-Principal 0.4.0, Flask 3.x):

* Flask-Login's ``_get_user`` calls the loaders only when ``g`` has no
  ``_login_user``. Our ``before_request`` function, kept first in the app's
  list, sets it to the anonymous user on a marked request: no user loader,
  request loader, header loader or remember-cookie loader runs.
* Flask-Principal's ``_on_before_request`` and ``_on_identity_changed`` return
  early when ``self._is_static_route()`` is true. Each Principal instance of
  the app gets an instance attribute that is also true for marked requests
  (its ``skip_static`` keeps its own meaning): no identity loader, no
  ``identity_loaded``, no session saver. We set ``g.identity`` to an
  ``AnonymousIdentity`` ourselves, so ``Permission.require()`` still works.
* Flask opens the session in ``RequestContext.push``, before any
  ``before_request`` function -- for a logged-in user that is a signature check
  and a JSON decode of the cookie (~45 us of a ~190 us static request on the
  benchmark machine) or a round trip to a server-side store -- and saves it afterwards unless the session interface's ``is_null_session``
  says it is null. :func:`install` wraps ``app.session_interface`` in a
  delegating interface whose ``open_session`` gives a marked request a fresh,
  empty session of a subclass of the interface's ``null_session_class`` that
  accepts writes, without reading the cookie; its ``is_null_session`` is true
  for that session, so it is never saved -- no ``Set-Cookie``, no
  ``Vary: Cookie``, and no error when something writes to it. Everything else
  (``save_session``, cookie settings, attributes of the wrapped interface) is
  the wrapped interface's own. If ``app.session_interface`` is replaced after
  installation, our ``before_request`` function swaps the already opened session
  for such an empty one, so the request is just as safe, only not as cheap.

A static request's session is therefore always empty: a static file or an
owner-listed path needs no session data, and with no ``_user_id`` in it
nothing (Flask-Login's remember-cookie refresh, for one) acts on the user's
behalf. Writes to it are accepted and dropped.

Unmarked requests are untouched: our session interface hands them to the
wrapped one and our ``before_request`` function returns at once.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import TYPE_CHECKING, Any, Callable

from flask import g, has_request_context
from flask.sessions import SessionInterface
from flask_principal import AnonymousIdentity

if TYPE_CHECKING:
    from flask import Flask, Request
    from flask.ctx import RequestContext
    from flask.sessions import SessionMixin
    from werkzeug.local import LocalProxy

    class _FlaskGlobals:
        """How we use ``flask.globals``: Flask annotates its proxies as the objects they
        stand for, but we call the proxy's own ``_get_current_object``."""

        request_ctx: LocalProxy[RequestContext]

    _flask_globals: _FlaskGlobals
else:
    # The module, not the name: request_ctx is looked up per call, so a Flask without
    # it fails in verify_internals() with its message, not with an ImportError here.
    import flask.globals as _flask_globals

__all__ = ["MARK", "install", "principals_of", "verify_internals"]

#: The environ key the middleware sets on static requests.
MARK = "identity_middleware.static"

_WRAPPED = "__identity_middleware_wrapped__"


# -- startup checks -----------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return "unknown version"


def _names_in(function: Any) -> frozenset[str]:
    """Attribute names and string constants a function's code refers to."""
    code = getattr(function, "__code__", None)
    if code is None:
        return frozenset()
    return frozenset(code.co_names) | frozenset(c for c in code.co_consts if isinstance(c, str))


def _fail(package: str, distribution: str, missing: list[str]) -> None:
    if missing:
        raise RuntimeError(
            f"identity_middleware cannot skip identity loading for static requests with "
            f"{package} {_version(distribution)}: "
            + "; ".join(missing)
            + ". It relies on these internals (checked at startup so it never silently "
            "does nothing); use a supported version or report this."
        )


def verify_internals() -> None:
    """Raise RuntimeError unless every internal the hooks rely on has the expected shape."""
    import flask
    import flask.globals
    import flask.sessions
    from flask.ctx import RequestContext

    flask_missing = []
    if not hasattr(flask.globals, "request_ctx"):
        flask_missing.append("flask.globals.request_ctx is missing")
    if _session_attribute(RequestContext) is None:
        flask_missing.append("RequestContext keeps its session in neither '_session' nor 'session'")
    null_class = getattr(flask.sessions.SessionInterface, "null_session_class", None)
    if not (isinstance(null_class, type) and issubclass(null_class, dict)):
        flask_missing.append("SessionInterface.null_session_class is not a dict subclass")
    for name in ("open_session", "save_session", "is_null_session", "make_null_session"):
        if not callable(getattr(flask.sessions.SessionInterface, name, None)):
            flask_missing.append(f"SessionInterface.{name} is missing")
    if "is_null_session" not in _names_in(getattr(flask.Flask, "process_response", None)):
        flask_missing.append("Flask.process_response no longer asks is_null_session before saving")
    _fail("Flask", "flask", flask_missing)

    login_missing = []
    try:
        import flask_login.utils
        from flask_login import LoginManager
    except ImportError:  # pragma: no cover - a hard dependency
        login_missing.append("flask_login cannot be imported")
    else:
        if "_login_user" not in _names_in(getattr(flask_login.utils, "_get_user", None)):
            login_missing.append("flask_login.utils._get_user does not read g._login_user")
        if not callable(getattr(LoginManager, "_load_user", None)):
            login_missing.append("LoginManager._load_user is missing")
        if "_load_user" not in _names_in(getattr(flask_login.utils, "_get_user", None)):
            login_missing.append("flask_login.utils._get_user does not call _load_user")
    _fail("Flask-Login", "flask-login", login_missing)

    principal_missing = []
    try:
        from flask_principal import Principal
    except ImportError:  # pragma: no cover - a hard dependency
        principal_missing.append("flask_principal cannot be imported")
    else:
        principal_missing.extend(_principal_class_problems(Principal))
    _fail("Flask-Principal", "flask-principal", principal_missing)


def _principal_class_problems(cls: type) -> list[str]:
    problems = []
    if not callable(getattr(cls, "_is_static_route", None)):
        problems.append(f"{cls.__qualname__}._is_static_route is missing")
    for name in ("_on_before_request", "_on_identity_changed"):
        method = getattr(cls, name, None)
        if not callable(method):
            problems.append(f"{cls.__qualname__}.{name} is missing")
        elif "_is_static_route" not in _names_in(method):
            problems.append(f"{cls.__qualname__}.{name} no longer consults _is_static_route")
    return problems


@functools.lru_cache(maxsize=None)
def _session_attribute(ctx_class: type[Any]) -> str | None:
    """Where a request context stores its session: '_session' (Flask 3.1) or 'session' (3.0)."""
    if isinstance(getattr(ctx_class, "session", None), property):
        return "_session" if "_session" in _names_in(ctx_class.__init__) else None
    if "session" in _names_in(ctx_class.__init__):
        return "session"
    return None


# -- installation ---------------------------------------------------------------------


def principals_of(app: Flask) -> list[Any]:
    """The Flask-Principal instances initialised on ``app`` (found by their before_request)."""
    from flask_principal import Principal

    found: list[Any] = []
    for functions in app.before_request_funcs.values():
        for function in functions:
            owner = getattr(function, "__self__", None)
            if isinstance(owner, Principal) and owner not in found:
                found.append(owner)
    return found


def install(app: Flask) -> None:
    """Install the hooks on ``app``; idempotent, so it can run again after changes.

    Called by the middleware on the first request, when every extension has
    been initialised. Works on the lists directly, so it is allowed then.
    """
    verify_internals()
    manager = getattr(app, "login_manager", None)
    if manager is not None and not callable(getattr(manager, "anonymous_user", None)):
        _fail("Flask-Login", "flask-login", ["LoginManager.anonymous_user is missing"])
    _wrap_session_interface(app)
    for principal in principals_of(app):
        _fail("Flask-Principal", "flask-principal", _principal_class_problems(type(principal)))
        _wrap_principal(principal)
    functions = app.before_request_funcs.setdefault(None, [])
    while skip_identity_for_static_requests in functions:
        functions.remove(skip_identity_for_static_requests)
    functions.insert(0, skip_identity_for_static_requests)


def _wrap_principal(principal: Any) -> None:
    current = principal.__dict__.get("_is_static_route")
    if getattr(current, _WRAPPED, False):
        return
    original: Callable[[], bool] = principal._is_static_route

    def _is_static_route() -> bool:
        if has_request_context() and _flask_globals.request_ctx._get_current_object().request.environ.get(MARK):
            return True
        return original()

    setattr(_is_static_route, _WRAPPED, True)
    principal._is_static_route = _is_static_route


# -- the request hook -----------------------------------------------------------------


def skip_identity_for_static_requests() -> None:
    """First ``before_request`` function: on a marked request, identity is anonymous."""
    # Proxies are resolved once: this runs on every request, static or not.
    ctx = _flask_globals.request_ctx._get_current_object()
    if not ctx.request.environ.get(MARK):
        return None
    app = ctx.app
    _replace_session(ctx, app)
    state = g._get_current_object()
    manager = getattr(app, "login_manager", None)
    if manager is not None:
        state._login_user = manager.anonymous_user()
    state.identity = AnonymousIdentity()
    return None


# -- sessions of static requests --------------------------------------------------------


class _StaticSession:
    """Base of every static-request session class: lets a check be one ``isinstance``."""

    __slots__ = ()


_session_classes: dict[type, type] = {}


def _static_session_class(null_class: type) -> type:
    """A subclass of the app's null session class that accepts writes and is never saved."""
    cls = _session_classes.get(null_class)
    if cls is None:
        if not issubclass(null_class, dict):
            raise RuntimeError(
                f"identity_middleware needs the session interface's null_session_class to be "
                f"a dict subclass; {null_class.__qualname__} is not"
            )
        writable = {
            name: getattr(dict, name)
            for name in ("__setitem__", "__delitem__", "clear", "pop", "popitem", "update", "setdefault")
        }
        writable["__doc__"] = "Session of a static request: empty, writable, never saved."
        cls = type(f"StaticRequest{null_class.__name__}", (null_class, _StaticSession), writable)
        cls()  # fails here, at startup, if the class cannot be built without arguments
        _session_classes[null_class] = cls
    return cls


def _replace_session(ctx: Any, app: Flask) -> None:
    """Fallback for an interface set after :func:`install`: drop the session it opened."""
    # Annotated as plain ``type``: mypy does not see ``type[Any]`` as Hashable, which
    # lru_cache asks of its arguments (python/mypy#11470).
    ctx_class: type = type(ctx)
    attribute = _session_attribute(ctx_class) or "_session"
    if isinstance(ctx.__dict__.get(attribute), _StaticSession):
        return  # opened by our interface: nothing was read, nothing to drop
    setattr(ctx, attribute, _static_session_class(app.session_interface.null_session_class)())


def _wrap_session_interface(app: Flask) -> None:
    interface = app.session_interface
    if isinstance(interface, _StaticAwareSessionInterface):
        interface = interface.__wrapped__
    else:
        app.session_interface = _StaticAwareSessionInterface(interface)
    _static_session_class(interface.null_session_class)  # a misfit fails now, not per request


def _delegated(name: str) -> property:
    def get(self: _StaticAwareSessionInterface) -> Any:
        return getattr(self.__wrapped__, name)

    return property(get, doc=f"The wrapped interface's ``{name}``.")


class _StaticAwareSessionInterface(SessionInterface):
    """The app's session interface, except that a marked request's session is never opened.

    Flask opens the session before any ``before_request`` function runs, so the
    only place to avoid decoding the cookie of a static request is the
    interface itself. Every attribute -- ``save_session``, ``null_session_class``,
    the cookie settings, a Flask-Session interface's ``client`` -- is read from
    and written to the wrapped interface, which stays reachable as
    ``__wrapped__``. An ``isinstance`` test against the wrapped interface's own
    class does not see through the wrapper.
    """

    __slots__ = ("__wrapped__",)

    def __init__(self, wrapped: SessionInterface) -> None:
        object.__setattr__(self, "__wrapped__", wrapped)

    def __getattr__(self, name: str) -> Any:
        if name == "__wrapped__":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.__wrapped__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__wrapped__, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.__wrapped__, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} wrapping {self.__wrapped__!r}>"

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        """An empty static session for a marked request (no cookie read), else the wrapped one's."""
        if request.environ.get(MARK):
            return _static_session_class(self.__wrapped__.null_session_class)()  # type: ignore[no-any-return]
        return self.__wrapped__.open_session(app, request)

    def is_null_session(self, obj: object) -> bool:
        """True for a static session whatever the wrapped interface's test is, so it is never saved."""
        return isinstance(obj, _StaticSession) or self.__wrapped__.is_null_session(obj)


# SessionInterface's own attributes would shadow __getattr__: forward each of them too.
for _name in vars(SessionInterface):
    if not _name.startswith("__") and _name not in vars(_StaticAwareSessionInterface):
        setattr(_StaticAwareSessionInterface, _name, _delegated(_name))
del _name
