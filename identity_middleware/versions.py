"""Version stores: the stamps that tell a cache whether an entry is still good.

A cached user is served only while the stamp stored with it equals the
store's current stamp for that user. Invalidating a user bumps its stamp, so
every cache that reads from the same store stops trusting its old entry --
without being told about the entry itself.

:class:`LocalVersionStore` keeps stamps in this process and is the default.
``RedisVersionStore`` (module :mod:`identity_middleware.redis_versions`) shares
them between processes and hosts. Anything that implements :class:`VersionStore`
can be passed as ``UserCache(versions=...)``.
"""

from __future__ import annotations

import threading
from typing import Hashable, Protocol, runtime_checkable

__all__ = ["VersionStore", "LocalVersionStore"]


@runtime_checkable
class VersionStore(Protocol):
    """What a cache needs from a version store.

    ``stamp(key)`` is called on every cache hit, so it must be cheap and must not do
    I/O. Stamps are compared with ``==`` only. A store that cannot vouch for its
    stamps right now (it lost its link to Redis, say) returns a value equal to
    nothing stored before -- a fresh ``object()`` -- so the cache reloads instead of
    serving something that may be stale.

    ``bump(key)`` and ``bump_all()`` must have taken effect for this process when
    they return: a ``stamp(key)`` read afterwards differs from any read before.

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


class LocalVersionStore:
    """Stamps held in this process: a global generation plus a counter per key.

    Both only ever grow, so a stamp read at any moment is never equal to one read
    before a bump -- even when ``stamp()`` interleaves with ``bump_all()`` in
    another thread. Reads take no lock; bumps take one so increments are not lost.

    Memory grows by one small int per key ever invalidated (not per key cached);
    a process would need millions of distinct invalidated users to notice.
    """

    __slots__ = ("_generation", "_counters", "_lock")

    def __init__(self) -> None:
        self._generation = 0
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()

    def stamp(self, key: str) -> Hashable:
        return (self._generation, self._counters.get(key, 0))

    def bump(self, key: str) -> None:
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + 1

    def bump_all(self) -> None:
        with self._lock:
            self._generation += 1

    def close(self) -> None:
        """Nothing to release; present so every store can be closed the same way."""

    def __repr__(self) -> str:
        return f"<LocalVersionStore generation={self._generation} keys={len(self._counters)}>"
