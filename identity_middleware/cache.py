"""The user cache: Flask-Login's ``user_loader`` answered from memory, safely.

Without it every dynamic request runs the user query and the roles query. The
usual fixes each break something: a dict grows without bound and serves
revoked roles forever; ``cachetools.cached(lock=...)`` lets 32 concurrent cold
requests run 32 loads and lets a load that was in flight when someone called
``invalidate`` store its stale result afterwards; Flask-Caching pickles the user
on every hit. :class:`UserCache` is bounded (LRU), expires entries (TTL, with a
shorter TTL for "no such user"), runs one load per user at a time, never caches
exceptions, and checks a *version stamp* on every hit, so ``invalidate(user_id)``
takes effect for the very next request -- in every process when the stamps live
in Redis (:mod:`identity_middleware.redis_versions`).

How a stale load cannot win: the stamp is read *before* the loader starts and
stored with the result. An invalidation that lands while the load runs bumps the
stamp, so the stored entry is stale the moment it is stored.

The store rule: **a load is stored only under a stamp that is certainly not newer
than the data it read.** Reading the stamp first is enough for a loader that reads
the database as it is *now* (its own connection, a fresh transaction). A loader that
reads through the request's session may see older data -- a REPEATABLE READ snapshot
taken at the request's first query, or a row the session already holds, which comes
back without SQL -- so an adapter can veto the store: :class:`CacheAdapter`'s optional
``begin_load``/``storable`` pair (the SQLAlchemy binding uses it). A vetoed load is
handed to the caller that ran it and to nobody else (callers waiting for it load
again) and logged at DEBUG. A loader that returns a SQLAlchemy-mapped instance with no
adapter set is refused with an error that names ``bind_sqlalchemy``: such an object
cannot be shared between requests, and the cache cannot tell how old its rows are.

Threads: the hit path takes no lock. It does a handful of single C-level
operations on an ``OrderedDict`` (``get``, ``move_to_end``), each atomic under the
GIL, and the writers (under ``self._lock``) also change that dict only with
single C-level calls (``__setitem__``, ``__delitem__``, ``popitem``) -- never an
iterator that a concurrent ``move_to_end`` could invalidate. That is why the LRU
bookkeeping is ours and not ``cachetools.LRUCache``: its ``popitem`` iterates
the order dict, so every reader would have to hold the lock, and measured on
CPython 3.11 an ``LRUCache.get`` under a lock costs about 330 ns where our two
unlocked calls cost about 45 ns -- the whole hit is about 320 ns, 0.4x a
cachetools locked ``@cached`` hit (benchmarks/cache_hit.py); with LRUCache it
would be about 0.8x.
Counters touched on the hit path are ``itertools.count`` objects, whose
``next()`` is one atomic C call, so no hit is lost from the stats. On a
free-threaded interpreter (no GIL) the hit path takes the lock instead.

When *not* to rely on it alone: if users or roles change behind the app's back
(another program writes the tables) and nothing calls ``invalidate``, a cached
user stays as it was for up to ``ttl`` seconds. Keep ``ttl`` short there, or set
it to ``0``: the loader then runs every time and the stats still count.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import sys
import threading
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, NamedTuple, Protocol, TypeVar, cast, overload

from .config import ConfigError, Resolved, redacted, resolve
from .memo import GIL
from .versions import LocalVersionStore, VersionStore

if TYPE_CHECKING:
    from flask import Flask
    from flask.ctx import AppContext
    from flask_login import LoginManager

__all__ = ["UserCache", "CacheStats", "CacheAdapter", "LOAD_AGAIN", "OwnView"]

log = logging.getLogger(__name__)

#: What an adapter's ``from_cache`` returns when this caller's view differs from the
#: entry (its own uncommitted transaction changed what the entry holds): the caller
#: runs the loader itself, and nothing is stored.
LOAD_AGAIN: Any = type("LoadAgain", (), {"__repr__": lambda self: "LOAD_AGAIN", "__slots__": ()})()


class OwnView:
    """What an adapter's ``from_cache`` returns for a user that is not the entry's alone.

    The SQLAlchemy helper hands a caller the rows its own session already holds
    (which that request may have changed) instead of new ones built from the
    entry. The caller gets ``value`` as usual, but nothing recorded for the entry
    (:mod:`identity_middleware.identity_memo`) may be applied to it.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _ContextLookup(Protocol):
    """What the hit path asks of Flask's context variables (or of a :class:`_ContextProbe`)."""

    @overload
    def get(self) -> Any: ...

    @overload
    def get(self, default: Any, /) -> Any: ...


class _ContextProbe:
    """Stands in for the context variables: ``get`` -> a truthy object or ``default``."""

    def __init__(self, probe: Callable[[], bool], current: Callable[[], Any]) -> None:
        self.probe, self.current = probe, current

    def get(self, default: Any = None) -> Any:
        return self.current() if self.probe() else default


_cv_app: _ContextLookup
_cv_request: _ContextLookup
try:  # Flask 3.0/3.1: read the context variables directly (one C call each).
    from flask.globals import _cv_app, _cv_request
except ImportError:  # pragma: no cover -- a Flask without them: slower, same result
    import flask.globals
    from werkzeug.local import LocalProxy

    # app_ctx lives in flask.globals (the package does not export it); Flask annotates
    # it as the AppContext it stands for, and we want the proxy's own method.
    _app_ctx = cast("LocalProxy[AppContext]", flask.globals.app_ctx)
    _cv_request = _ContextProbe(flask.has_request_context, lambda: True)
    _cv_app = _ContextProbe(flask.has_app_context, _app_ctx._get_current_object)

_SETTING_NAMES = (
    "IDENTITY_CACHE_TTL",
    "IDENTITY_CACHE_MAXSIZE",
    "IDENTITY_CACHE_NEGATIVE_TTL",
    "IDENTITY_VERSION_STORE",
    "IDENTITY_VERSION_PREFIX",
)
#: The settings that only matter when the cache builds its own version store.
_STORE_SETTINGS = ("IDENTITY_VERSION_STORE", "IDENTITY_VERSION_PREFIX")

#: Longest key (in characters) that is stored. Keys can be chosen by clients (a
#: ``request_loader``'s API token, an id from a signed cookie of any length); with this
#: cap, ``maxsize`` bounds the keys' memory in bytes too (about 10 MB at the default
#: 10,000 entries). A longer key is loaded every time, never stored.
MAX_KEY_CHARS = 1024

#: Attribute set on every loader wrapped by :meth:`UserCache.cached`; its value is the cache.
_MARK = "_identity_user_cache"

#: The name in ``g`` of the last hit of the request: ``(user handed out, records of the
#: entry that served it)``, for :func:`~identity_middleware.identity_memo.memoize_identity`.
SERVED = "_identity_cache_served"

Loader = TypeVar("Loader", bound=Callable[[Any], Any])


class CacheStats(NamedTuple):
    """Counters since the cache was created.

    ``hits + misses`` is the number of gets; ``negative_hits`` is the part of
    ``hits`` that answered ``None``. ``loads`` counts loader calls (with ``ttl=0``
    every get is a load); ``load_errors`` the loader calls that raised.
    ``evictions`` are entries dropped to stay within ``maxsize``, ``expirations``
    entries dropped because their TTL ran out, ``invalidations`` calls of
    ``invalidate``/``invalidate_all``. ``size`` is the number of live entries.
    """

    hits: int
    misses: int
    loads: int
    load_errors: int
    negative_hits: int
    evictions: int
    expirations: int
    invalidations: int
    size: int


class CacheAdapter(Protocol):
    """Turns loaded values into what is stored, and stored values into what callers get.

    ``to_cache`` runs once per successful non-``None`` load, before the value is
    stored; ``from_cache`` runs for every value handed to a caller -- hits, the
    caller that ran the load and every caller that waited for it -- so each
    request can get its own object (the SQLAlchemy helper uses this to store a
    detached copy and hand out per-session instances).

    Two optional methods let an adapter enforce the store rule (module docstring)
    for loaders that read through a session whose view may be older than "now":

    * ``begin_load() -> token`` runs in the loading thread after the stamp for the
      load was read and before the loader starts;
    * ``storable(value, stored, token) -> bool`` runs in the loading thread after
      ``to_cache``: ``False`` means ``value`` may hold data older than the stamp, so
      it is handed to the caller that ran the load but neither stored nor shared
      with callers waiting for it (they load again).

    An adapter without them is trusted to have read current data.

    ``from_cache`` may wrap its answer in :class:`OwnView` when it is not built from
    the entry alone. It may return :data:`LOAD_AGAIN` for a caller whose own view of the
    data differs from the entry (the SQLAlchemy helper: the caller's transaction
    wrote what the entry holds); that caller then runs the loader, unstored.
    """

    def to_cache(self, value: Any) -> Any: ...

    def from_cache(self, stored: Any) -> Any: ...


class _Flight:
    """One running load of one key; callers that miss meanwhile wait on it."""

    __slots__ = ("stamp", "epoch", "owner", "done", "failed", "stored")

    def __init__(self, stamp: Hashable, epoch: int) -> None:
        self.stamp = stamp
        self.epoch = epoch
        self.owner = threading.get_ident()
        self.done = threading.Event()
        self.failed = False  # raised, or vetoed by the adapter: waiters load again
        self.stored: Any = None


def _mapped_class_name(value: Any) -> str | None:
    """The class name when ``value`` is a SQLAlchemy-mapped instance, else ``None``.

    Never imports SQLAlchemy: when the app has not imported it, nothing it returns
    can be mapped.
    """
    if "sqlalchemy" not in sys.modules:
        return None
    from sqlalchemy import inspect
    from sqlalchemy.orm import InstanceState

    if isinstance(inspect(value, raiseerr=False), InstanceState):
        return type(value).__name__
    return None


def _refuse_mapped(name: str) -> TypeError:
    return TypeError(
        f"the user loader returned a SQLAlchemy-mapped {name}, and UserCache has no adapter: a cached ORM "
        "instance would be shared by later requests, goes detached after a commit (DetachedInstanceError) "
        "and silently drops changes made through current_user. Bind the cache to your session once, right "
        "after creating it:\n"
        "    from identity_middleware.sqlalchemy import bind_sqlalchemy\n"
        f"    bind_sqlalchemy(user_cache, db.session, {name}, relationships=(\"roles\",))"
    )


def _count_reader(counter: itertools.count) -> Callable[[], int]:
    """Read an ``itertools.count`` without a private API: ``next()`` minus our own reads."""
    reads = 0

    def value() -> int:
        nonlocal reads
        current = next(counter) - reads
        reads += 1
        return current

    return value


def _flask_security_session_attrs(user: Any) -> None:
    """What Flask-Security-Too's own loader records per request, replayed on a cache hit.

    Its ``_user_loader`` does more than load: it notes in ``g`` that this request
    was authenticated by the session (``fs_authn_via``) and when (``fs_paa``), and
    ``@auth_required("session")`` and the freshness checks read those notes. A hit
    that skipped the loader would turn every such view into a 401.
    """
    from flask import session
    from flask_security.utils import set_request_attr

    set_request_attr("fs_authn_via", "session")
    set_request_attr("fs_paa", session.get("fs_paa", 0))


def _on_hit_for(loader: Callable[[Any], Any]) -> Callable[[Any], None] | None:
    """The per-request side effects a known third-party loader has besides loading."""
    if (
        getattr(loader, "__module__", None) == "flask_security.core"
        and getattr(loader, "__name__", None) == "_user_loader"
    ):
        return _flask_security_session_attrs
    return None


def _refuse_async(loader: Callable[..., Any]) -> None:
    """``TypeError`` for a loader that returns an awaitable instead of a user."""
    call = getattr(loader, "__call__", None)  # noqa: B004 -- an object with async __call__
    if any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (loader, call)
    ):
        name = getattr(loader, "__qualname__", None) or repr(loader)
        raise TypeError(
            f"UserCache cannot cache the async loader {name}: calling it returns a coroutine, "
            "which the cache would store and hand out instead of a user (and which can be "
            "awaited only once). Flask-Login calls user_loader synchronously; write the loader "
            "as a plain def (for an async data layer, run it to completion inside the loader)"
        )


def _close_store(store: VersionStore) -> None:
    """Close a store this cache built and no longer uses.

    ``close`` is not part of the :class:`~identity_middleware.versions.VersionStore`
    protocol -- a custom store needs only ``stamp``, ``bump`` and ``bump_all`` -- so it
    is looked up rather than assumed. Only stores built by :func:`_build_store` get
    here, and both kinds it builds have it.
    """
    close = getattr(store, "close", None)
    if close is not None:
        close()


def _build_store(spec: str, prefix: str) -> VersionStore:
    """The version store an ``IDENTITY_VERSION_STORE`` value (already validated) names."""
    if spec == "local":
        return LocalVersionStore()
    from .redis_versions import RedisVersionStore

    return RedisVersionStore(spec, prefix=prefix)


class UserCache:
    """An in-process cache of users keyed by the id Flask-Login passes to the loader.

    :param app: a Flask app to initialise now (or call :meth:`init_app` later).
    :param ttl: seconds an entry is trusted when nothing invalidates it
        (``IDENTITY_CACHE_TTL``; ``0`` turns caching off).
    :param maxsize: most entries kept; the least recently used go first
        (``IDENTITY_CACHE_MAXSIZE``).
    :param negative_ttl: seconds a ``None`` ("no such user") is trusted
        (``IDENTITY_CACHE_NEGATIVE_TTL``; ``0`` never caches ``None``).
    :param versions: a :class:`~identity_middleware.versions.VersionStore`. An object
        given here wins over ``IDENTITY_VERSION_STORE`` (``local`` or a Redis URL).
    :param version_prefix: the Redis key prefix of a store built from
        ``IDENTITY_VERSION_STORE`` (``IDENTITY_VERSION_PREFIX``, default ``identity:``),
        so several apps can share one Redis.
    :param timer: the clock for expiry; tests inject a fake one instead of sleeping.

    Settings resolve as environment > argument > ``app.config`` > default; a bad value
    raises :class:`~identity_middleware.config.ConfigError` here or in
    :meth:`init_app`. :attr:`settings` holds the effective values and their sources.

    One cache may serve several apps of a process (one LRU, one TTL, one version
    store for all of them), as long as their effective settings agree: an
    :meth:`init_app` whose app resolves any setting to another value than the apps
    already served raises :class:`~identity_middleware.config.ConfigError` naming the
    setting and changes nothing -- it never replaces another app's TTL or closes the
    version store another app uses. Give such an app its own ``UserCache``. Until a
    second app joins, :meth:`init_app` may reconfigure the cache freely.

    Keys are ``str(user_id)``: ``invalidate(1)`` and ``invalidate("1")`` are the same
    user. With Flask-Security-Too the id Flask-Login passes is ``fs_uniquifier``, so
    invalidate with that.

    In a Flask request each :meth:`get` leaves its outcome in
    ``g._identity_cache_outcome`` (``"hit"``, ``"negative"``, ``"miss"`` or
    ``"bypass"`` when ``ttl=0``) and its duration in seconds in
    ``g._identity_cache_seconds``.
    """

    __slots__ = (
        "adapter",
        "settings",
        "_arguments",
        "_apps",
        "_ttl",
        "_maxsize",
        "_negative_ttl",
        "_versions",
        "_versions_source",
        "_owns_versions",
        "_stamp",
        "_timer",
        "_entries",
        "_entries_get",
        "_move_to_end",
        "_lock",
        "_flights",
        "_epoch",
        "_next_sweep",
        "_hits",
        "_negative_hits",
        "_read_hits",
        "_read_negative_hits",
        "_misses",
        "_loads",
        "_load_errors",
        "_evictions",
        "_expirations",
        "_invalidations",
    )

    def __init__(
        self,
        app: Flask | None = None,
        *,
        ttl: float | None = None,
        maxsize: int | None = None,
        negative_ttl: float | None = None,
        versions: VersionStore | None = None,
        version_prefix: str | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        #: ``None`` or a :class:`CacheAdapter`; see there.
        self.adapter: CacheAdapter | None = None
        self.settings: dict[str, Resolved] = {}
        self._arguments = {
            "IDENTITY_CACHE_TTL": ttl,
            "IDENTITY_CACHE_MAXSIZE": maxsize,
            "IDENTITY_CACHE_NEGATIVE_TTL": negative_ttl,
            "IDENTITY_VERSION_PREFIX": version_prefix,
        }
        self._timer = timer
        self._apps: list[weakref.ref[Flask]] = []  # the apps served, oldest first
        self._lock = threading.Lock()
        # key -> (stored value, stamp read before the load, expiry, records); order = recency.
        # The records (identity_memo.py) live and die with their entry.
        self._entries: OrderedDict[str, tuple[Any, Hashable, float, dict[Any, Any]]] = OrderedDict()
        if GIL:  # each OrderedDict call on the hit path is atomic only then
            self._entries_get = self._entries.get
            self._move_to_end = self._entries.move_to_end
        else:  # pragma: no cover -- free-threaded CPython: no atomicity to lean on
            self._entries_get = self._under_lock(self._entries.get)
            self._move_to_end = self._under_lock(self._entries.move_to_end)
        self._flights: dict[str, _Flight] = {}
        self._epoch = 0  # bumped by clear(): loads started earlier do not store
        self._next_sweep = 0.0
        self._hits = itertools.count()
        self._negative_hits = itertools.count()
        self._read_hits = _count_reader(self._hits)
        self._read_negative_hits = _count_reader(self._negative_hits)
        self._misses = self._loads = self._load_errors = 0
        self._evictions = self._expirations = self._invalidations = 0
        self._versions: VersionStore | None = None
        # Built from IDENTITY_VERSION_STORE (owned, closed by close()) or given by the
        # caller (never replaced by configuration, never closed by us).
        self._versions_source: tuple[str, str] | None = None  # the settings it was built from
        self._owns_versions = False
        if versions is not None:
            self.versions = versions
        self._configure(app)
        if app is not None:
            self._serve(app)

    # -- configuration --------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Apply ``app.config`` (under environment and arguments) and register as
        ``app.extensions["identity_cache"]``.

        When this cache already serves another app, ``app`` must resolve every
        setting to the same value, or :class:`~identity_middleware.config.ConfigError`
        is raised and nothing changes (see the class docstring).
        """
        self._configure(app)
        self._serve(app)

    def _serve(self, app: Flask) -> None:
        if not any(ref() is app for ref in self._apps):
            self._apps = [ref for ref in self._apps if ref() is not None] + [weakref.ref(app)]
        app.extensions["identity_cache"] = self

    def _configure(self, app: Flask | None) -> None:
        explicit_store = self._versions is not None and not self._owns_versions
        names = tuple(n for n in _SETTING_NAMES if not (explicit_store and n in _STORE_SETTINGS))
        settings = resolve(names, self._arguments, app)  # raises ConfigError
        if explicit_store:
            settings["IDENTITY_VERSION_STORE"] = Resolved(
                "IDENTITY_VERSION_STORE", self._versions, "argument"
            )
        others = [other for ref in self._apps if (other := ref()) is not None and other is not app]
        if others:
            # Shared with another app: the settings are the cache's, not this app's.
            self._check_shared(settings, others[0])
            return
        if not explicit_store:
            spec = (settings["IDENTITY_VERSION_STORE"].value, settings["IDENTITY_VERSION_PREFIX"].value)
            if spec != self._versions_source:
                old, owned = self._versions, self._owns_versions
                self._use_store(_build_store(*spec), source=spec, owned=True)
                if owned and old is not None:
                    _close_store(old)
        self.settings = settings
        self._ttl = settings["IDENTITY_CACHE_TTL"].value
        self._maxsize = settings["IDENTITY_CACHE_MAXSIZE"].value
        self._negative_ttl = settings["IDENTITY_CACHE_NEGATIVE_TTL"].value
        if self._ttl == 0:
            self.clear()
        from . import log

        log.configured(self, app)  # the settings line (and a Redis check) at construction

    def _check_shared(self, settings: dict[str, Resolved], other: Flask) -> None:
        """Refuse settings that differ from those the apps already served run with."""
        for name, resolved in settings.items():
            current = self.settings.get(name)
            if resolved.source == "argument" and name == "IDENTITY_VERSION_STORE":
                continue  # a store object given to this cache: the same for every app
            if current is not None and resolved.value != current.value:
                raise ConfigError(
                    name,
                    resolved.value,
                    f"{redacted(current.value)!r} (from {current.source}), the value this UserCache "
                    f"already uses for app {other.name!r}: one UserCache serving several "
                    "apps has one set of settings -- give this app its own UserCache to use "
                    "another",
                )

    @property
    def versions(self) -> VersionStore:
        """The version store whose stamps decide whether an entry is still good."""
        store = self._versions
        assert store is not None  # None only inside __init__, before _configure sets one
        return store

    @versions.setter
    def versions(self, store: VersionStore) -> None:
        if not all(callable(getattr(store, name, None)) for name in ("stamp", "bump", "bump_all")):
            raise TypeError(f"{store!r} is not a VersionStore (needs stamp, bump, bump_all)")
        self._use_store(store, source=None, owned=False)

    def _use_store(self, store: VersionStore, *, source: tuple[str, str] | None, owned: bool) -> None:
        # Stamps of different stores are not comparable: forget what the old one vouched for.
        with self._lock:
            self._versions = store
            self._stamp = store.stamp
            self._versions_source = source
            self._owns_versions = owned
            self._entries.clear()
            self._epoch += 1

    def close(self) -> None:
        """Close the version store if this cache built it from configuration."""
        if self._owns_versions and self._versions is not None:
            _close_store(self._versions)

    # -- the hot path ---------------------------------------------------------------------

    def get(self, user_id: Any, loader: Callable[[Any], Any]) -> Any:
        """The user for ``user_id``: from the cache, or from ``loader(user_id)`` (once per
        key however many callers miss at the same time). Exceptions from the loader
        reach the caller that ran it and are never cached."""
        return self._get(user_id, loader, None)

    def _get(
        self,
        user_id: Any,
        loader: Callable[[Any], Any],
        on_hit: Callable[[Any], None] | None,
        _request: _ContextLookup = _cv_request,
        _app: _ContextLookup = _cv_app,
        _clock: Callable[[], float] = time.perf_counter,
    ) -> Any:
        key = str(user_id)
        in_request = _request.get(None) is not None
        own_view = False
        if in_request:
            started = _clock()
        entry = self._entries_get(key)
        if entry is not None and self._timer() < entry[2] and entry[1] == self._stamp(key):
            try:
                self._move_to_end(key)
            except KeyError:  # evicted by another thread since our get: harmless
                pass
            next(self._hits)
            stored = entry[0]
            if stored is None:
                next(self._negative_hits)
                value, outcome = None, "negative"
            else:
                adapter = self.adapter
                value = stored if adapter is None else adapter.from_cache(stored)
                if value is LOAD_AGAIN:
                    value, outcome = self._bypass(user_id, loader, counted=True), "bypass"
                else:
                    outcome = "hit"
                    if type(value) is OwnView:
                        value, own_view = value.value, True
                    if on_hit is not None:
                        on_hit(value)
        else:
            value, outcome = self._load(key, user_id, loader, on_hit)
        if in_request:
            # For the Server-Timing header (timing.py) and identity_memo.py. Written to g's
            # __dict__ directly: g's own __setattr__ is a Python-level method, and two calls
            # of it would add about half the cost of a hit.
            namespace = _app.get().g.__dict__
            namespace["_identity_cache_outcome"] = outcome
            namespace["_identity_cache_seconds"] = _clock() - started
            if outcome == "hit" and not own_view:  # a user built from the entry alone
                namespace[SERVED] = (value, entry[3])  # type: ignore[index]  # a hit has an entry
        return value

    # -- the miss path: single flight -----------------------------------------------------

    def _load(
        self,
        key: str,
        user_id: Any,
        loader: Callable[[Any], Any],
        on_hit: Callable[[Any], None] | None,
    ) -> tuple[Any, str]:
        if self._ttl == 0:
            return self._bypass(user_id, loader), "bypass"
        counted = False
        entries = self._entries
        while True:
            stamp = self._stamp(key)  # read before the load starts: see the module docstring
            now = self._timer()
            with self._lock:
                entry = entries.get(key)
                if entry is not None:
                    if now < entry[2] and entry[1] == stamp:  # stored since our look
                        if not counted:
                            next(self._hits)
                            if entry[0] is None:
                                next(self._negative_hits)
                        outcome = "negative" if entry[0] is None else "hit"
                        leader, flight = None, None
                    else:
                        del entries[key]
                        if now >= entry[2]:
                            self._expirations += 1
                        entry = None
                if entry is None:
                    if not counted:
                        self._misses += 1
                    flight = self._flights.get(key)
                    if (
                        flight is None
                        or flight.stamp != stamp
                        or flight.epoch != self._epoch
                        or flight.owner == threading.get_ident()  # loader re-entered get()
                    ):
                        # No load to join, or it started before an invalidation (or
                        # clear) that has returned: its result is too old for us.
                        flight = _Flight(stamp, self._epoch)
                        self._flights[key] = flight
                        leader = True
                    else:
                        leader = False
                counted = True
            if entry is not None:
                return self._hand_out(entry[0], on_hit, user_id, loader, outcome)
            assert flight is not None  # entry is None, so the block above set (or joined) one
            if leader:
                return self._run(key, user_id, loader, flight, now), "miss"
            flight.done.wait()
            if not flight.failed:
                return self._hand_out(flight.stored, on_hit, user_id, loader, "miss")
            # The load failed and its caller got the exception, or the adapter found it
            # older than its stamp. Loop: the first waiter back under the lock starts
            # the next load, the others wait for that one.

    def _run(
        self, key: str, user_id: Any, loader: Callable[[Any], Any], flight: _Flight, started: float
    ) -> Any:
        """Run the loader for a flight we lead, store the result, release the waiters.

        The flight's stamp was read before we got here; ``begin_load`` runs after that
        read, so an adapter can tell whether what the loader read is at least as new.
        """
        adapter = self.adapter
        storable = token = None
        try:
            if adapter is not None:
                storable = getattr(adapter, "storable", None)
                begin_load = getattr(adapter, "begin_load", None)
                token = begin_load() if begin_load is not None else None
            value = loader(user_id)
            if value is None:
                stored = None
            elif adapter is None:
                mapped = _mapped_class_name(value)
                if mapped is not None:
                    raise _refuse_mapped(mapped)
                stored = value
            else:
                stored = adapter.to_cache(value)
                if storable is not None and not storable(value, stored, token):
                    # Possibly older than the stamp: this caller's own view, nobody else's.
                    flight.failed = True
                    # The key is not logged: with Flask-Security-Too it is fs_uniquifier, a token.
                    log.debug("identity cache: a load read data older than its stamp; handed out, not stored")
        except BaseException:
            flight.failed = True
            with self._lock:
                self._loads += 1
                self._load_errors += 1
                if self._flights.get(key) is flight:
                    del self._flights[key]
            raise
        else:
            flight.stored = stored
            now = self._timer()
            with self._lock:
                self._loads += 1
                if self._flights.get(key) is flight:
                    del self._flights[key]
                # Store only what is still current: a bump or clear() during the load
                # means a newer load may already have stored a fresher value.
                if not flight.failed and flight.epoch == self._epoch and flight.stamp == self._stamp(key):
                    self._store(key, stored, flight.stamp, started, now)
        finally:
            flight.done.set()  # whatever happened, nobody waits forever
        if stored is None or adapter is None:
            return stored
        handed = adapter.from_cache(stored)
        if type(handed) is OwnView:
            return handed.value
        return value if handed is LOAD_AGAIN else handed  # its own load is this caller's view

    def _bypass(self, user_id: Any, loader: Callable[[Any], Any], *, counted: bool = False) -> Any:
        """The loader's own answer, never stored: every call with ``ttl=0``, and a caller the
        adapter sent back (:data:`LOAD_AGAIN`), whose call already counts as a hit or miss."""
        with self._lock:
            if not counted:
                self._misses += 1
            self._loads += 1
        try:
            return loader(user_id)
        except BaseException:
            with self._lock:
                self._load_errors += 1
            raise

    def _hand_out(
        self,
        stored: Any,
        on_hit: Callable[[Any], None] | None,
        user_id: Any,
        loader: Callable[[Any], Any],
        outcome: str,
    ) -> tuple[Any, str]:
        """A stored value as a caller that did not run the loader receives it, with ``outcome``;
        or, when the adapter sends this caller back (:data:`LOAD_AGAIN`), the loader's own answer."""
        if stored is None:
            return None, outcome
        adapter = self.adapter
        value = stored if adapter is None else adapter.from_cache(stored)
        if value is LOAD_AGAIN:
            return self._bypass(user_id, loader, counted=True), "bypass"
        if type(value) is OwnView:
            value = value.value
        if on_hit is not None:
            on_hit(value)
        return value, outcome

    # -- bookkeeping (caller holds self._lock) ------------------------------------------------

    def _store(self, key: str, stored: Any, stamp: Hashable, started: float, now: float) -> None:
        if len(key) > MAX_KEY_CHARS:
            return  # a client-chosen giant key: loaded every time rather than held
        if stored is None:
            if self._negative_ttl == 0:
                return
            expires = started + self._negative_ttl
        else:
            expires = started + self._ttl
        entries = self._entries
        entries[key] = (stored, stamp, expires, {})
        entries.move_to_end(key)
        while len(entries) > self._maxsize:
            _, (_, _, old_expires, _) = entries.popitem(last=False)
            if old_expires <= now:
                self._expirations += 1
            else:
                self._evictions += 1
        if now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + max(self._ttl, self._negative_ttl)

    def _sweep(self, now: float) -> None:
        """Drop expired entries so they do not sit in memory until LRU reaches them.

        Runs at most once per TTL from the miss path, and from :meth:`stats`.
        """
        entries = self._entries
        try:
            items = list(entries.items())  # one C call; see below
        except RuntimeError:
            # A lock-free hit moved an entry while the copy ran (possible only if the
            # copy was interrupted by a finaliser). Sweep next time instead.
            return
        for key, entry in items:
            if entry[2] <= now and entries.get(key) is entry:
                del entries[key]
                self._expirations += 1

    def _under_lock(self, function: Callable[..., Any]) -> Callable[..., Any]:  # pragma: no cover
        lock = self._lock

        def locked(*args: Any) -> Any:
            with lock:
                return function(*args)

        return locked

    # -- invalidation and introspection ---------------------------------------------------

    def invalidate(self, user_id: Any) -> None:
        """Stop serving what is cached for ``user_id``, in every process sharing the
        version store. Call after changing roles or deactivating, after the commit.

        **What you may rely on when it returns normally:** no request that starts
        afterwards, in this process or in any process sharing the version store, is
        answered from an entry cached before the call -- its next lookup loads again.
        With Redis that holds through partitions too: the call returns only once
        every receiving process acknowledged the bump, or the ones that did not were
        waited out (see :mod:`identity_middleware.redis_versions`).

        **When it raises** :class:`~identity_middleware.versions.InvalidationUnconfirmed`
        (Redis did not confirm: down, frozen, partitioned from this process): this
        process stops serving the entry all the same, and every process that lost
        Redis too has stopped serving cached users by then (the store waits that
        out, about 3.4 s with default settings); only a process that still reaches Redis
        while this one cannot may serve it, until the bump is replayed or the entry's
        TTL ends. Your data is committed either way: report or retry, do not roll
        back. Any other store error propagates unchanged.
        """
        key = str(user_id)
        try:
            self.versions.bump(key)  # first: no entry stamped before this can validate again
        finally:
            with self._lock:
                self._invalidations += 1
                self._entries.pop(key, None)

    def invalidate_all(self) -> None:
        """Stop serving every cached user, e.g. after changing what a role means.

        The same contract as :meth:`invalidate`, for every user.
        """
        try:
            self.versions.bump_all()
        finally:
            with self._lock:
                self._invalidations += 1
                self._entries.clear()

    def clear(self) -> None:
        """Empty this process's cache (loads in flight do not store). Other processes
        keep theirs: use :meth:`invalidate_all` to reach them."""
        with self._lock:
            self._entries.clear()
            self._epoch += 1

    def stats(self) -> CacheStats:
        """A snapshot of the counters; expired entries are dropped first so ``size`` is live."""
        with self._lock:
            self._sweep(self._timer())
            return CacheStats(
                hits=self._read_hits(),
                misses=self._misses,
                loads=self._loads,
                load_errors=self._load_errors,
                negative_hits=self._read_negative_hits(),
                evictions=self._evictions,
                expirations=self._expirations,
                invalidations=self._invalidations,
                size=len(self._entries),
            )

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"<UserCache size={len(self._entries)} maxsize={self._maxsize} ttl={self._ttl}"
            f" negative_ttl={self._negative_ttl} versions={self._versions!r}>"
        )

    # -- Flask-Login glue ---------------------------------------------------------------------

    def cached(
        self,
        loader: Loader | None = None,
        *,
        on_hit: Callable[[Any], None] | None = None,
    ) -> Any:
        """Put a ``user_loader`` behind this cache::

            @login_manager.user_loader
            @user_cache.cached
            def load_user(user_id): ...

        ``on_hit(user)`` runs in the request of every caller that receives a user
        without having run the loader itself -- for loaders with per-request side
        effects besides loading. Wrapping a loader this cache already wraps returns
        it unchanged. A coroutine function (``async def``) is refused with a
        ``TypeError``: Flask-Login calls its loader synchronously, and the cache would
        store the coroutine object, not the user.
        """
        if loader is None:
            return functools.partial(self.cached, on_hit=on_hit)
        _refuse_async(loader)
        owner = getattr(loader, _MARK, None)
        if owner is self:
            return loader
        if owner is not None:
            raise ValueError(f"{loader!r} is already behind another UserCache ({owner!r})")
        get = self._get

        @functools.wraps(loader)
        def cached_loader(user_id: Any) -> Any:
            return get(user_id, loader, on_hit)

        setattr(cached_loader, _MARK, self)
        return cached_loader

    def install(self, login_manager: LoginManager) -> Callable[[Any], Any]:
        """Put the loader already registered on ``login_manager`` behind this cache.

        For loaders you do not own, such as Flask-Security-Too's (call this after
        ``Security(app, ...)``). Installing twice changes nothing. Returns the loader
        now registered.
        """
        register = getattr(login_manager, "user_loader", None)
        if not callable(register) or not hasattr(login_manager, "_user_callback"):
            raise RuntimeError(
                f"UserCache.install() needs a Flask-Login LoginManager with user_loader() and"
                f" _user_callback (Flask-Login 0.6); got {login_manager!r}"
            )
        current = login_manager._user_callback
        if current is None:
            raise RuntimeError(
                "UserCache.install(): no user_loader is registered on this LoginManager yet;"
                " install after the code that registers it (e.g. after Security(app, ...)),"
                " or decorate your loader with @user_cache.cached"
            )
        if getattr(current, _MARK, None) is self:
            return current
        wrapped = self.cached(current, on_hit=_on_hit_for(current))
        register(wrapped)
        if login_manager._user_callback is not wrapped:  # what _load_user() calls
            raise RuntimeError(
                "UserCache.install(): LoginManager.user_loader() did not replace"
                " _user_callback; this Flask-Login version is not supported"
            )
        return wrapped
