"""What sharing version stamps through Redis costs a cache hit, and how fast a bump travels.

Three version stores behind the same :class:`~identity_middleware.UserCache` hit:

* ``LocalVersionStore``: stamps in this process -- the anchor (target for Redis:
  <= 1.2x);
* ``RedisVersionStore``: stamps mirrored locally, kept fresh by pub/sub -- what
  this package ships;
* ``GET per request``: a store that asks Redis for the stamp (``MGET`` of the
  generation and the user's counter) on every hit -- the obvious alternative,
  one network round trip per request even on loopback.

Plus ``stamp()`` alone for each, and the propagation delay of an invalidation to
another process on the same host (p50/p99 over many bumps).

Variants are interleaved within each repeat and the median of the repeats is
reported, so a noisy neighbour hits every variant alike. Needs the Redis at
``IDENTITY_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``); it uses a random
key prefix and deletes its keys afterwards, never flushing anything.

Run: ``python -m benchmarks.redis_versions [--quick]``.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Hashable

from ._common import markdown_table, standalone

REDIS_URL = os.environ.get("IDENTITY_TEST_REDIS", "redis://127.0.0.1:6379/0")
USER = "42"


class GetPerRequestStore:
    """The design we avoid: every ``stamp()`` is a round trip to Redis."""

    __slots__ = ("_client", "_gen", "_prefix")

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._gen = f"{prefix}gen"

    def stamp(self, key: str) -> Hashable:
        return tuple(self._client.mget(self._gen, f"{self._prefix}v:{key}"))

    def bump(self, key: str) -> None:
        self._client.incr(f"{self._prefix}v:{key}")

    def bump_all(self) -> None:
        self._client.incr(self._gen)

    def close(self) -> None:
        pass


def _per_call_us(function: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def _time_one(get: Callable[..., Any], stamp: Callable[[str], Any], calls: int) -> tuple[float, float]:
    """Microseconds per cache hit and per bare ``stamp()`` for one store (closures built
    here, per store, rather than in the caller's loop)."""
    return _per_call_us(lambda: get(USER, None), calls), _per_call_us(lambda: stamp(USER), calls)


def _time_hits(stores: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    from identity_middleware import UserCache

    calls, slow_calls, repeats = (20_000, 300, 5) if quick else (200_000, 3_000, 7)
    user = {"id": USER, "roles": ("admin", "editor")}
    caches = {name: UserCache(versions=store, ttl=3600) for name, store in stores.items()}
    for name, cache in caches.items():
        cache.get(USER, lambda user_id: user)
        before = cache.stats().hits
        cache.get(USER, lambda user_id: user)
        if cache.stats().hits != before + 1:
            raise RuntimeError(f"{name}: the second get was not a hit")
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for name, cache in caches.items():
            n = slow_calls if name == "GET per request" else calls
            hit_us, stamp_us = _time_one(cache.get, stores[name].stamp, n)
            samples.setdefault(("cache hit (UserCache.get)", name), []).append(hit_us)
            samples.setdefault(("stamp() alone", name), []).append(stamp_us)
    for name, cache in caches.items():
        stats = cache.stats()
        if stats.loads != 1:
            raise RuntimeError(f"{name}: {stats.loads} loads during a hit-only benchmark")
    medians = {key: statistics.median(values) for key, values in samples.items()}
    rows = []
    for (case, name), us in medians.items():
        row = {
            "benchmark": "redis_versions",
            "case": case,
            "variant": name,
            "us_per_call": round(us, 3),
            "vs_local": round(us / medians[(case, "LocalVersionStore")], 2),
        }
        if name != "GET per request":
            row["vs_get_per_request"] = round(us / medians[(case, "GET per request")], 4)
        rows.append(row)
    return rows


_WATCHER = textwrap.dedent(
    """
    import sys, time
    from identity_middleware.redis_versions import RedisVersionStore

    store = RedisVersionStore(sys.argv[1], prefix=sys.argv[2])
    assert store.wait_synced(10)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        before = store.stamp("42")
        print("watching", flush=True)
        deadline = time.monotonic() + 10
        while store.stamp("42") == before and time.monotonic() < deadline:
            time.sleep(0.0001)  # let the listener thread have the GIL
        print(time.monotonic(), flush=True)
    store.close()
    """
)


def _time_propagation(store: Any, prefix: str, quick: bool) -> list[dict[str, Any]]:
    """From the start of ``bump()`` here to the other process seeing the new stamp."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, REDIS_URL, prefix],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
    )
    delays = []
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the watcher process did not sync with Redis")
        for _ in range(100 if quick else 500):
            child.stdin.write("watch\n")
            child.stdin.flush()
            child.stdout.readline()
            started = time.monotonic()
            store.bump(USER)
            delays.append(float(child.stdout.readline()) - started)
        child.stdin.write("quit\n")
        child.stdin.flush()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    delays.sort()
    return [
        {
            "benchmark": "redis_versions",
            "case": f"invalidation reaching another process ({len(delays)} bumps)",
            "variant": "RedisVersionStore",
            "p50_ms": round(statistics.median(delays) * 1000, 3),
            "p99_ms": round(delays[max(0, int(len(delays) * 0.99) - 1)] * 1000, 3),
        }
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Hit and ``stamp()`` cost per store, then propagation delay; one row each."""
    import redis

    from identity_middleware import LocalVersionStore, RedisVersionStore

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"needs Redis at {REDIS_URL}: {exc}") from None
    prefix = f"identity-bench:{secrets.token_hex(6)}:"
    shared = RedisVersionStore(REDIS_URL, prefix=prefix)
    try:
        if not shared.wait_synced(10):
            raise RuntimeError(f"RedisVersionStore did not sync with {REDIS_URL}")
        stores = {
            "LocalVersionStore": LocalVersionStore(),
            "RedisVersionStore": shared,
            "GET per request": GetPerRequestStore(client, prefix),
        }
        rows = _time_hits(stores, quick)
        rows += _time_propagation(shared, prefix, quick)
        if not shared.synced:
            raise RuntimeError("the Redis link dropped during the benchmark; numbers are void")
        return rows
    finally:
        shared.close()
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def _table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        if "us_per_call" in row:
            other = row.get("vs_get_per_request")
            vs_get = "" if other is None else f"{other:.4f}x"
            times = (f"{row['us_per_call']:.3f} us", f"{row['vs_local']:.2f}x", vs_get)
        else:
            times = (f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms", "", "")
        cells.append((row["case"], row["variant"], *times))
    return markdown_table(("case", "variant", "time", "vs LocalVersionStore", "vs GET per request"), cells)


if __name__ == "__main__":
    standalone("Version stamps through Redis", run, _table)
