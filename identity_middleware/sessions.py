"""Signed-cookie sessions: verify a cookie once, and re-sign it only when it changed.

Flask's default session interface (``SecureCookieSessionInterface``) verifies
and decodes the session cookie on every request and signs and sends it again
whenever the session is marked modified. Flask-Principal's session saver marks
it modified on *every* request -- it stores the identity it just loaded from
that very session -- so a logged-in request pays an HMAC check, a JSON decode,
a JSON encode, an HMAC signature and a ``Set-Cookie`` header for a session that
did not change (about 80 us of a 400 us API request on the benchmark machine).

:func:`install` wraps the app's interface in :class:`CachedCookieSessionInterface`,
which does the same job with less work:

* **No write for an unchanged session.** When Flask would write the cookie, but
  the session holds exactly what the cookie held -- same keys in the same
  order, same values of the same types, so the new cookie would carry the same
  payload -- nothing is signed and no ``Set-Cookie`` is sent. ``Vary: Cookie``
  is added exactly as Flask would have added it (a write adds it).
* **When a cookie is still re-signed.** The signed timestamp is what
  ``PERMANENT_SESSION_LIFETIME`` is checked against when the cookie comes back
  (for permanent *and* browser sessions), and for a permanent session the
  cookie's ``Expires`` is set from it. So an unchanged session is still written
  whenever Flask would have written it and its signature is older than
  1/:data:`REFRESH_FRACTION` of the lifetime (about 11.6 hours at Flask's
  31-day default; at least one second). A user who is active keeps a valid
  session as before; an idle session expires between 63/64 of the lifetime and
  the full lifetime after its last request, instead of exactly at the lifetime.
  A permanent session with ``SESSION_REFRESH_EACH_REQUEST`` (Flask's default)
  is written on every request, as Flask does: that is what the setting asks for.
  And a write also restates the cookie's attributes (name, domain, path,
  ``Secure``, ``HttpOnly``, ``SameSite``, ``Partitioned``, the lifetime behind
  ``Expires``): a cookie signed before this process first saved a session, or
  before those settings last changed in it, is written once more, so changed
  settings reach the browser as soon as Flask would have sent them. (During a
  rolling deploy, a cookie another process signed later with older settings
  keeps them until its next refresh.)
* **Verified decodes are cached**, keyed by the exact cookie string, in a
  cache bounded in bytes (cookies are chosen by the client; each entry is
  charged its cookie, an estimate of its decoded data and a fixed overhead,
  and cookies longer than :data:`MAX_COOKIE_CHARS` are never cached). A verified
  cookie is also cached under the exact ``Cookie`` header it came in, so a
  browser sending the same header again is answered without parsing its
  cookies (werkzeug's parsing is the costliest step left); a header not seen
  before -- another cookie changed -- is parsed as usual. Only a
  cookie the signer accepted is stored; the age is checked against the current
  lifetime on every use, exactly as the signer checks it; a change of
  ``SECRET_KEY``, ``SECRET_KEY_FALLBACKS``, salt, digest, key derivation or
  serializer empties the cache. Every request gets a new session object whose
  nested dicts and lists are its own (and a session class of the app's own is
  given a dict of its own: it may keep or change it). Data holding types other than those
  Flask's tagged JSON produces (an app's own serializer tags) is neither
  cached nor spared a write: Flask handles it as usual.

Only interfaces whose behaviour we know are wrapped: ``SecureCookieSessionInterface``
and subclasses that keep its ``open_session``, ``save_session``,
``get_signing_serializer`` and ``should_set_cookie`` and Flask's tagged JSON
serializer (they may change the salt, the digest, the session class, the cookie
name and other settings, which are read on every request; tags an app
registers on the serializer are fine). Anything else -- Flask-Session, a custom store --
is left alone; so is everything when Flask's own methods no longer have the
shape this module mirrors (checked when installing). Leaving an interface alone
only costs speed.

The wrapper delegates every attribute to the interface it wraps (reachable as
``__wrapped__``), so other wrappers -- the static-request one in
:mod:`identity_middleware.flask_hooks` -- can wrap it in turn. Install it
first: an unknown wrapper around Flask's interface hides it, and :func:`install`
then leaves the app alone.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, NamedTuple
from weakref import ref

from cachetools import LRUCache
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionInterface
from itsdangerous import BadSignature
from markupsafe import Markup
from werkzeug.datastructures import EnvironHeaders
from werkzeug.sansio.request import Request as _SansIORequest

if TYPE_CHECKING:
    from flask import Flask, Request, Response
    from flask.sessions import SessionMixin

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_COOKIE_CHARS",
    "REFRESH_FRACTION",
    "CachedCookieSessionInterface",
    "SessionStats",
    "WrappingSessionInterface",
    "find",
    "install",
    "unsupported",
]

log = logging.getLogger(__name__)

#: An unchanged cookie is re-signed once its signature is older than lifetime / this.
REFRESH_FRACTION = 64

#: Longer cookies are decoded every time, never cached (browsers keep at most ~4 KB).
MAX_COOKIE_CHARS = 4096

#: Longer Cookie headers are parsed every time, never cached (servers reject ~8 KB).
MAX_HEADER_CHARS = 8192

#: werkzeug's own ``Request.cookies``, which a cached Cookie header answers for.
_WERKZEUG_COOKIES = vars(_SansIORequest)["cookies"]

#: Flask's own session constructor: it copies the dict it is given (``dict.__init__``)
#: and never keeps or changes it, so a decode's top-level dict may be handed to it.
_FLASK_SESSION_INIT = SecureCookieSession.__init__

#: Default byte budget of one app's decode cache.
DEFAULT_MAX_BYTES = 4 * 1024 * 1024

#: Bytes charged per entry on top of the cookie and the data (objects, the LRU links).
#: ``tests/test_sessions.py`` measures that this over-estimates real memory (CPython 3.10's
#: objects are larger than 3.11's: 600 sufficed on 3.11, not on 3.10).
_ENTRY_OVERHEAD = 800

#: Bytes charged per container or value inside the decoded data.
_NODE_OVERHEAD = 80

#: Types whose equal values (of the same exact type) serialize alike.
_EQUAL_IS_SAME = frozenset({str, int, bool, type(None)})

#: Immutable leaf types Flask's tagged JSON serializer produces.
_LEAVES = frozenset({str, int, float, bool, type(None), bytes, Markup, uuid.UUID, datetime.datetime})

#: The names Flask's own methods must still use for this module to mirror them.
_FLASK_SHAPE = {
    "open_session": ("get_signing_serializer", "get_cookie_name", "permanent_session_lifetime", "loads",
                     "session_class", "BadSignature"),
    "save_session": ("should_set_cookie", "vary", "set_cookie", "delete_cookie", "modified", "dumps"),
    "should_set_cookie": ("modified", "permanent", "SESSION_REFRESH_EACH_REQUEST"),
    # SECRET_KEY_FALLBACKS (Flask >= 3.1) is not required: the cache key always includes
    # it, so with a Flask that ignores it the key is merely wider than the signer's.
    "get_signing_serializer": ("secret_key", "salt", "serializer", "key_derivation", "digest_method"),
}  # fmt: skip


class SessionStats(NamedTuple):
    """Counters of one wrapper (approximate under threads: plain increments)."""

    hits: int  # cookies answered from the decode cache
    misses: int  # cookies verified by the signer (then cached if they passed)
    rejected: int  # cookies the signer refused (tampered, expired, unknown key)
    writes_skipped: int  # writes Flask would have made for an unchanged session
    writes: int  # saves handed to the wrapped interface
    size: int  # entries in the decode cache (verified cookies, and the Cookie headers they came in)
    bytes: int  # bytes charged to the decode cache


class _Decoded:
    """One verified cookie: its data (never handed out), signing time and charge."""

    __slots__ = ("data", "flat", "size", "timestamp", "types")

    def __init__(self, data: dict[str, Any], timestamp: int, size: int) -> None:
        self.data = data
        self.timestamp = timestamp
        self.size = size
        #: Only immutable values at the top: the session class's own copy is enough.
        self.flat = all(type(item) in _LEAVES for item in data.values())
        #: The exact types of the keys, then of the values, when every value is of a type
        #: whose equal values serialize alike (see :meth:`same_as`); else None.
        self.types = (
            [*map(type, data), *map(type, data.values())]
            if all(type(item) in _EQUAL_IS_SAME for item in data.values())
            else None
        )

    def fresh(self, max_age: int) -> bool:
        """The signer's own age test, to the second, with the lifetime as it is now."""
        return 0 <= int(time.time()) - self.timestamp <= max_age

    def same_as(self, new: dict[str, Any]) -> bool:
        """``_same(self.data, new)``, in C-level steps for the usual session of strings and numbers.

        With the same keys in the same order and the same exact types, ``==``
        is ``_same`` for these types (``1 == True`` and ``"a" == Markup("a")``
        differ in type; floats, whose ``-0.0 == 0.0``, are not among them).
        """
        types = self.types
        if types is None:
            return _same(self.data, new)
        old = self.data
        return old == new and list(old) == list(new) and [*map(type, new), *map(type, new.values())] == types


class _Alias:
    """A Cookie header a verified cookie came in, standing for that cookie.

    Charged in full (header and data): the cookie's own entry may be evicted
    first, and this one then keeps the data alive.
    """

    __slots__ = ("decoded", "size")

    def __init__(self, decoded: _Decoded, header: tuple[type, str, str]) -> None:
        self.decoded = decoded
        self.size = decoded.size + len(header[2])


# -- what a decoded value is, and copies of it ------------------------------------------


def _plain_size(value: Any, depth: int = 0) -> int | None:
    """Estimated bytes of JSON-like ``value``, or None if it holds another type."""
    kind = type(value)
    if kind in _LEAVES:
        return _NODE_OVERHEAD + (len(value) if kind is str or kind is bytes or kind is Markup else 0)
    if depth > 64:
        return None
    if kind is dict:
        total = _NODE_OVERHEAD
        for key, item in value.items():
            if type(key) is not str:
                return None
            size = _plain_size(item, depth + 1)
            if size is None:
                return None
            total += size + len(key) + _NODE_OVERHEAD
        return total
    if kind is list or kind is tuple:
        total = _NODE_OVERHEAD
        for item in value:
            size = _plain_size(item, depth + 1)
            if size is None:
                return None
            total += size
        return total
    return None


def _copy(value: Any) -> Any:
    """A copy of plain ``value`` whose dicts and lists are new (leaves are immutable)."""
    kind = type(value)
    if kind is dict:
        return {key: _copy(item) for key, item in value.items()}
    if kind is list:
        return [_copy(item) for item in value]
    if kind is tuple:
        return tuple(_copy(item) for item in value)
    return value


def _same(old: Any, new: Any) -> bool:
    """True only if ``new`` would serialize exactly as ``old`` does: same types, order, values.

    Stricter than ``==`` (``1 == True == 1.0`` and ``"a" == Markup("a")`` are
    different cookies), so a False here sometimes means an unneeded write, never
    a skipped one.
    """
    kind = type(old)
    if kind is not type(new):
        return False
    if kind is dict:
        if len(old) != len(new):
            return False
        for (old_key, old_item), (new_key, new_item) in zip(old.items(), new.items(), strict=True):
            if type(new_key) is not str or old_key != new_key or not _same(old_item, new_item):
                return False
        return True
    if kind is list or kind is tuple:
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new, strict=True))
    if kind is float:
        return bool(old.hex() == new.hex())  # -0.0 == 0.0, but they are different JSON
    if kind is datetime.datetime:
        return bool(old == new and old.utcoffset() == new.utcoffset())
    return kind in _LEAVES and bool(old == new)


# -- which interfaces we wrap ------------------------------------------------------------


def _names_in(function: Any) -> frozenset[str]:
    code = getattr(function, "__code__", None)
    if code is None:
        return frozenset()
    return frozenset(code.co_names) | frozenset(c for c in code.co_consts if isinstance(c, str))


def _flask_problem() -> str | None:
    """Why Flask's signed-cookie interface no longer looks like the one this module mirrors."""
    for method, names in _FLASK_SHAPE.items():
        missing = set(names) - _names_in(getattr(SecureCookieSessionInterface, method, None))
        if missing:
            return f"SecureCookieSessionInterface.{method} no longer uses {', '.join(sorted(missing))}"
    import inspect

    from itsdangerous import URLSafeTimedSerializer

    if "return_timestamp" not in inspect.signature(URLSafeTimedSerializer.loads).parameters:
        return "itsdangerous' URLSafeTimedSerializer.loads has no return_timestamp"
    return None


def unsupported(interface: object) -> str | None:
    """Why ``interface`` is left alone by :func:`install`, or None if it can be wrapped."""
    if not isinstance(interface, SecureCookieSessionInterface):
        return f"{type(interface).__qualname__} is not a SecureCookieSessionInterface"
    for method in _FLASK_SHAPE:
        if method in vars(interface) or getattr(type(interface), method) is not getattr(
            SecureCookieSessionInterface, method
        ):
            return f"{type(interface).__qualname__} overrides {method}"
    if not isinstance(interface.serializer, TaggedJSONSerializer):
        return f"its serializer is a {type(interface.serializer).__qualname__}, not Flask's tagged JSON"
    return _flask_problem()


def _layers(interface: object) -> list[object]:
    """``interface`` and every interface it wraps, outermost first."""
    found = [interface]
    while len(found) < 16:
        inner = getattr(found[-1], "__wrapped__", None)
        if inner is None or any(inner is seen for seen in found):
            break
        found.append(inner)
    return found


def find(app: Flask) -> CachedCookieSessionInterface | None:
    """The wrapper installed on ``app``, also beneath other wrappers, or None."""
    for layer in _layers(app.session_interface):
        if isinstance(layer, CachedCookieSessionInterface):
            return layer
    return None


def install(app: Flask, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Wrap ``app.session_interface`` if it is one we know; True when the app has the wrapper.

    Idempotent: an app whose interface already is, or wraps, a
    :class:`CachedCookieSessionInterface` is left as it is. Call it before other
    wrappers wrap the interface (an unknown outer wrapper hides the interface
    and the app is left alone).
    """
    if find(app) is not None:
        return True
    problem = unsupported(app.session_interface)
    if problem is not None:
        log.info("session cookies are handled by Flask as usual: %s", problem)
        return False
    app.session_interface = CachedCookieSessionInterface(app.session_interface, max_bytes=max_bytes)
    return True


# -- the wrapper -------------------------------------------------------------------------


class WrappingSessionInterface(SessionInterface):
    """Base of our session-interface wrappers: everything not overridden is the wrapped one's.

    Every attribute -- ``null_session_class``, the cookie settings, a Flask-Session
    interface's ``client`` -- is read from and written to the wrapped interface,
    which stays reachable as ``__wrapped__`` (it may itself be a wrapper). An
    ``isinstance`` test against the wrapped interface's own class does not see
    through a wrapper.
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


def _delegated(name: str) -> property:
    def get(self: WrappingSessionInterface) -> Any:
        return getattr(self.__wrapped__, name)

    return property(get, doc=f"The wrapped interface's ``{name}``.")


# SessionInterface's own attributes would shadow __getattr__: forward each of them too.
# Subclasses override the methods they implement; the rest stay the wrapped interface's.
for _name in vars(SessionInterface):
    if not _name.startswith("__"):
        setattr(WrappingSessionInterface, _name, _delegated(_name))
del _name


class CachedCookieSessionInterface(WrappingSessionInterface):
    """A signed-cookie session interface that skips unchanged writes and repeated checks.

    ``wrapped`` is a ``SecureCookieSessionInterface`` (see :func:`unsupported`);
    every attribute other than the methods below is read from and written to it,
    and it stays reachable as ``__wrapped__``. ``max_bytes`` bounds the decode
    cache. ``stats()`` returns :class:`SessionStats`.

    Thread-safe: the decode cache is guarded by a lock that is never held while
    a cookie is verified; sessions of concurrent requests are separate objects.
    """

    __slots__ = ("_attributes", "_cache", "_counts", "_keys", "_loaded", "_lock", "_since")

    def __init__(self, wrapped: SessionInterface, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, not {max_bytes!r}")
        super().__init__(wrapped)
        set_ = object.__setattr__
        set_(self, "_cache", LRUCache(maxsize=max_bytes, getsizeof=_charge))
        set_(self, "_lock", threading.Lock())
        set_(self, "_keys", None)  # what the cached entries were verified with
        set_(self, "_loaded", {})  # id(session) -> (weakref, _Decoded) for sessions we opened
        set_(self, "_counts", [0, 0, 0, 0, 0])  # hits, misses, rejected, skipped, writes
        set_(self, "_attributes", None)  # the cookie attributes a write sent when last asked
        set_(self, "_since", 0)  # cookies signed up to this second are written again

    def stats(self) -> SessionStats:
        with self._lock:
            size, charged = len(self._cache), int(self._cache.currsize)
        hits, misses, rejected, skipped, writes = self._counts
        return SessionStats(hits, misses, rejected, skipped, writes, size, charged)

    def clear(self) -> None:
        """Forget every cached decode (they are verified again on their next use)."""
        with self._lock:
            self._cache.clear()

    # -- open -----------------------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        """Flask's ``open_session``, answered from the decode cache when the cookie was verified before."""
        inner: Any = self.__wrapped__
        if not app.secret_key or not isinstance(inner.serializer, TaggedJSONSerializer):
            # No key: Flask's null session. Another serializer (set after install) may not
            # encode equal values alike: Flask decodes it, and without a baseline it is saved as usual.
            return inner.open_session(app, request)  # type: ignore[no-any-return]
        name = inner.get_cookie_name(app)
        max_age = int(app.permanent_session_lifetime.total_seconds())
        keys = self._signing_keys(app, inner)
        header = self._header_key(request, name)
        if header is not None:
            alias = self._cached(header, keys)
            if alias is not None and alias.decoded.fresh(max_age):
                self._counts[0] += 1
                return self._session(inner, alias.decoded)
        value = request.cookies.get(name)
        if not value:
            return inner.session_class()  # type: ignore[no-any-return]
        decoded = self._cached(value, keys)
        if decoded is not None and decoded.fresh(max_age):
            self._counts[0] += 1
            if header is not None:
                self._store(header, keys, _Alias(decoded, header))
            return self._session(inner, decoded)
        self._counts[1] += 1
        try:
            data, signed = inner.get_signing_serializer(app).loads(value, max_age=max_age, return_timestamp=True)
        except BadSignature:
            self._counts[2] += 1
            return inner.session_class()  # type: ignore[no-any-return]
        size = _plain_size(data) if type(data) is dict else None
        if size is None:  # an app's own serializer tags: no copy we trust, so no baseline
            return inner.session_class(data)  # type: ignore[no-any-return]
        decoded = _Decoded(data, int(signed.timestamp()), _ENTRY_OVERHEAD + len(value) + size)
        if len(value) <= MAX_COOKIE_CHARS:
            self._store(value, keys, decoded)
            if header is not None:
                self._store(header, keys, _Alias(decoded, header))
        return self._session(inner, decoded)

    @staticmethod
    def _header_key(request: Request, name: str) -> tuple[type, str, str] | None:
        """The cache key of the request's Cookie header, or None when it cannot stand for the cookie.

        Finding the session cookie means parsing every cookie of the request
        (about 10 us, the most expensive step of opening a cached session). A
        browser sends the same header again and again, so a verified cookie is
        also cached under the exact header it came in: a header seen before
        answers without parsing. Only for werkzeug's own parsing of the
        environ's ``HTTP_COOKIE`` (what ``request.headers`` reads); a request
        class that finds cookies its own way is parsed every time.
        """
        headers = request.headers
        if (
            type(request).cookies is not _WERKZEUG_COOKIES
            or type(headers) is not EnvironHeaders
            or "cookies" in request.__dict__
        ):
            return None
        header = headers.environ.get("HTTP_COOKIE")
        if header is None or len(header) > MAX_HEADER_CHARS:
            return None
        return (type(request), name, header)

    @staticmethod
    def _signing_keys(app: Flask, inner: Any) -> tuple[Any, ...]:
        fallbacks = app.config.get("SECRET_KEY_FALLBACKS")
        return (
            app,
            app.secret_key,
            tuple(fallbacks) if fallbacks else (),
            inner.salt,
            inner.digest_method,
            inner.key_derivation,
            inner.serializer,
        )

    def _cached(self, key: Hashable, keys: tuple[Any, ...]) -> Any:
        """The entry cached under ``key`` (a cookie's value, or a header: an alias), if any."""
        with self._lock:
            if keys != self._keys:
                if self._keys is not None:
                    self._cache.clear()
                return None
            return self._cache.get(key)

    def _store(self, key: Hashable, keys: tuple[Any, ...], entry: _Decoded | _Alias) -> None:
        with self._lock:
            if keys != self._keys:
                self._cache.clear()
                object.__setattr__(self, "_keys", keys)
            if entry.size <= self._cache.maxsize:
                self._cache[key] = entry

    def _session(self, inner: Any, decoded: _Decoded) -> SessionMixin:
        data = decoded.data
        session_class = inner.session_class
        if decoded.flat and session_class.__init__ is _FLASK_SESSION_INIT:
            session = session_class(data)  # copied by the constructor: the cache's dict stays untouched
        else:  # nested values, or an app's own constructor, which may keep or change what it is given
            session = session_class(_copy(data))
        key = id(session)
        loaded = self._loaded

        def forget(_: object) -> None:  # the session died without being saved (an error)
            loaded.pop(key, None)

        loaded[key] = (ref(session, forget), decoded)
        return session  # type: ignore[no-any-return]

    # -- save -----------------------------------------------------------------------

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Flask's ``save_session``, except that an unchanged, recently signed session is not re-signed."""
        entry = self._loaded.pop(id(session), None)
        if session.modified:  # Flask may write: note the attributes a write sends now
            attributes_since = self._attributes_since(app, int(time.time()))
            if entry is not None and entry[0]() is session and self._unchanged(app, session, entry[1], attributes_since):
                self._counts[3] += 1
                # As the write would have. Parsing and rewriting Vary through response.vary
                # costs ~10 us; with no Vary yet, the result is the same header, appended.
                # (getlist, not ``in``: werkzeug's __contains__ raises and catches a KeyError
                # when the header is absent, the usual case, ~1 us.)
                headers = response.headers
                if headers.getlist("Vary"):
                    response.vary.add("Cookie")
                else:
                    headers.add("Vary", "Cookie")
                return
        self._counts[4] += 1
        self.__wrapped__.save_session(app, session, response)

    def _unchanged(self, app: Flask, session: SessionMixin, decoded: _Decoded, attributes_since: int) -> bool:
        """Flask would write only to restate what the cookie holds, and the cookie is fresh enough."""
        if not session:
            return False  # Flask deletes the cookie: let it
        if session.permanent:
            if app.config["SESSION_REFRESH_EACH_REQUEST"]:
                return False  # a refresh on every request is what the app asked for
            if type(self.__wrapped__).get_expiration_time is not SessionInterface.get_expiration_time:
                return False  # an Expires we cannot reason about
        if decoded.timestamp <= attributes_since:
            return False  # the browser's cookie may carry other attributes than a write would send
        lifetime = int(app.permanent_session_lifetime.total_seconds())
        if int(time.time()) - decoded.timestamp >= max(1, lifetime // REFRESH_FRACTION):
            return False
        return decoded.same_as(dict(session))

    def _attributes_since(self, app: Flask, now: int) -> int:
        """The last second in which the cookie's attributes may have differed from what a write sends now.

        A write sends the name, domain, path, flags and (for a permanent session)
        an Expires derived from the lifetime. A cookie signed before this process
        first saved a session, or before those settings last changed, may carry
        others, so it is written once; cookies signed since carry these.
        """
        inner: Any = self.__wrapped__
        partitioned = getattr(inner, "get_cookie_partitioned", None)  # Flask >= 3.1
        attributes = (
            inner.get_cookie_name(app),
            inner.get_cookie_domain(app),
            inner.get_cookie_path(app),
            inner.get_cookie_secure(app),
            partitioned(app) if partitioned is not None else None,
            inner.get_cookie_samesite(app),
            inner.get_cookie_httponly(app),
            app.permanent_session_lifetime,
        )
        if attributes != self._attributes:
            object.__setattr__(self, "_since", now if self._attributes is not None else now - 1)
            object.__setattr__(self, "_attributes", attributes)
        return self._since  # type: ignore[no-any-return]


def _charge(entry: _Decoded | _Alias) -> int:
    return entry.size


# SessionInterface's own attributes would shadow __getattr__: forward each of them too.
