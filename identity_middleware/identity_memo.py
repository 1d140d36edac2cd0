"""An ``identity_loaded`` handler's effect, replayed for users served from the cache.

Flask-Principal rebuilds the identity on every request: it sends
``identity_loaded`` and the app's handler reads ``current_user`` and adds a
``RoleNeed`` per role. When the user came from a :class:`~identity_middleware.UserCache`
hit, the handler reads the same cached snapshot as the request before it, so for a
handler whose effect depends only on the user it computes the same thing again.
:func:`memoize_identity` lets the app say so for one handler::

    @identity_loaded.connect_via(app)
    @memoize_identity
    def on_identity_loaded(sender, identity):
        identity.user = current_user
        ...

**What is recorded.** The handler runs as usual the first time a cache entry serves
the request's user; what it did to the identity -- the needs it added to
``identity.provides`` and the attributes it set -- is kept *in that entry*. Later
requests served from the same entry get that effect applied to their own identity
instead of running the handler. An invalidation, expiry or eviction drops the entry
and its record together, so a replayed identity is never older than the cached user
it goes with: after ``invalidate()`` returns, the next request loads the user and runs
the handler again.

**Loading the user.** A replay needs to know which entry serves the user, so the
wrapper loads the user (``current_user``) before the handler would -- but only from an
identity state in which it has seen the handler read ``current_user`` itself (it learns
this on the handler's first run from each state, in a bounded memo), so no user is
loaded that the bare app would not load.

**When the handler still runs** (and nothing is replayed): no request context; the
user was already loaded before this call (code may have changed it since; this
includes a second ``identity_changed`` in the same request, and a second memoized
receiver of the same signal); the user did not come from the cache as a new copy of an
entry (a miss, a login, an anonymous or deleted user, rows the request's own session
already held -- :class:`~identity_middleware.cache.OwnView` -- or a transaction that
changed them); the handler raised, returned something, removed a need, replaced
``identity.provides`` or deleted an attribute; or it stored a value another request
must not share -- anything but strings, numbers, ``None``, bytes and tuples/frozensets
of them (needs are such tuples), the user object itself (replayed as *this* request's
user) and Flask's and Flask-Login's context proxies (``current_user``, ``request``,
``session``, ``g``, ``current_app``). The handler also runs when the identity it is
given holds something unshareable (a set other than ``provides``, the user object).
A record is keyed by the handler, the sender and the whole state of the identity it
was given -- its class, id, auth type, needs and attributes, with their types at every
level -- so it is replayed only onto an identity exactly like the one the handler
changed.

**What the app promises by decorating.** The handler's effect on the identity is a
function of the cached user (the columns and relationships ``bind_sqlalchemy``
snapshots), the sender and the identity it is given, and nothing else: it does not
read the request, the session, ``g``, the clock or rows outside the snapshot, and it
has no side effects the app relies on (logging, ``g``, counters), because on a replay
it does not run. Other receivers of ``identity_loaded`` are not affected: they run on
every request.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from .cache import SERVED, _cv_app, _cv_request
from .memo import BoundedMemo

__all__ = ["memoize_identity"]

Handler = TypeVar("Handler", bound=Callable[..., Any])

#: Most records one cache entry keeps (one per handler, sender and identity state it
#: served); past that, handlers run without being recorded.
MAX_RECORDS_PER_ENTRY = 16

#: Bytes (estimated) each decorated handler may spend remembering, per identity state,
#: whether it reads ``current_user``; past that the oldest are forgotten and learned again.
LEARNED_BYTES = 4 * 1024 * 1024

#: Where Flask-Login keeps the request's user in ``g``: present once it was loaded.
_LOGIN_USER = "_login_user"

#: Stands in a record for "the user this request was served".
_USER = object()
_MISSING = object()
_IMMUTABLE_LEAVES = frozenset({str, int, float, bool, type(None), bytes})
#: Leaves whose equal values are the same value (not floats: -0.0 == 0.0).
_PLAIN = _IMMUTABLE_LEAVES - {float}
#: Markers in a state key, before the needs and before any other non-plain value.
_NEEDS, _NESTED = object(), object()
_NO_NEEDS: frozenset[Any] = frozenset()


class _Unshareable(Exception):
    pass


def _shareable(value: Any, depth: int = 0) -> bool:
    """True when ``value`` cannot change after it is recorded, so later requests may share it."""
    kind = type(value)
    if kind in _IMMUTABLE_LEAVES:
        return True
    if depth > 16 or not isinstance(value, (tuple, frozenset)) or hasattr(value, "__dict__"):
        return False  # a subclass with a __dict__ carries state of its own
    return all(_shareable(item, depth + 1) for item in value)


def _typed(value: Any, depth: int = 0) -> Any:
    """``value`` as a key that tells apart what ``==`` does not: ``True`` from ``1`` at any
    depth (inside needs too), ``-0.0`` from ``0.0``. Raises :class:`_Unshareable`."""
    kind = type(value)
    if kind is float:
        return kind, value.hex()
    if kind in _IMMUTABLE_LEAVES:
        return kind, value
    if depth > 16 or not isinstance(value, (tuple, frozenset)) or hasattr(value, "__dict__"):
        raise _Unshareable
    items = [_typed(item, depth + 1) for item in value]
    return kind, frozenset(items) if isinstance(value, frozenset) else tuple(items)


def _state_key(state: dict[str, Any]) -> tuple[Any, ...] | None:
    """The identity's state before the handler, as a key, or None if any of it is unshareable.

    Two identities with equal keys are alike in everything a handler can read of them
    (ids, auth types, needs and attributes, with their types at every level), so the
    same effect applied to both leaves them alike after, as running the handler would.
    Only ``provides`` may be a set (a set elsewhere may be filled in place). Three
    items per attribute, flat: a replay builds and hashes this on every request.
    """
    key: list[Any] = []
    append = key.append
    try:
        for name, value in state.items():
            kind = type(value)
            append(name)
            if kind in _PLAIN:  # of these types, equal values are the same value
                append(kind)
                append(value)
            elif kind is set and name == "provides":
                append(_NEEDS)
                append(frozenset(map(_typed, value)) if value else _NO_NEEDS)
            else:
                append(_NESTED)
                append(_typed(value))
    except _Unshareable:
        return None
    return tuple(key)


class _LearnedReads(BoundedMemo[bool]):
    """Per (handler, sender, identity class and state): whether the handler read ``current_user`` from it.

    Read with ``_find`` (an entry is ``(charge, reads)``), as :class:`BoundedMemo` says.
    """

    __slots__ = ()

    def learn(self, key: tuple[Any, ...], reads: bool) -> None:
        self._store(key, 100 + sum(8 + len(repr(item)) for item in key[-1]), reads)


def _context_proxies() -> tuple[Any, ...]:
    """The proxies that stand for "this request's" object in every request."""
    import flask
    from flask_login import current_user

    return current_user, flask.request, flask.session, flask.g, flask.current_app


def _effect(
    identity: Any, provides: Any, provided: set[Any], before: dict[str, Any], user: Any, proxies: tuple[Any, ...]
) -> Any:
    """What a handler did to ``identity``, as a replayable record, or None if it cannot be replayed."""
    after = identity.__dict__
    if after.get("provides") is not provides or not provided <= provides:
        return None
    added = frozenset(provides - provided)
    if not _shareable(added):
        return None
    changes = []
    for name, value in after.items():
        if name == "provides" or before.get(name, _MISSING) is value:
            continue
        if value is user:
            changes.append((name, _USER))
        elif _shareable(value) or any(value is proxy for proxy in proxies):
            changes.append((name, value))
        else:
            return None
    if any(name not in after for name in before):
        return None
    return added, tuple(changes)


def memoize_identity(handler: Handler) -> Handler:
    """Replay ``handler``'s effect on the identity for users served from the cache (module docstring).

    Decorate an ``identity_loaded`` receiver whose effect depends only on the user;
    put it under ``connect_via``/``connect`` so the signal holds the wrapper.
    """
    if not callable(handler):
        raise TypeError(
            f"memoize_identity decorates an identity_loaded receiver, a function (sender, identity); "
            f"got {type(handler).__name__} {handler!r}"
        )
    proxies = _context_proxies()
    load_user: Callable[[], Any] = proxies[0]._get_current_object
    learned = _LearnedReads(LEARNED_BYTES)
    learned_get = learned._find

    @functools.wraps(handler)
    def memoized(sender: Any, **kwargs: Any) -> Any:
        identity = kwargs.get("identity")
        if identity is None or len(kwargs) != 1 or _cv_request.get(None) is None:
            return handler(sender, **kwargs)
        namespace = _cv_app.get().g.__dict__
        if _LOGIN_USER in namespace:
            return handler(sender, **kwargs)  # loaded before: it may have changed since its hit
        state = _state_key(identity.__dict__)
        if state is None:
            return handler(sender, **kwargs)  # an earlier receiver left something unshareable
        key = (memoized, sender, type(identity), state)
        try:
            learned_reads = learned_get(key)
        except TypeError:  # an unhashable sender
            return handler(sender, **kwargs)
        earlier = namespace.get(SERVED)
        if learned_reads is not None and learned_reads[1]:
            # The handler reads current_user from this state: loading it first is what
            # its own first read would do.
            user = load_user()
            served = namespace.get(SERVED)
            if served is earlier or served is None or served[0] is not user:
                return handler(sender, **kwargs)  # not a user built from an entry just now
            found = served[1].get(key)
            if found is not None:
                added, changes = found
                identity.provides.update(added)
                for name, value in changes:
                    setattr(identity, name, user if value is _USER else value)
                return None
        provides = identity.provides
        provided, before = set(provides), dict(identity.__dict__)
        result = handler(sender, **kwargs)
        user = namespace.get(_LOGIN_USER, _MISSING)
        if learned_reads is None:
            learned.learn(key, user is not _MISSING)
        served = namespace.get(SERVED)
        if result is None and served is not earlier and served is not None and served[0] is user:
            # The user was loaded during this call, from an entry: record for that entry.
            records = served[1]
            if len(records) < MAX_RECORDS_PER_ENTRY:
                effect = _effect(identity, provides, provided, before, user, proxies)
                if effect is not None:
                    records[key] = effect
        return result

    return memoized  # type: ignore[return-value]
