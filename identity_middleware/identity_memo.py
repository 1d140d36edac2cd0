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

**When the handler still runs** (every time, nothing recorded): no request context;
the user was not loaded from a cache hit *by this identity load* -- a miss, a login, an
anonymous user, a caller whose own transaction changed the user, or a user some code
had already loaded (and might have changed) before Principal loaded the identity, as
with a second ``identity_changed`` in the same request; the handler raised, returned
something, removed a need, replaced ``identity.provides`` or deleted an attribute; or
it stored a value another request must not share -- anything but strings, numbers,
``None``, bytes and tuples/frozensets of them (needs are such tuples), the user object
itself (replayed as *this* request's user) and a proxy such as ``current_user``. The
handler also runs when the identity it is given holds something unshareable (an
earlier receiver stored the user object on it, say). A record is keyed by the handler,
the sender and the whole state of the identity it was given -- its class, id, auth
type, needs and attributes, with their types -- so it is replayed only onto an
identity exactly like the one the handler changed.

**What the app promises by decorating.** The handler's effect on the identity is a
function of the cached user (the columns and relationships ``bind_sqlalchemy``
snapshots), the sender and the identity it is given, and nothing else:
it does not read the request, the session, ``g``, the clock or rows outside the
snapshot, and it has no side effects the app relies on (logging, ``g``, counters),
because on a replay it does not run. Other receivers of ``identity_loaded`` are not
affected: they run on every request. The wrapper reads ``current_user`` before
anything else, which loads the user as the handler's own first read of it would.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from werkzeug.local import LocalProxy

from .cache import SERVED, _cv_app, _cv_request

__all__ = ["memoize_identity"]

Handler = TypeVar("Handler", bound=Callable[..., Any])

#: Most records one cache entry keeps (one per handler, sender and identity state it
#: served); past that, handlers run without being recorded.
MAX_RECORDS_PER_ENTRY = 16

#: The name in ``g`` of ``(identity, SERVED record)``: the identity whose load hit the cache.
_CLAIM = "_identity_memo_claim"

#: Stands in a record for "the user this request was served".
_USER = object()
_MISSING = object()
_NO_NEEDS: frozenset[Any] = frozenset()
_IMMUTABLE_LEAVES = frozenset({str, int, float, bool, type(None), bytes, complex})


def _shareable(value: Any, depth: int = 0) -> bool:
    """True when ``value`` cannot change after it is recorded, so later requests may share it."""
    kind = type(value)
    if kind in _IMMUTABLE_LEAVES:
        return True
    if depth > 16 or not isinstance(value, (tuple, frozenset)) or hasattr(value, "__dict__"):
        return False  # a subclass with a __dict__ carries state of its own
    return all(_shareable(item, depth + 1) for item in value)


def _state_key(state: dict[str, Any]) -> tuple[Any, ...] | None:
    """The identity's state before the handler, as a key, or None if any of it is unshareable.

    Two identities with equal keys are alike in everything a handler can read of them
    (ids, auth types, needs and attributes, with their types), so the same effect
    applied to both leaves them alike after, as running the handler would.
    """
    key: list[Any] = []
    append = key.append
    for name, value in state.items():
        kind = type(value)
        if kind not in _IMMUTABLE_LEAVES:
            if kind is set:  # the needs: Identity's provides
                value = frozenset(value) if value else _NO_NEEDS
            if not _shareable(value):
                return None
        append(name)
        append(kind)
        append(value)
    return tuple(key)


def _effect(identity: Any, provides: Any, provided: set[Any], before: dict[str, Any], user: Any) -> Any:
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
        elif _shareable(value) or isinstance(value, LocalProxy):
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
    from flask_login import current_user

    load_user: Callable[[], Any] = current_user._get_current_object

    @functools.wraps(handler)
    def memoized(sender: Any, **kwargs: Any) -> Any:
        identity = kwargs.get("identity")
        if identity is None or len(kwargs) != 1 or _cv_request.get(None) is None:
            return handler(sender, **kwargs)
        namespace = _cv_app.get().g.__dict__
        earlier = namespace.get(SERVED)
        user = load_user()
        served = namespace.get(SERVED)
        if served is not earlier and served is not None and served[0] is user:
            # The user was loaded just now, from a cache hit: built from the entry's
            # snapshot, and untouched since. Other memoized receivers of this same
            # identity may use the entry too.
            namespace[_CLAIM] = (identity, served)
        else:
            claim = namespace.get(_CLAIM)
            if claim is None or claim[0] is not identity or claim[1][0] is not user:
                return handler(sender, **kwargs)
            served = claim[1]
        records: dict[Any, Any] = served[1]
        before = identity.__dict__
        state = _state_key(before)
        if state is None:
            return handler(sender, **kwargs)  # an earlier receiver left something unshareable
        key = (memoized, sender, type(identity), state)
        record = records.get(key)
        if record is not None:
            added, changes = record
            identity.provides.update(added)
            for name, value in changes:
                setattr(identity, name, user if value is _USER else value)
            return None
        provides = identity.provides
        provided, before = set(provides), dict(before)
        result = handler(sender, **kwargs)
        if result is None and len(records) < MAX_RECORDS_PER_ENTRY:
            effect = _effect(identity, provides, provided, before, user)
            if effect is not None:
                records[key] = effect
        return result

    return memoized  # type: ignore[return-value]
