"""Version stores: the stamps that tell a cache whether an entry is still good.

A cached user is served only while the stamp stored with it equals the
store's current stamp for that user. Invalidating a user bumps its stamp, so
every cache that reads from the same store stops trusting its old entry --
without being told about the entry itself.

:class:`LocalVersionStore` keeps stamps in this process and is the default.
``RedisVersionStore`` (module :mod:`identity_middleware.redis_versions`) shares
them between processes and hosts. Anything that implements :class:`VersionStore`
can be passed as ``UserCache(versions=...)``.

Both stores keep their memory bounded however many distinct users are
invalidated over a long uptime: past ``max_keys`` counters they start a new
generation (every stamp changes once, so each cached user is reloaded once)
instead of growing.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from typing import Hashable, Protocol, runtime_checkable

__all__ = ["VersionStore", "LocalVersionStore", "InvalidationUnconfirmed", "DEFAULT_MAX_KEYS", "key_label"]


def key_label(key: str | None) -> str:
    """How logs and messages name an invalidated key: a short digest, never the id itself.

    A cache key is whatever id Flask-Login passes; with Flask-Security-Too that is
    ``fs_uniquifier``, a token that must not reach a log. An operator who knows the
    id can still find its line: the label is the first 8 hex digits of its BLAKE2b.
    """
    if key is None:
        return "all users"
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    return f"user #{digest}"

#: Per-user counters a store keeps before it starts a new generation instead.
DEFAULT_MAX_KEYS = 100_000


class InvalidationUnconfirmed(RuntimeError):
    """An invalidation reached this process but could not be confirmed for the others.

    Raised by ``bump``/``bump_all`` (and so by ``UserCache.invalidate``) when a shared
    store cannot vouch that every other process has stopped serving the old entry --
    Redis did not answer in time, the link is known to be down, the store is closed,
    or Redis refused the message. What still holds when it is raised:

    * this process no longer serves the old entry (the bump was applied here first);
    * every process that lost its link to Redis too has stopped serving cached users
      by the time this is raised (the store waits that out), until it resynchronises
      (see :mod:`identity_middleware.redis_versions`);
    * only a process that still reaches Redis while this one does not (a partial
      partition) may serve the old entry: until this bump is replayed to Redis
      (``replayed`` is true: this process sends it once its link is back) or until the
      entry's TTL ends. A closed store or a refusal by Redis reaches nobody else.

    ``key`` is the invalidated user id (``None`` for every user). The committed data
    is not affected: callers that invalidate after a commit should log this, not
    report a failed commit.
    """

    def __init__(self, message: str, *, key: str | None, replayed: bool) -> None:
        super().__init__(message)
        self.key = key
        self.replayed = replayed


@runtime_checkable
class VersionStore(Protocol):
    """What a cache needs from a version store.

    ``stamp(key)`` is called on every cache hit, so it must be cheap and must not do
    I/O. Stamps are compared with ``==`` only. A store that cannot vouch for its
    stamps right now (it lost its link to Redis, say) returns a value equal to
    nothing stored before -- a fresh ``object()`` -- so the cache reloads instead of
    serving something that may be stale. A stamp must never become equal again to a
    stamp read before a bump, however many other keys are bumped meanwhile.

    ``bump(key)`` and ``bump_all()`` return normally only when no process that
    reads stamps from this store can still validate a stamp read before the call
    (for a process-local store: when this process's stamps have moved). A shared
    store that cannot establish that raises :class:`InvalidationUnconfirmed` --
    after moving this process's stamps.

    ``close()`` is deliberately not part of the protocol: a cache closes only the
    stores it built itself from ``IDENTITY_VERSION_STORE`` (both kinds have it); a
    store passed in as ``versions=`` is its owner's to close.
    """

    def stamp(self, key: str) -> Hashable:
        """The current stamp of ``key`` (a user id as a string)."""

    def bump(self, key: str) -> None:
        """Make every stamp read so far for ``key`` stale."""

    def bump_all(self) -> None:
        """Make every stamp read so far, for every key, stale."""


#: Generation numbers, unique in this process for its lifetime (shared by every store,
#: so a stamp from one store never equals one from another either).
_generations = itertools.count(1)


class LocalVersionStore:
    """Stamps held in this process: a generation number plus a counter per key.

    A stamp is ``(generation, counter)``. The generation and the counters of that
    generation live in one tuple that is replaced as a whole, so a lock-free
    ``stamp()`` never pairs one generation with another's counters. Counters only
    grow within a generation and generations are never reused, so a stamp read at
    any moment never equals one read before a bump.

    :param max_keys: most per-key counters kept. Bumping a new key beyond it starts
        a new generation (as ``bump_all`` does): every stamp changes once, so each
        cached user is reloaded once, and the counters start empty. Memory stays
        about ``max_keys`` small ints (~10 MB at the default) however many distinct
        users a long uptime invalidates.
    """

    __slots__ = ("_state", "_lock", "_max_keys")

    def __init__(self, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if not (isinstance(max_keys, int) and max_keys > 0):
            raise ValueError(f"max_keys must be a positive int, not {max_keys!r}")
        self._max_keys = max_keys
        self._state: tuple[int, dict[str, int]] = (next(_generations), {})
        self._lock = threading.Lock()

    def stamp(self, key: str) -> Hashable:
        generation, counters = self._state
        return (generation, counters.get(key, 0))

    def bump(self, key: str) -> None:
        with self._lock:
            counters = self._state[1]
            if key in counters or len(counters) < self._max_keys:
                counters[key] = counters.get(key, 0) + 1
            else:
                self._state = (next(_generations), {})

    def bump_all(self) -> None:
        with self._lock:
            self._state = (next(_generations), {})

    def close(self) -> None:
        """Nothing to release; present so every store can be closed the same way."""

    @property
    def size(self) -> int:
        """Per-key counters held now (at most ``max_keys``)."""
        return len(self._state[1])

    def __repr__(self) -> str:
        generation, counters = self._state
        return f"<LocalVersionStore generation={generation} keys={len(counters)}>"
