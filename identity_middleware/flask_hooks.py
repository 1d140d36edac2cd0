"""Flask-side hooks: a marked request does no identity work until something asks.

The promise (DESIGN §5.0): wrapping an app changes nothing any of its code can
observe. On a request the middleware marked as static, nothing identity-related
runs *eagerly* -- no session cookie decode, no user or request loader, no
Principal identity load, no ``identity_loaded``, no ``Set-Cookie``, no
``Vary: Cookie`` -- but the moment any code asks (reads ``current_user``, the
``session`` or ``g.identity``, checks a ``Permission``), it gets the real answer,
loaded on demand exactly as the bare app would load it. A login gate in
``before_request``, a static view wrapped in ``login_required``, an
``after_request`` that records the user, a ``url_value_preprocessor`` or a
``request_started`` receiver that touches ``current_user``: each sees what it
would see without the middleware. Only work whose result nothing reads is
skipped, so a wrong mark can cost speed but never change an answer.

How each piece is made lazy (Flask 3.0-3.2, Flask-Login 0.6.3, Flask-Principal 0.4):

* **The session.** Flask opens the session before any app code runs. The app's
  session interface is wrapped (:class:`StaticAwareSessionInterface`); for a
  marked request its ``open_session`` returns a :class:`LazySession` that
  opens the wrapped interface's real session (cookie decode, server-side
  lookup) the first time anything reads or writes it, and forwards everything
  to it from then on -- ``isinstance`` included. A session never opened is
  null: never saved, so no ``Set-Cookie`` and no ``Vary: Cookie``. One that was
  opened is saved by the wrapped interface exactly as in the bare app. Unmarked
  requests go straight to the wrapped interface.
* **The user.** Flask-Login is lazy already: ``current_user`` calls the loaders
  the first time it is touched. We leave it alone. Its ``after_request``
  function (``_update_remember_cookie``) reads the session on every request to
  maintain the remember cookie; on a marked request whose session has not been
  opened when it runs, our replacement skips it (the upkeep nobody asked for,
  and the cookie decode it would cost). If app code opened the session, it runs
  as in the bare app.
* **The identity.** Flask-Principal loads an identity in a ``before_request``
  function. Our replacement, on a marked request, only records that the load
  is due. ``g`` is an instance of the app's ``app_ctx_globals_class`` (a
  documented Flask setting), which :func:`install` extends: the first time
  anything reads ``g.identity`` (directly, through ``Permission``/
  ``IdentityContext``, ``hasattr``, ``g.get``, ``in``, or by iterating ``g``),
  Principal's own load runs -- its loaders, ``set_identity``,
  ``identity_loaded`` and its savers -- and the reader gets the real identity
  object, of its real type. We chose this over a stand-in object (a
  ``LocalProxy`` in ``g.identity``) because ``type()`` and ``is`` cannot be
  forwarded by a proxy. ``identity_changed`` (a login on a marked request) is
  left untouched and works as in the bare app; an identity set by the app
  before anything read the deferred one simply wins, as it would. Where
  Principal's own ``skip_static`` skips the request, ``g.identity`` stays unset
  as it would. If the app's ``g`` class is not derived from Flask's, or is
  replaced after installation, Principal loads eagerly (correct, only not lazy).

Dynamic (unmarked) requests run everything as the bare app does; what we add
there is kept to a few dictionary lookups, because every logged-in page pays it:
the hooks test the mark with one lookup in the environ, which they reach through
``request._get_current_object()`` (werkzeug's documented way past the proxy, a
seventh of the cost of ``request.environ``), and the ``g`` class answers
``"_login_user" in g`` -- asked on every ``current_user`` access -- in one call,
as Flask's does. :mod:`identity_middleware.login_identifier` remembers one
piece of Flask-Login's own work, the session-protection identifier.

The seams (private names of Flask-Login and Flask-Principal we find and replace
by name, and the shape of Flask's ``g`` class) are checked at startup by
:func:`verify_internals`: with a version that lacks one we refuse to start
rather than silently doing nothing. Flask is used through its public API
(``SessionInterface``, ``app_ctx_globals_class``, ``flask.request``, ``g``,
the hook lists), none of it deprecated in Flask 3.2; ``flask.globals.request_ctx``
and ``RequestContext``, deprecated there, are not used.

Every function of ours that sits in an app's hook lists carries the attribute
``_identity_middleware_static_safe = True`` (serve mode reads it: such a function
changes nothing a static file's answer depends on) and ``__wrapped__`` for the
function it replaces.

What stays different, by design (DESIGN §5.0): on a marked request whose
session nothing read, no ``Set-Cookie``/``Vary: Cookie`` (Principal's saver and
Flask-Login's remember-cookie refresh merely restate the session); and
``identity_loaded`` receivers and loaders run only when something reads the
identity, so a receiver that counts calls sees fewer.
"""

from __future__ import annotations

import copy
import importlib.metadata
from typing import TYPE_CHECKING, Any, Callable, Iterator

from flask import Flask, g, has_request_context, request
from flask.sessions import SessionInterface

from . import login_identifier, sessions

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from flask import Request, Response
    from flask.ctx import _AppCtxGlobals
    from flask.sessions import SessionMixin
else:
    # Flask's own class for ``g``, through the public setting rather than its private name.
    _AppCtxGlobals = Flask.app_ctx_globals_class

__all__ = [
    "MARK",
    "MARKED_PATH",
    "SAFE_ATTRIBUTE",
    "LazySession",
    "StaticAwareSessionInterface",
    "install",
    "is_marked",
    "principals_of",
    "verify_internals",
]

#: The environ key the middleware sets (to ``True``) on static requests.
MARK = "identity_middleware.static"

#: The environ key holding the ``PATH_INFO`` the middleware classified. A mark
#: counts only while ``PATH_INFO`` still equals it, so a middleware between
#: ours and Flask that rewrites the path turns the mark off instead of
#: applying it to a path nobody classified.
MARKED_PATH = "identity_middleware.static_path"

#: Set to ``True`` on every function of ours in an app's hook lists.
SAFE_ATTRIBUTE = "_identity_middleware_static_safe"

#: The environ key where a marked request keeps its :class:`LazySession`.
_LAZY_SESSION = "identity_middleware.lazy_session"

#: ``g`` attribute: Principal loads deferred on this request, in registration order.
_PENDING = "_identity_middleware_pending_identity"


def is_marked(environ: WSGIEnvironment) -> bool:
    """True when the middleware marked this request and nothing rewrote its path since."""
    return environ.get(MARK) is True and environ.get(MARKED_PATH) == environ.get("PATH_INFO")


#: The current request object itself. ``request.environ`` goes through the proxy's
#: ``__getattr__`` after a failed normal lookup (about 0.7 us); werkzeug documents
#: ``_get_current_object`` as the way to reach the object behind a proxy (about 0.1 us).
#: Our hooks run on every request, so they read the environ through this.
_current_request: Callable[[], Request] = request._get_current_object  # type: ignore[attr-defined]


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
            f"identity_middleware cannot defer identity loading for static requests with "
            f"{package} {_version(distribution)}: "
            + "; ".join(missing)
            + ". It relies on these internals (checked at startup so it never silently "
            "does nothing); use a supported version or report this."
        )


def verify_internals() -> None:
    """Raise RuntimeError unless every internal the hooks rely on has the expected shape."""
    import flask
    import flask.ctx
    import flask.sessions

    flask_missing = []
    for name in ("open_session", "save_session", "is_null_session", "make_null_session"):
        if not callable(getattr(flask.sessions.SessionInterface, name, None)):
            flask_missing.append(f"SessionInterface.{name} is missing")
    if "is_null_session" not in _names_in(getattr(flask.Flask, "process_response", None)):
        flask_missing.append("Flask.process_response no longer asks is_null_session before saving")
    globals_class = getattr(flask.Flask, "app_ctx_globals_class", None)
    if not isinstance(globals_class, type):
        flask_missing.append("Flask.app_ctx_globals_class is missing")
    else:
        for name in ("__getattr__", "get", "pop", "setdefault", "__contains__", "__iter__"):
            if not callable(getattr(globals_class, name, None)):
                flask_missing.append(f"Flask.app_ctx_globals_class.{name} is missing")
    if "app_ctx_globals_class" not in _names_in(flask.ctx.AppContext.__init__):
        flask_missing.append("AppContext no longer builds g from app.app_ctx_globals_class")
    _fail("Flask", "flask", flask_missing)

    login_missing = []
    try:
        from flask_login import LoginManager
    except ImportError:  # pragma: no cover - a hard dependency
        login_missing.append("flask_login cannot be imported")
    else:
        login_missing.extend(_login_class_problems(LoginManager))
    _fail("Flask-Login", "flask-login", login_missing)

    principal_missing = []
    try:
        from flask_principal import Principal
    except ImportError:  # pragma: no cover - a hard dependency
        principal_missing.append("flask_principal cannot be imported")
    else:
        principal_missing.extend(_principal_class_problems(Principal))
    _fail("Flask-Principal", "flask-principal", principal_missing)


def _login_class_problems(cls: type) -> list[str]:
    method = getattr(cls, "_update_remember_cookie", None)
    if not callable(method):
        return [f"{cls.__qualname__}._update_remember_cookie is missing"]
    if "session" not in _names_in(method):
        return [f"{cls.__qualname__}._update_remember_cookie no longer reads the session"]
    return []


def _principal_class_problems(cls: type) -> list[str]:
    problems = []
    if not callable(getattr(cls, "_is_static_route", None)):
        problems.append(f"{cls.__qualname__}._is_static_route is missing")
    method = getattr(cls, "_on_before_request", None)
    if not callable(method):
        problems.append(f"{cls.__qualname__}._on_before_request is missing")
    else:
        names = _names_in(method)
        if "_is_static_route" not in names:
            problems.append(f"{cls.__qualname__}._on_before_request no longer consults _is_static_route")
        if "identity" not in names:
            problems.append(f"{cls.__qualname__}._on_before_request no longer sets g.identity")
    return problems


# -- installation ---------------------------------------------------------------------


def _unwrapped(function: Any) -> Any:
    return getattr(function, "__wrapped__", function) if getattr(function, SAFE_ATTRIBUTE, False) else function


def principals_of(app: Flask) -> list[Any]:
    """The Flask-Principal instances initialised on ``app`` (found by their before_request)."""
    from flask_principal import Principal

    found: list[Any] = []
    for functions in app.before_request_funcs.values():
        for function in functions:
            owner = getattr(_unwrapped(function), "__self__", None)
            if isinstance(owner, Principal) and owner not in found:
                found.append(owner)
    return found


def install(app: Flask) -> None:
    """Install the hooks on ``app``; idempotent, so it can run again after changes.

    Called by the middleware on the first request, when every extension has
    been initialised. Works on the hook lists directly (``app.before_request``
    refuses once the app has served a request), replacing each extension's own
    function in place, so the order of the app's hooks is unchanged.
    """
    from flask_login import LoginManager
    from flask_principal import Principal

    verify_internals()
    # Signed-cookie sessions: unchanged sessions are not re-signed, verified cookies are
    # remembered (sessions.py). Inside ours, so a marked request still decodes nothing.
    sessions.install(app)
    _wrap_session_interface(app)
    _wrap_globals_class(app)
    before: list[Any]
    for before in app.before_request_funcs.values():
        for index, function in enumerate(list(before)):
            owner = getattr(function, "__self__", None)
            if isinstance(owner, Principal) and getattr(function, "__name__", "") == "_on_before_request":
                _fail("Flask-Principal", "flask-principal", _principal_class_problems(type(owner)))
                before[index] = _lazy_identity_hook(function)
    after: list[Any]
    for after in app.after_request_funcs.values():
        for index, hook in enumerate(list(after)):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, LoginManager) and getattr(hook, "__name__", "") == "_update_remember_cookie":
                _fail("Flask-Login", "flask-login", _login_class_problems(type(owner)))
                after[index] = _remember_cookie_hook(hook)
    manager = getattr(app, "login_manager", None)
    if isinstance(manager, LoginManager):
        login_identifier.memoise(manager)


# -- the identity (Flask-Principal) -----------------------------------------------------


def _lazy_identity_hook(load: Callable[[], Any]) -> Callable[[], None]:
    """Principal's ``before_request`` function, deferred on marked requests."""
    principal = load.__self__  # type: ignore[attr-defined]

    def defer_identity_for_static_requests() -> None:
        environ = _current_request().environ
        if environ.get(MARK) is not True or not is_marked(environ):  # a dynamic request: one dict lookup
            load()
            return None
        if principal._is_static_route():  # Principal's own skip_static: it loads nothing
            return None
        state = g._get_current_object()
        if not isinstance(state, _DeferredIdentityGlobals):
            load()  # app_ctx_globals_class replaced after install: correct, only not lazy
            return None
        attributes = vars(state)
        attributes.pop("identity", None)  # Principal would overwrite it; a stale one must not show
        pending = attributes.get(_PENDING)
        if pending is None or pending[0] is not environ:
            attributes[_PENDING] = (environ, [load])
        else:
            pending[1].append(load)  # a second Principal on the same app
        return None

    defer_identity_for_static_requests.__wrapped__ = load  # type: ignore[attr-defined]
    setattr(defer_identity_for_static_requests, SAFE_ATTRIBUTE, True)
    return defer_identity_for_static_requests


def _load_deferred_identity(state: Any) -> None:
    """Run the Principal loads deferred on this request, unless something set g.identity since."""
    attributes = vars(state)
    pending = attributes.pop(_PENDING, None)
    if pending is None or "identity" in attributes:
        return  # nothing deferred, or the app (identity_changed, set_identity) set it: keep that
    environ, loads = pending
    if not has_request_context() or _current_request().environ is not environ:
        return  # the request that deferred it is gone
    # Principal's own before_request bodies, in order: each sets g.identity, runs
    # the loaders, set_identity, identity_loaded and the savers.
    for load in loads:
        load()


class _DeferredIdentityGlobals(_AppCtxGlobals):
    """``g`` of a wrapped app: ``g.identity`` is loaded by Principal when first read.

    Mixed into the app's own ``app_ctx_globals_class`` (a documented Flask
    setting), so ``g`` keeps every behaviour of the app's class. Every way of
    observing the attribute -- reading it, ``hasattr``, ``g.get``, ``in``,
    iterating ``g`` -- runs the deferred load first, so it sees the real
    identity object, of its real type. Nothing else changes: an attribute
    other than ``identity`` costs one string comparison more.
    """

    def _settle(self, name: str) -> None:
        """Run the deferred identity load before ``name`` is observed, if it is pending."""
        if name == "identity" and _PENDING in vars(self):
            _load_deferred_identity(self)

    def __getattr__(self, name: str) -> Any:
        if name == "identity" and _PENDING in vars(self):
            _load_deferred_identity(self)
            try:
                return vars(self)["identity"]
            except KeyError:
                pass
        return super().__getattr__(name)

    def get(self, name: str, default: Any | None = None) -> Any:
        self._settle(name)
        return super().get(name, default)

    def pop(self, name: str, *default: Any) -> Any:
        self._settle(name)
        return super().pop(name, *default)

    def setdefault(self, name: str, default: Any = None) -> Any:
        self._settle(name)
        return super().setdefault(name, default)

    def __delattr__(self, name: str) -> None:
        self._settle(name)
        super().__delattr__(name)

    def __contains__(self, item: str) -> bool:
        self._settle(item)
        return super().__contains__(item)

    def __iter__(self) -> Iterator[str]:
        self._settle("identity")
        return super().__iter__()


# ``"_login_user" in g`` runs on every access to ``current_user`` (Flask-Login's
# ``_get_user``), several times per request. The methods above cost three Python calls
# there (ours, ``_settle``, Flask's through ``super()``) where the bare app pays one.
# When the app's class keeps Flask's own ``__contains__`` and ``get`` -- one-line
# ``self.__dict__`` operations -- the class we build does the same operation after
# the same check, in one call. These are those methods' bodies; they are used only
# while Flask's methods still have the shape checked here (else the generic ones).


def _contains_inline(self: _AppCtxGlobals, item: str) -> bool:
    namespace = self.__dict__
    if item == "identity" and _PENDING in namespace:
        _load_deferred_identity(self)
    return item in namespace


def _get_inline(self: _AppCtxGlobals, name: str, default: Any | None = None) -> Any:
    namespace = self.__dict__
    if name == "identity" and _PENDING in namespace:
        _load_deferred_identity(self)
    return namespace.get(name, default)


def _flask_method_is(name: str, names: tuple[str, ...], arguments: int) -> bool:
    """Whether Flask's ``_AppCtxGlobals.<name>`` is the one-line ``__dict__`` operation we inline."""
    code = getattr(getattr(_AppCtxGlobals, name, None), "__code__", None)
    return code is not None and code.co_names == names and code.co_argcount == arguments


_INLINE_METHODS: dict[str, Callable[..., Any]] = {}
if _flask_method_is("__contains__", ("__dict__",), 2):
    _INLINE_METHODS["__contains__"] = _contains_inline
if _flask_method_is("get", ("__dict__", "get"), 3):
    _INLINE_METHODS["get"] = _get_inline

_globals_classes: dict[type, type] = {}


def _wrap_globals_class(app: Flask) -> None:
    base = app.app_ctx_globals_class
    if issubclass(base, _DeferredIdentityGlobals):
        return
    if not issubclass(base, _AppCtxGlobals):
        return  # a g class of the app's own design: Principal keeps loading eagerly
    cls = _globals_classes.get(base)
    if cls is None:
        namespace: dict[str, Any] = {"__module__": base.__module__}
        for name, inline in _INLINE_METHODS.items():
            if getattr(base, name) is getattr(_AppCtxGlobals, name):  # not overridden by the app's class
                namespace[name] = inline
        cls = type(base.__name__, (_DeferredIdentityGlobals, base), namespace)
        _globals_classes[base] = cls
    app.app_ctx_globals_class = cls  # type: ignore[assignment]


# -- the remember cookie (Flask-Login) ----------------------------------------------------


def _remember_cookie_hook(update: Callable[[Response], Any]) -> Callable[[Response], Any]:
    """Flask-Login's ``after_request`` function, skipped while a marked session is unopened."""

    def maintain_remember_cookie_unless_unobserved(response: Response) -> Any:
        lazy = _current_request().environ.get(_LAZY_SESSION)
        if lazy is not None and not lazy.opened:
            return response  # upkeep nobody asked for: no cookie decode, no session access
        return update(response)

    maintain_remember_cookie_unless_unobserved.__wrapped__ = update  # type: ignore[attr-defined]
    setattr(maintain_remember_cookie_unless_unobserved, SAFE_ATTRIBUTE, True)
    return maintain_remember_cookie_unless_unobserved


# -- the session ----------------------------------------------------------------------------


class LazySession:
    """A marked request's session: opened by the wrapped interface on first use.

    Until then it holds no data and has read no cookie. Any read, write,
    iteration, ``isinstance`` check or attribute access (``permanent``,
    ``modified``, ``new``) opens the real session and is forwarded to it, so
    code sees exactly the session the bare app would have given it. The one
    exception is ``accessed``, which Flask 3.1+ sets on every resolution of
    ``flask.session``: before opening it is only recorded (and handed to the
    real session when it opens), because setting a flag reads nothing.
    """

    __slots__ = ("_interface", "_app", "_request", "_real", "_accessed")

    def __init__(self, interface: SessionInterface, app: Flask, request: Request) -> None:
        object.__setattr__(self, "_interface", interface)
        object.__setattr__(self, "_app", app)
        object.__setattr__(self, "_request", request)
        object.__setattr__(self, "_real", None)
        object.__setattr__(self, "_accessed", False)

    @property
    def opened(self) -> bool:
        """Whether the real session has been opened (something used the session)."""
        return self._real is not None

    def _open(self) -> SessionMixin:
        real = self._real
        if real is None:
            interface = self._interface
            real = interface.open_session(self._app, self._request)
            if real is None:
                real = interface.make_null_session(self._app)
            if self._accessed:
                real.accessed = True
            if self._real is None:  # another thread (copy_current_request_context) may have won
                object.__setattr__(self, "_real", real)
            real = self._real
        return real  # type: ignore[no-any-return]

    # Special methods are looked up on the type, so each one is forwarded here.
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(session, SecureCookieSession) as in the bare app
        return type(self._open())

    def __getattr__(self, name: str) -> Any:
        if name == "accessed" and self._real is None:
            return self._accessed
        return getattr(self._open(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "accessed" and self._real is None:
            object.__setattr__(self, "_accessed", bool(value))
        else:
            setattr(self._open(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._open(), name)

    def __getitem__(self, key: str) -> Any:
        return self._open()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._open()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._open()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._open()

    def __iter__(self) -> Iterator[str]:
        return iter(self._open())

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._open())  # type: ignore[call-overload,no-any-return]

    def __len__(self) -> int:
        return len(self._open())

    def __bool__(self) -> bool:
        return bool(self._open())

    def __eq__(self, other: object) -> bool:
        return self._open() == other

    def __ne__(self, other: object) -> bool:
        return self._open() != other

    __hash__ = None  # type: ignore[assignment]  # a session is a mutable mapping

    def __or__(self, other: Any) -> Any:
        return self._open() | other  # type: ignore[operator]

    def __ror__(self, other: Any) -> Any:
        return other | self._open()

    def __ior__(self, other: Any) -> LazySession:
        self._open().update(other)
        return self

    def __repr__(self) -> str:
        return repr(self._open())

    def __dir__(self) -> list[str]:
        return dir(self._open())

    def __copy__(self) -> Any:
        return copy.copy(self._open())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self._open(), memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self._open().__reduce_ex__(protocol)


def _wrap_session_interface(app: Flask) -> None:
    if not isinstance(app.session_interface, StaticAwareSessionInterface):
        app.session_interface = StaticAwareSessionInterface(app.session_interface)


class StaticAwareSessionInterface(sessions.WrappingSessionInterface):
    """The app's session interface, except that a marked request's session opens lazily.

    Flask opens the session before any app code runs, so the only place to
    avoid decoding the cookie of a static request is the interface itself.
    Everything else is the wrapped interface's (see
    :class:`~identity_middleware.sessions.WrappingSessionInterface`).
    """

    __slots__ = ()

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        """A :class:`LazySession` for a marked request (nothing read yet), else the wrapped one's."""
        environ = request.environ
        if environ.get(MARK) is True and is_marked(environ):
            lazy = LazySession(self.__wrapped__, app, request)
            environ[_LAZY_SESSION] = lazy
            return lazy  # type: ignore[return-value]
        return self.__wrapped__.open_session(app, request)

    def is_null_session(self, obj: object) -> bool:
        """True for a lazy session never opened; an opened one is the wrapped interface's call."""
        if type(obj) is LazySession:  # not isinstance: that would open it
            real = obj._real
            return real is None or self.__wrapped__.is_null_session(real)
        return self.__wrapped__.is_null_session(obj)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Save through the wrapped interface: the real session of a lazy one, if it was opened."""
        if type(session) is LazySession:
            real = session._real
            if real is None:
                return None
            session = real
        return self.__wrapped__.save_session(app, session, response)


#: The name this class had before it was public (kept for code written against it).
_StaticAwareSessionInterface = StaticAwareSessionInterface

