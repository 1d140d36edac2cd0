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

**Stale window after ``invalidate()`` returns.** A worker process serves user 42
from its own cache in a loop, as requests would; this process writes a new version
to the "database" (a file), invalidates, and asks the worker when it last answered
the old version. The worst positive difference over all changes is the window in
which a request that started after ``invalidate()`` returned still got the old user
(0 = none). Measured on a private ``redis-server`` (so it can be frozen with
SIGSTOP), healthy and frozen, for:

* ``acknowledged`` -- what ships: ``invalidate()`` returns once every receiver
  applied and acknowledged the bump, and raises ``InvalidationUnconfirmed`` when
  Redis does not confirm (then there is no normal return; the row notes how long the
  worker kept answering the old user after the raise);
* ``fire-and-forget`` -- the previous design, for comparison: ``PUBLISH`` and return
  (on a frozen Redis: log, keep the bump for later, return).

The frozen rows use the default heartbeat (1 s), so each change there takes a few
seconds; ``--quick`` runs one.

Variants are interleaved within each repeat and the median of the repeats is
reported, so a noisy neighbour hits every variant alike. Needs the Redis at
``IDENTITY_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``); it uses a random
key prefix and deletes its keys afterwards, never flushing anything.

Run: ``python -m benchmarks.redis_versions [--quick]``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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


_STALE_WORKER = textwrap.dedent(
    """
    import sys, threading, time
    from identity_middleware import UserCache
    from identity_middleware.redis_versions import RedisVersionStore

    url, prefix, db_path = sys.argv[1], sys.argv[2], sys.argv[3]
    store = RedisVersionStore(url, prefix=prefix)
    cache = UserCache(versions=store, ttl=600)

    def loader(user_id):
        with open(db_path) as fh:
            return int(fh.read())

    last = {}  # version -> start time of the latest get that answered it

    def serve():
        while True:
            started = time.monotonic()
            last[cache.get("42", loader)] = started
            time.sleep(0.0002)

    assert store.wait_synced(10)
    threading.Thread(target=serve, daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "last":
            print(repr(last.get(int(command[1]), 0.0)), flush=True)
        elif command[0] == "served":  # wait until a get answered this version
            deadline = time.monotonic() + 15
            while int(command[1]) not in last and time.monotonic() < deadline:
                time.sleep(0.001)
            print(int(command[1]) in last, flush=True)
        elif command[0] == "synced":
            print(store.wait_synced(15), flush=True)
        elif command[0] == "quit":
            break
    """
)


class _PrivateRedis:
    """A throwaway ``redis-server`` on a free port that can be frozen (SIGSTOP)."""

    def __init__(self, binary: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="im-bench-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.close()
        raise RuntimeError("the private redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class _StaleProbe:
    """This process as the admin (commits, invalidates), one worker process as the reader."""

    def __init__(self, server: _PrivateRedis, root: str) -> None:
        from identity_middleware import UserCache
        from identity_middleware.redis_versions import RedisVersionStore

        self.server = server
        self.db_path = os.path.join(server.dir, "user-42.version")
        self.version = 1
        self._write(1)
        self.store = RedisVersionStore(server.url, prefix="stale:")
        self.cache = UserCache(versions=self.store, ttl=600)
        self.worker = subprocess.Popen(
            [sys.executable, "-c", _STALE_WORKER, server.url, "stale:", self.db_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env=dict(os.environ, PYTHONPATH=root),
        )
        if self.worker.stdout.readline().strip() != "ready" or not self.store.wait_synced(10):
            raise RuntimeError("the stale-window worker did not sync with Redis")

    def _write(self, version: int) -> None:
        with open(self.db_path + ".tmp", "w") as fh:
            fh.write(str(version))
        os.replace(self.db_path + ".tmp", self.db_path)
        self.version = version

    def ask(self, *command: object) -> str:
        self.worker.stdin.write(" ".join(map(str, command)) + "\n")
        self.worker.stdin.flush()
        return self.worker.stdout.readline().strip()

    def change(self, invalidate: Callable[[], None]) -> tuple[float, bool, float]:
        """Commit a new version and invalidate: (latest old answer - end of invalidate,
        whether it raised, how long it took)."""
        old = self.version
        self._write(old + 1)
        raised = False
        started = time.monotonic()
        try:
            invalidate()
        except Exception:  # noqa: BLE001 -- InvalidationUnconfirmed: no normal return
            raised = True
        ended = time.monotonic()
        if self.ask("served", old + 1) != "True":
            raise RuntimeError("the worker never served the new version")
        return float(self.ask("last", old)) - ended, raised, ended - started

    def close(self) -> None:
        try:
            self.ask("quit")
        except OSError:
            pass
        self.worker.kill()
        self.worker.wait(timeout=10)
        self.store.close()


def _fire_and_forget(store: Any) -> Callable[[], None]:
    """The previous design: bump here, PUBLISH, return -- no acknowledgements, never raises."""

    def invalidate() -> None:
        try:
            store._publish(store._client, "42")
        except Exception:  # noqa: BLE001 -- it logged and returned
            pass

    return invalidate


def _time_stale_windows(quick: bool) -> list[dict[str, Any]]:
    binary = shutil.which("redis-server")
    if binary is None:
        return [{"benchmark": "redis_versions", "case": "stale window after invalidate()",
                 "variant": "", "note": "skipped: no redis-server binary on PATH"}]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = _PrivateRedis(binary)
    rows = []
    try:
        probe = _StaleProbe(server, root)
        try:
            variants = {
                "acknowledged (ships)": lambda: probe.cache.invalidate("42"),
                "fire-and-forget (previous)": _fire_and_forget(probe.store),
            }
            healthy, frozen = (40, 1) if quick else (200, 3)
            took: dict[str, float] = {}
            for name, invalidate in variants.items():
                changes = [probe.change(invalidate) for _ in range(healthy)]
                windows = [window for window, _, _ in changes]
                took[name] = statistics.median(seconds for _, _, seconds in changes)
                stale = [w for w in windows if w > 0]
                rows.append({
                    "benchmark": "redis_versions",
                    "case": f"stale window after invalidate() returns, healthy Redis ({healthy} changes)",
                    "variant": name,
                    "worst_stale_ms": round(max(0.0, max(windows)) * 1000, 3),
                    "stale_changes": f"{len(stale)} of {healthy}",
                    "invalidate_p50": f"{took[name] * 1000:.3f} ms",
                })  # fmt: skip
            rows[-2]["vs_fire_and_forget"] = round(took["acknowledged (ships)"] / took["fire-and-forget (previous)"], 2)
            for name, invalidate in variants.items():
                after_return, after_raise = [], []
                for _ in range(frozen):
                    server.process.send_signal(signal.SIGSTOP)
                    try:
                        window, raised, _ = probe.change(invalidate)
                    finally:
                        server.process.send_signal(signal.SIGCONT)
                    (after_raise if raised else after_return).append(window)
                    if probe.ask("synced") != "True" or not probe.store.wait_synced(15):
                        raise RuntimeError("the worker did not resynchronise after the freeze")
                row: dict[str, Any] = {
                    "benchmark": "redis_versions",
                    "case": f"stale window after invalidate() returns, Redis frozen by SIGSTOP ({frozen} changes)",
                    "variant": name,
                    "worst_stale_ms": round(max([0.0, *after_return]) * 1000, 3),
                    "normal_returns": f"{len(after_return)} of {frozen}",
                }  # fmt: skip
                if after_raise:
                    # Negative: the worker's latest old answer started that long before the raise.
                    row["latest_old_answer_vs_raise"] = f"{max(after_raise) * 1000:+.0f} ms"
                rows.append(row)
        finally:
            probe.close()
    finally:
        server.close()
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Hit and ``stamp()`` cost per store, propagation delay, stale windows; one row each."""
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
    finally:
        shared.close()
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    return rows + _time_stale_windows(quick)


def _table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        if "us_per_call" in row:
            other = row.get("vs_get_per_request")
            vs_get = "" if other is None else f"{other:.4f}x"
            times = (f"{row['us_per_call']:.3f} us", f"{row['vs_local']:.2f}x", vs_get)
        elif "worst_stale_ms" in row:
            notes = "; ".join(f"{k}={v}" for k, v in row.items() if k not in ("benchmark", "case", "variant", "worst_stale_ms"))
            times = (f"worst {row['worst_stale_ms']} ms", notes, "")
        elif "note" in row:
            times = (row["note"], "", "")
        else:
            times = (f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms", "", "")
        cells.append((row["case"], row["variant"], *times))
    return markdown_table(("case", "variant", "time", "vs LocalVersionStore", "vs GET per request"), cells)


if __name__ == "__main__":
    standalone("Version stamps through Redis", run, _table)
