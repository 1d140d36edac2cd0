"""PROTOTYPE -- not wired in, not public API: skip an opted-in ``identity_loaded`` handler on a cache hit.

Flask-Principal sends ``identity_loaded`` on every request, and the handler
everyone copies rebuilds the same needs from the same user each time::

    @identity_loaded.connect_via(app)
    def on_identity_loaded(sender, identity):
        identity.user = current_user
        if current_user.is_authenticated:
            identity.provides.add(UserNeed(current_user.id))
            for role in current_user.roles:
                identity.provides.add(RoleNeed(role.name))

When the user comes from a :class:`~identity_middleware.UserCache`, the
handler's inputs -- the cached user and the identity's id and auth type -- are
known to be unchanged as long as the user's cache entry is the same one under
the same version stamp. :class:`CachedIdentityHandler` registers such a handler
in its place and, on a hit, replays what the handler did to the identity
instead of running it.

**Opting in.** An app opts in per handler, by registering it with
``CachedIdentityHandler(app, user_cache)(handler)`` instead of
``identity_loaded.connect_via(app)``. That is a promise that the handler's only
effects are on the identity it receives, and that they depend only on
``current_user`` (the cached user) and the identity's ``id`` and
``auth_type``. Handlers that log, count, read the request or the clock, or
touch ``g`` or the session do not qualify; they stay registered as usual and
run on every request, as do all other receivers of the signal.

**What is replayed, and when the handler still runs.** The first run for a
(user entry, identity) records what the handler did: needs added to
``identity.provides`` and attributes set on the identity. It is recorded only
if every effect can be replayed exactly -- needs are immutable; an attribute
value must be ``current_user`` itself (the same proxy object in every
request) or an immutable constant. A handler that removed needs or
attributes, or set anything else (``current_user._get_current_object()``, a
list), is simply run on every request. The handler also runs whenever the user
is anonymous, is not in the cache (a miss, a bypass, a negative entry), or its
entry changed: a new load, an expiry, ``invalidate``/``invalidate_all`` (the
version stamp), a lost Redis link (no stamp ever matches). So a recorded
result never outlives the cache entry it was computed from.

**Seam.** The entry is read through ``UserCache._entries_get``, ``_timer`` and
``_stamp``, private members of our own cache, with the same validity test a
hit uses: a public ``UserCache.entry_token(user_id)`` (an opaque
value that changes whenever the entry is replaced, invalidated or expires)
would be the clean API if this is adopted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache
from flask_login import current_user
from flask_principal import identity_loaded

if TYPE_CHECKING:
    from flask import Flask

    from .cache import UserCache

__all__ = ["CachedIdentityHandler"]

_IMMUTABLE = (type(None), bool, int, float, str, bytes)

#: The recorded effects of one handler run: attributes set, needs added.
_Effects = tuple[tuple[tuple[str, Any], ...], frozenset[Any]]


class CachedIdentityHandler:
    """Registers opted-in ``identity_loaded`` handlers for ``app`` whose results are replayed on a hit.

    ``maxsize`` bounds the recorded results (one per user and identity). ``stats``
    counts ``runs`` (the handler ran), ``replays`` and ``uncacheable`` runs.
    """

    def __init__(self, app: Flask, user_cache: UserCache, *, maxsize: int = 10_000) -> None:
        self.app = app
        self.user_cache = user_cache
        self._recorded: LRUCache[Any, tuple[Any, _Effects]] = LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()
        self.stats = {"runs": 0, "replays": 0, "uncacheable": 0}
        self._receivers: list[Callable[..., None]] = []  # blinker holds receivers weakly

    def __call__(self, handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """Register ``handler`` for ``identity_loaded`` from this app, behind the cache."""

        def receiver(sender: Any, identity: Any) -> None:
            self._receive(handler, sender, identity)

        receiver.__wrapped__ = handler  # type: ignore[attr-defined]
        self._receivers.append(receiver)
        identity_loaded.connect(receiver, sender=self.app)
        return handler

    def _receive(self, handler: Callable[[Any, Any], None], sender: Any, identity: Any) -> None:
        entry, key = self._entry_and_key(identity)
        if entry is not None:
            with self._lock:
                recorded = self._recorded.get(key)
            if recorded is not None and recorded[0] is entry:
                attributes, needs = recorded[1]
                for name, value in attributes:
                    setattr(identity, name, value)
                identity.provides.update(needs)
                self.stats["replays"] += 1
                return
        effects = self._run(handler, sender, identity)
        if effects is None:
            self.stats["uncacheable"] += 1
        elif entry is not None:
            with self._lock:
                self._recorded[key] = (entry, effects)

    def _entry_and_key(self, identity: Any) -> tuple[Any, Any]:
        """The user's cache entry (None when it must not be trusted) and the key of this identity."""
        user = current_user._get_current_object()  # Flask-Login decides, as the handler's first touch would
        if user is None or getattr(user, "is_anonymous", True):
            return None, None
        user_id = str(user.get_id())
        cache: Any = self.user_cache
        entry = cache._entries_get(user_id)  # (stored, stamp, expires): see the module docstring
        if entry is None or entry[0] is None or not cache._timer() < entry[2] or entry[1] != cache._stamp(user_id):
            return None, None
        return entry, (user_id, type(identity), identity.id, identity.auth_type)

    def _run(self, handler: Callable[[Any, Any], None], sender: Any, identity: Any) -> _Effects | None:
        """Run the handler and return its effects if they can be replayed exactly."""
        self.stats["runs"] += 1
        before = dict(vars(identity))
        provides_before = set(identity.provides)
        handler(sender, identity)
        after = vars(identity)
        if identity.provides is not before["provides"] or not provides_before <= identity.provides:
            return None  # the set was replaced, or needs were removed
        if set(before) - set(after):
            return None  # an attribute was deleted
        attributes = []
        for name, value in after.items():
            if name == "provides" or (name in before and before[name] is value):
                continue
            if not (value is current_user or type(value) in _IMMUTABLE):
                return None  # a per-request object: only the handler can make it
            attributes.append((name, value))
        return tuple(attributes), frozenset(identity.provides - provides_before)
