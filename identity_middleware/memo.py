"""A memo for keys that clients choose: bounded in bytes, read without a lock.

The classifier's per-path memos (:class:`identity_middleware.matching.PathMemo`)
and Flask-Login's session-identifier memo
(:mod:`identity_middleware.login_identifier`) sit on every request and are
keyed by what a client sends (a path, a User-Agent); what
:func:`identity_middleware.identity_memo.memoize_identity` learns is keyed per
identity, so per user. All need the same three things: a hit that costs one
``dict.get``, a bound in bytes rather than in entries (one huge key must not be
cheap to store), and eviction that never disturbs a concurrent reader. :class:`BoundedMemo` is that store; subclasses
decide what a key is, what it is charged and when it is not stored at all.

Why not ``cachetools.LRUCache(getsizeof=...)``: a hit there updates the recency
order, so every read must hold a lock (about 1.5 us per static request, half
of what serve mode spends answering a small file). Here a hit is one
``dict.get``, atomic under the GIL, and only writers lock. First-in, first-out
eviction costs a popular key one recomputation each time the whole budget has
turned over.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Generic, Hashable, TypeVar

__all__ = ["GIL", "BoundedMemo"]

#: Whether a GIL serialises threads: each ``dict`` call on a read path is atomic
#: only then (on a free-threaded CPython, readers take the lock instead).
GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()

_Value = TypeVar("_Value")


class BoundedMemo(Generic[_Value]):
    """Entries ``key -> (charge, value)`` holding at most ``maxsize`` bytes of charges.

    Read with ``self._find(key)``, which returns the entry or None: the dict's own
    ``get`` under a GIL, the same under ``self._lock`` without one. Write with
    :meth:`_store`. The oldest entries go first when a new one does not fit; an
    entry charged more than the whole budget is not stored.
    """

    __slots__ = ("_data", "_find", "_size", "_lock", "maxsize")

    def __init__(self, max_bytes: int) -> None:
        self._data: dict[Hashable, tuple[int, _Value]] = {}
        self._size = 0
        self._lock = threading.Lock()
        self._find: Callable[[Hashable], tuple[int, _Value] | None] = self._data.get
        if not GIL:  # pragma: no cover -- free-threaded CPython: no atomicity to lean on
            self._find = self._locked_find
        #: The byte budget.
        self.maxsize = max_bytes

    def _locked_find(self, key: Hashable) -> tuple[int, _Value] | None:  # pragma: no cover
        with self._lock:
            return self._data.get(key)

    def _store(self, key: Hashable, size: int, value: _Value) -> None:
        if size > self.maxsize:
            return  # larger than the whole budget: it would evict everything and still not fit
        data = self._data
        with self._lock:
            if key in data:
                return
            # Readers only call data.get, so iterating here under the lock is safe.
            while data and self._size + size > self.maxsize:
                self._size -= data.pop(next(iter(data)))[0]
            data[key] = (size, value)
            self._size += size

    def __len__(self) -> int:
        return len(self._data)

    @property
    def currsize(self) -> int:
        """Bytes charged for the entries held now."""
        return self._size

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._size = 0

