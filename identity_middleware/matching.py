"""Request classification: is this request for a static file?

A request is *static* -- and does no identity work eagerly -- only when Flask
itself would answer it with its own static view, or when the owner listed its
path. On the Flask side a marked request still gets the real user, session and
identity the moment any code asks (see :mod:`identity_middleware.flask_hooks`),
so a mark can only save work, never change an answer; serve mode, which
answers before Flask, relies on the mark being exact. Every doubt therefore
resolves to "not static": a missed skip costs a little speed.

How a request is decided, cheapest test first:

1. Only ``GET`` and ``HEAD``.
2. Fast reject: the raw ``PATH_INFO`` must start with one of a precomputed
   tuple of prefixes (static mounts and listed prefixes) or be one of the
   listed exact paths. A dynamic page is rejected here, in well under a
   microsecond, however many routes the app has.
3. A request carrying an ``Upgrade`` header (a websocket handshake) is never
   static: Flask matches it as a websocket request, where a static rule does
   not apply and a websocket rule under the mount may.
4. Canonical form: no ``//``, no ``.``/``..`` segments, no backslash, no NUL,
   valid UTF-8. ``PATH_INFO`` is already percent-decoded by the server and
   werkzeug does not decode it a second time, so a literal ``%2e`` is just a
   character and needs no special case.
5. A listed path (exact, or a prefix ending in ``/``) is static on the
   owner's word -- it may be a dynamic view such as ``/favicon.ico``.
6. A path under a static mount is confirmed with the URL map itself: it is
   static only if the map routes it to an endpoint whose view is Flask's own,
   unwrapped static view (:func:`is_flask_static_view`: the function Flask
   would run, not the endpoint's name). A dynamic ``/static/config.js`` rule
   that shadows the mount, a static view wrapped in ``login_required``, a
   blueprint view that happens to be named ``static``, or pages next to
   ``static_url_path=''`` therefore stay dynamic.

The answers of steps 4-6 are memoised per path. Paths are chosen by clients,
so the memos are bounded in bytes, not entries (:data:`MEMO_BYTES` each,
oldest entry out first), and a path longer than
:data:`MEMO_MAX_PATH` is decided afresh every time rather than evicting
everything else.

Host and subdomain matching: when the URL map is host-sensitive
(``host_matching=True`` or ``subdomain_matching=True``) the confirmation is
done with the adapter Flask builds for the very same environ
(``app.create_url_adapter``), so the request's host decides exactly as it
does in Flask; the memo key then includes the host fields of the environ.
A host Flask refuses (``TRUSTED_HOSTS``) is never static.

Matching is case-exact, like werkzeug's router.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from .memo import BoundedMemo

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from flask import Flask
    from werkzeug.routing import Map, MapAdapter

__all__ = [
    "Classifier",
    "Decision",
    "MEMO_BYTES",
    "MEMO_MAX_PATH",
    "PathMemo",
    "canonical_problem",
    "is_flask_static_view",
    "is_static_endpoint",
    "named_static_mounts",
    "path_adapter",
    "static_folder",
    "static_mounts",
    "text_path_problem",
]

#: Bytes each per-path memo of a classifier may hold (a classifier has three):
#: about 3,800 entries for short paths.
MEMO_BYTES = 2 * 1024 * 1024

#: Longest ``PATH_INFO`` (in characters) whose decision is memoised; longer
#: ones are decided afresh (a URL-map match, some microseconds) each time.
MEMO_MAX_PATH = 1024

#: Bytes an entry costs besides its strings: the key and value tuples, the slots
#: of the memo's dicts and its LRU order (measured by tests/test_matching.py).
MEMO_ENTRY_OVERHEAD = 400

_METHODS = frozenset({"GET", "HEAD"})


def is_static_endpoint(endpoint: str) -> bool:
    """True for Flask's static endpoints: ``static`` and ``<blueprint>.static``."""
    return endpoint == "static" or endpoint.endswith(".static")


def _flask_static_lambdas() -> frozenset[Any]:
    """The code objects of the view Flask's constructor registers for the app's static folder."""
    import inspect

    from flask import Flask

    return frozenset(c for c in Flask.__init__.__code__.co_consts if inspect.iscode(c))


def is_flask_static_view(app: Flask, endpoint: str) -> bool:
    """True when ``endpoint`` is served by Flask's own, unwrapped static view.

    The endpoint *name* proves nothing: an app may wrap the view
    (``app.view_functions["static"] = login_required(...)``) or a blueprint may
    name a dynamic view ``static``. What Flask runs is the function registered
    for the endpoint, so that is what is checked: for the app, the lambda that
    ``Flask.__init__`` registers (its code object is a constant of that
    function) with ``send_static_file`` overridden neither by an app subclass
    nor on the app instance (the lambda looks it up at every request); for
    a blueprint, ``Blueprint.send_static_file`` bound to that very blueprint.
    """
    from flask import Blueprint, Flask

    view = app.view_functions.get(endpoint)
    if view is None:
        return False
    if endpoint == "static":
        return (
            getattr(view, "__code__", None) in _flask_static_lambdas()
            and type(app).send_static_file is Flask.send_static_file
            # the lambda looks the method up on the instance at every request
            and "send_static_file" not in vars(app)
        )
    name, dot, last = endpoint.rpartition(".")
    if not dot or last != "static":
        return False
    blueprint = app.blueprints.get(name)
    return (
        blueprint is not None
        and getattr(view, "__self__", None) is blueprint
        and getattr(view, "__func__", None) is Blueprint.send_static_file
    )


def static_mounts(app: Flask) -> dict[str, str]:
    """URL prefix -> endpoint for every rule in ``app.url_map`` served by Flask's static view.

    The prefix is the rule text before its first variable, e.g.
    ``/widgets/static/`` for ``/widgets/static/<path:filename>``, or ``/`` for
    an app with ``static_url_path=''``. A rule whose endpoint is named
    ``static`` but runs another function (a wrapped view, a blueprint's
    dynamic view named ``static``) or that is a websocket rule is no mount.
    """
    return {
        prefix: endpoint
        for prefix, endpoint in named_static_mounts(app).items()
        if is_flask_static_view(app, endpoint)
    }


def named_static_mounts(app: Flask) -> dict[str, str]:
    """Like :func:`static_mounts`, but by endpoint *name*: also the rules whose static view
    was wrapped or replaced. For reports that say why such a mount is not static."""
    mounts: dict[str, str] = {}
    for rule in app.url_map.iter_rules():
        if not getattr(rule, "websocket", False) and is_static_endpoint(rule.endpoint):
            mounts.setdefault(rule.rule.split("<", 1)[0], rule.endpoint)
    return mounts


def static_folder(app: Flask, endpoint: str) -> str | None:
    """The folder a static endpoint (``static`` or ``<blueprint>.static``) serves, if any."""
    if endpoint == "static":
        return app.static_folder if app.has_static_folder else None
    blueprint = app.blueprints.get(endpoint.rpartition(".")[0])
    if blueprint is None or not blueprint.has_static_folder:
        return None
    return blueprint.static_folder


def path_adapter(app: Flask) -> MapAdapter | None:
    """A URL adapter that matches by path alone, or None when the host decides.

    Without host or subdomain matching this is what Flask's ``create_url_adapter``
    builds for any request: the host plays no part. With either, which rule answers
    depends on the request's host, so there is no host-free adapter.
    """
    url_map: Map = app.url_map
    if url_map.host_matching or app.subdomain_matching:
        return None
    return url_map.bind("identity-middleware.invalid", subdomain=url_map.default_subdomain or "")


def _to_wsgi(text: str) -> str:
    """A text path in the form WSGI servers put in ``PATH_INFO`` (UTF-8 bytes as latin-1)."""
    return text.encode("utf-8").decode("latin-1")


def _from_wsgi(path: str) -> str | None:
    """``PATH_INFO`` as werkzeug routes it, or None when it is not valid UTF-8."""
    try:
        return path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


def canonical_problem(path: str) -> str | None:
    """Why ``path`` is not canonical, or None when it is."""
    if not path.startswith("/"):
        return "does not start with '/'"
    if "//" in path:
        return "contains '//'"
    if "\\" in path:
        return "contains a backslash"
    if "\x00" in path:
        return "contains a NUL byte"
    if "/." in path:
        segments = path.split("/")
        if "." in segments:
            return "contains a '.' segment"
        if ".." in segments:
            return "contains a '..' segment"
    if _from_wsgi(path) is None:
        return "is not valid UTF-8"
    return None


def text_path_problem(path: str) -> str | None:
    """Why a path written as text (a setting, a CLI argument) is not canonical, or None."""
    try:
        return canonical_problem(_to_wsgi(path))
    except UnicodeEncodeError:  # a lone surrogate: no server could send it
        return "is not valid UTF-8"


@dataclass(frozen=True)
class Decision:
    """Why a request is or is not static; what ``flask identity check`` prints."""

    path: str
    method: str
    marked: bool
    reason: str
    mount: str | None = None  # the static mount prefix the path lies under
    listed: str | None = None  # the listed exact path or prefix that matched
    endpoint: str | None = None  # the endpoint the URL map routes the path to
    rule: str | None = None  # that rule's text (the shadowing rule when not static)


_Result = TypeVar("_Result")


def _strings_bytes(values: Iterable[Any]) -> int:
    return sum(sys.getsizeof(v) for v in values if isinstance(v, str))


class PathMemo(BoundedMemo[_Result]):
    """A thread-safe memo of ``function(path, *rest)``, bounded in bytes (:class:`BoundedMemo`).

    The first argument is a client-chosen path, so an entry is charged for the
    strings in its key and its value plus :data:`MEMO_ENTRY_OVERHEAD`, and the
    memo holds at most ``max_bytes`` of them; the oldest entries go first. A
    path longer than ``max_path`` is never stored: one huge path would otherwise
    evict hundreds of ordinary ones. The function runs outside the lock; two
    threads missing at once both compute, which is harmless for a pure function.
    """

    __slots__ = ("_function", "_max_path")

    def __init__(
        self,
        function: Callable[..., _Result],
        *,
        max_bytes: int | None = None,
        max_path: int | None = None,
    ) -> None:
        super().__init__(MEMO_BYTES if max_bytes is None else max_bytes)
        self._function = function
        self._max_path = MEMO_MAX_PATH if max_path is None else max_path

    def __call__(self, path: str, *rest: Any) -> _Result:
        key = (path, *rest)
        hit = self._find(key)
        if hit is not None:
            return hit[1]
        result = self._function(path, *rest)
        if len(path) <= self._max_path:
            value = result if isinstance(result, tuple) else (result,)
            self._store(key, MEMO_ENTRY_OVERHEAD + _strings_bytes(key) + _strings_bytes(value), result)
        return result


class Classifier:
    """Decides, per request, whether it is static.

    Built from a Flask app (its URL map's static mounts) and/or the owner's
    listed paths. Build a new one when routes change; instances are
    immutable apart from the confirmation cache and safe to share between
    threads.

    :param app: the Flask app whose URL map defines the static mounts, or
        None to use the listed paths only.
    :param listed: exact paths and prefixes ending in ``/`` that are static
        on the owner's word.
    :param host_as_seen: False when a middleware between the classifier and
        Flask may change the request's host (``ProxyFix(x_host=...)``): then a
        host- or subdomain-matching URL map confirms no mount, because the
        host seen here need not be the one Flask routes on.
    """

    __slots__ = (
        "app",
        "listed",
        "mounts",
        "_exact",
        "_listed_prefixes",
        "_mount_prefixes",
        "_prefixes",
        "_host_sensitive",
        "_host_as_seen",
        "_adapter",
        "_confirm",
        "_confirm_host",
        "_marked",
        "_memos",
    )

    def __init__(self, app: Flask | None = None, listed: Iterable[str] = (), *, host_as_seen: bool = True) -> None:
        self.app = app
        self._host_as_seen = host_as_seen
        self.listed = tuple(dict.fromkeys(listed))
        self.mounts: Mapping[str, str] = static_mounts(app) if app is not None else {}
        self._exact = frozenset(_to_wsgi(p) for p in self.listed if not p.endswith("/"))
        self._listed_prefixes = tuple(_to_wsgi(p) for p in self.listed if p.endswith("/"))
        self._mount_prefixes = tuple(_to_wsgi(p) for p in self.mounts)
        self._prefixes = self._listed_prefixes + self._mount_prefixes
        self._host_sensitive = False
        self._adapter: MapAdapter | None = None
        if app is not None and self.mounts:
            self._adapter = path_adapter(app)
            self._host_sensitive = self._adapter is None
        # Per-instance memos, so a rebuilt classifier starts empty.
        self._confirm = PathMemo(self._route)
        self._confirm_host = PathMemo(self._route_host)
        # Without host matching a decision depends on (path, method) alone, so the
        # hot path remembers the whole answer, not just the URL-map part.
        self._marked = PathMemo(self._marked_uncached)
        self._memos = (self._marked, self._confirm, self._confirm_host)

    # -- hot path --------------------------------------------------------------------

    def classify(self, environ: WSGIEnvironment) -> bool:
        """True when the request in ``environ`` is static. Called on every request."""
        method = environ.get("REQUEST_METHOD")
        if method != "GET" and method != "HEAD":
            return False
        path = environ.get("PATH_INFO") or ""
        if path not in self._exact and not path.startswith(self._prefixes):
            return False
        if "HTTP_UPGRADE" in environ:  # a websocket handshake: Flask matches websocket rules
            return False
        if self._host_sensitive:
            return self._decide(path, method, environ).marked
        return self._marked(path, method)

    def _marked_uncached(self, path: str, method: str) -> bool:
        return self._decide(path, method, None).marked

    # -- decisions -------------------------------------------------------------------

    def explain(
        self,
        path: str,
        method: str = "GET",
        *,
        host: str | None = None,
        environ: WSGIEnvironment | None = None,
    ) -> Decision:
        """The full decision for a text ``path`` (as a user types it) and ``method``.

        ``host`` (or a full ``environ``) only matters for host-sensitive URL maps.
        """
        method = method.upper()
        if environ is None and host is not None:
            environ = {"HTTP_HOST": host, "SERVER_NAME": host, "SERVER_PORT": "80"}
        if method not in _METHODS:
            return Decision(path, method, False, f"method {method} is never static")
        wsgi_path = _to_wsgi(path)
        if wsgi_path not in self._exact and not wsgi_path.startswith(self._prefixes):
            return Decision(path, method, False, "not under a static mount or a listed path")
        if environ is not None and "HTTP_UPGRADE" in environ:
            return Decision(path, method, False, "an Upgrade (websocket) request is never static")
        decision = self._decide(wsgi_path, method, environ)
        return Decision(
            path,
            method,
            decision.marked,
            decision.reason,
            decision.mount,
            decision.listed,
            decision.endpoint,
            decision.rule,
        )

    def _decide(self, path: str, method: str, environ: WSGIEnvironment | None) -> Decision:
        problem = canonical_problem(path)
        if problem is not None:
            return Decision(path, method, False, f"not canonical: the path {problem}")
        if path in self._exact:
            return Decision(path, method, True, "listed path", listed=_text(path))
        for prefix in self._listed_prefixes:
            if path.startswith(prefix):
                return Decision(path, method, True, "under a listed prefix", listed=_text(prefix))
        for prefix in self._mount_prefixes:
            if path.startswith(prefix):
                mount = _text(prefix)
                break
        else:  # pragma: no cover - the fast reject already checked the prefixes
            return Decision(path, method, False, "not under a static mount or a listed path")
        marked, reason, endpoint, rule = self._confirmed(path, method, environ)
        return Decision(path, method, marked, reason, mount=mount, endpoint=endpoint, rule=rule)

    def _confirmed(
        self, path: str, method: str, environ: WSGIEnvironment | None
    ) -> tuple[bool, str, str | None, str | None]:
        if not self._host_sensitive:
            return self._confirm(path, method)
        if environ is None:
            return (False, "the URL map matches hosts and no request host is known", None, None)
        if not self._host_as_seen:
            return (
                False,
                "the URL map matches hosts and a middleware inside IdentityMiddleware may change the host",
                None,
                None,
            )
        # Only these fields of the environ take part in host matching, so they
        # (not the environ, which holds the request body) are the cache key.
        return self._confirm_host(
            path,
            method,
            environ.get("HTTP_HOST"),
            environ.get("SERVER_NAME"),
            environ.get("SERVER_PORT"),
            environ.get("wsgi.url_scheme", "http"),
        )

    # -- URL-map confirmation (cached) ---------------------------------------------

    def _route(self, path: str, method: str) -> tuple[bool, str, str | None, str | None]:
        assert self._adapter is not None and self.app is not None
        return _match(self.app, self._adapter, path, method)

    def _route_host(
        self,
        path: str,
        method: str,
        http_host: str | None,
        server_name: str | None,
        server_port: str | None,
        url_scheme: str,
    ) -> tuple[bool, str, str | None, str | None]:
        app = self.app
        assert app is not None
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "SERVER_NAME": server_name or "",
            "SERVER_PORT": server_port or "",
            "wsgi.url_scheme": url_scheme,
        }
        if http_host is not None:
            environ["HTTP_HOST"] = http_host
        try:
            adapter = app.create_url_adapter(app.request_class(environ))
        except Exception as exc:  # an untrusted host: Flask answers 400 itself
            return (False, f"Flask refuses the request host ({exc.__class__.__name__})", None, None)
        if adapter is None:  # pragma: no cover - only without a request
            return (False, "no URL adapter for this request", None, None)
        return _match(app, adapter, path, method)

    def memo_bytes(self) -> int:
        """Bytes the per-path memos account for now (each is bounded by :data:`MEMO_BYTES`)."""
        return sum(memo.currsize for memo in self._memos)


def _text(wsgi_path: str) -> str:
    return _from_wsgi(wsgi_path) or wsgi_path


def _match(app: Flask, adapter: MapAdapter, path: str, method: str) -> tuple[bool, str, str | None, str | None]:
    text = _from_wsgi(path)
    if text is None:  # pragma: no cover - canonical_problem rejects it first
        return (False, "not valid UTF-8", None, None)
    try:
        rule, _ = adapter.match(text, method, return_rule=True)
    except RequestRedirect as exc:
        return (False, f"the URL map redirects it to {exc.new_url}", None, None)
    except HTTPException as exc:
        return (False, f"the URL map answers {exc.code} for it", None, None)
    if is_flask_static_view(app, rule.endpoint):
        return (True, f"routed to static endpoint {rule.endpoint!r}", rule.endpoint, rule.rule)
    if is_static_endpoint(rule.endpoint):
        return (
            False,
            f"endpoint {rule.endpoint!r} does not run Flask's own static view",
            rule.endpoint,
            rule.rule,
        )
    return (
        False,
        f"shadowed by rule {rule.rule!r} (endpoint {rule.endpoint!r})",
        rule.endpoint,
        rule.rule,
    )
