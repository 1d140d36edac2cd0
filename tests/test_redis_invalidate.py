"""``invalidate()``'s contract across real processes: after it returns, nobody serves the old user.

Every test runs a private ``redis-server`` (tests/redis_server.py) that it freezes
with SIGSTOP, kills or restarts, and real worker processes: each runs a
:class:`~identity_middleware.UserCache` over its own ``RedisVersionStore`` and a
thread that keeps asking for user 42, as requests would. The "database" is a file
holding the user's version; the test writes it (the commit), then invalidates from
its own process, and asks every worker for the start time of the latest get that
still answered the old version. ``time.monotonic()`` is CLOCK_MONOTONIC, system-wide
on Linux, so those times compare with the test's own.

A stale answer *after* ``invalidate()`` returned is a broken contract, whatever the
timing; the frozen-Redis case checks what the raised
:class:`~identity_middleware.InvalidationUnconfirmed` promises instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

redis = pytest.importorskip("redis")

from identity_middleware import InvalidationUnconfirmed, RedisVersionStore, UserCache  # noqa: E402
from redis_server import RedisServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "contract:"
#: Short, so that a frozen Redis is noticed quickly; the contract holds for any value.
HEARTBEAT = 0.2
WORKERS = 2

_WORKER = textwrap.dedent(
    """
    import sys, threading, time
    from identity_middleware import UserCache
    from identity_middleware.redis_versions import RedisVersionStore

    url, prefix, db_path, heartbeat = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    store = RedisVersionStore(url, prefix=prefix, heartbeat=heartbeat, socket_timeout=heartbeat)
    cache = UserCache(versions=store, ttl=600)

    def loader(user_id):
        with open(db_path) as fh:
            return {"version": int(fh.read())}

    last = {}  # version -> start time of the latest get that answered it

    def serve():
        while True:
            started = time.monotonic()
            last[cache.get("42", loader)["version"]] = started
            time.sleep(0.0005)

    assert store.wait_synced(10)
    threading.Thread(target=serve, daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "last":  # latest start of a get that answered this version
            print(repr(last.get(int(command[1]), 0.0)), flush=True)
        elif command[0] == "served":  # wait until some get answered this version
            deadline = time.monotonic() + float(command[2])
            while int(command[1]) not in last and time.monotonic() < deadline:
                time.sleep(0.001)
            print(int(command[1]) in last, flush=True)
        elif command[0] == "synced":
            print(store.wait_synced(float(command[1])), flush=True)
        elif command[0] == "degraded":  # wait until the link is known lost
            deadline = time.monotonic() + float(command[1])
            while store.synced and time.monotonic() < deadline:
                time.sleep(0.001)
            print(not store.synced, flush=True)
        elif command[0] == "hits":
            print(cache.stats().hits, flush=True)
        elif command[0] == "quit":
            break
    """
)


class Worker:
    """One worker process serving user 42 from its own cache."""

    def __init__(self, url: str, db_path: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, PREFIX, db_path, str(HEARTBEAT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )

    def ask(self, *command: object) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(" ".join(map(str, command)) + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def ready(self) -> None:
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def close(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, OSError):
            pass
        self.process.kill()
        self.process.wait(timeout=10)


class Site:
    """The test's own process (the admin who commits and invalidates) plus the workers."""

    def __init__(self, server: RedisServer, tmp_path) -> None:
        self.server = server
        self.db_path = str(tmp_path / "user-42.version")
        self.version = 1
        self.commit(1)
        self.store = RedisVersionStore(server.url, prefix=PREFIX, heartbeat=HEARTBEAT, socket_timeout=HEARTBEAT)
        self.cache = UserCache(versions=self.store, ttl=600)
        self.workers = [Worker(server.url, self.db_path) for _ in range(WORKERS)]
        for worker in self.workers:
            worker.ready()
        assert self.store.wait_synced(10)

    def commit(self, version: int) -> None:
        with open(self.db_path + ".tmp", "w") as fh:
            fh.write(str(version))
        os.replace(self.db_path + ".tmp", self.db_path)
        self.version = version

    def change_and_invalidate(self) -> tuple[int, float]:
        """Commit a new version, invalidate; the old version and when invalidate() returned."""
        old = self.version
        self.commit(old + 1)
        self.cache.invalidate("42")
        return old, time.monotonic()

    def last_served(self, version: int) -> list[float]:
        return [float(worker.ask("last", version)) for worker in self.workers]

    def wait_served(self, version: int, timeout: float = 10) -> None:
        assert all(worker.ask("served", version, timeout) == "True" for worker in self.workers)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.store.close()


@pytest.fixture
def site(tmp_path):
    with RedisServer() as server:
        running = Site(server, tmp_path)
        try:
            yield running
        finally:
            running.close()


def test_no_worker_answers_the_old_user_after_invalidate_returned(site):
    """Healthy Redis, 30 changes: every worker acknowledged before invalidate() returned."""
    site.wait_served(1)
    windows = []
    for _ in range(30):
        old, returned = site.change_and_invalidate()
        site.wait_served(old + 1)
        windows += [last - returned for last in site.last_served(old)]
        time.sleep(0.01)  # let the workers serve the new version from their caches a while
    hits = [int(worker.ask("hits")) for worker in site.workers]
    print(f"\nlatest old answer relative to invalidate() returning: max {max(windows) * 1000:.3f} ms")
    assert all(h > 60 for h in hits), hits  # the workers really served from their caches
    assert max(windows) <= 0, "a worker answered the old user after invalidate() returned"


def test_frozen_redis_makes_invalidate_raise_only_once_every_worker_stopped_trusting(site):
    """SIGSTOP: no confirmation, so no normal return -- and what the exception promises
    holds: this process reloads at once, and the workers (cut off too) answered the old
    user no later than the raise, because the store waited out their silence bound."""
    site.wait_served(1)
    loads = []
    site.cache.get("42", lambda user_id: loads.append(user_id) or {"version": site.version})
    site.server.pause()
    frozen = time.monotonic()
    try:
        with pytest.raises(InvalidationUnconfirmed) as caught:
            site.change_and_invalidate()
        raised = time.monotonic()
        assert caught.value.key == "42" and caught.value.replayed
        site.cache.get("42", lambda user_id: loads.append(user_id) or {"version": site.version})
        assert len(loads) == 2  # this process reloaded at once
        assert all(worker.ask("degraded", 10) == "True" for worker in site.workers)
        last_old = max(site.last_served(1))
        print(
            f"\nfrozen Redis: invalidate() raised {(raised - frozen) * 1000:.0f} ms after the freeze "
            f"(silence bound {site.store.silence_bound:.2f} s); the workers' latest old answer "
            f"started {(raised - last_old) * 1000:.0f} ms before the raise"
        )
        assert last_old <= raised
        site.wait_served(2)  # degraded workers load: the new version, never a cached old one
    finally:
        site.server.resume()
    assert site.store.wait_synced(10)
    assert all(worker.ask("synced", 10) == "True" for worker in site.workers)
    old, returned = site.change_and_invalidate()  # back: the normal contract again
    site.wait_served(old + 1)
    assert max(site.last_served(old)) <= returned


def test_redis_restarted_empty_keeps_the_contract(site):
    site.wait_served(1)
    site.server.kill()
    with pytest.raises(InvalidationUnconfirmed):
        site.change_and_invalidate()  # in the gap: refused, not a false "done"
    site.server.start()  # empty: no data, no subscribers until they come back
    assert site.store.wait_synced(10)
    assert all(worker.ask("synced", 10) == "True" for worker in site.workers)
    site.wait_served(2)
    for _ in range(5):
        old, returned = site.change_and_invalidate()
        site.wait_served(old + 1)
        assert max(site.last_served(old)) <= returned


def test_a_receiver_that_never_acknowledges_is_waited_out(caplog):
    """A subscriber that does not acknowledge (here a bare redis-py one; in real life a
    worker cut off after Redis handed it the bump) costs a wait of ``silence_bound``
    after Redis confirmed -- by then a worker that did not apply the bump has stopped
    trusting its mirror -- and a WARNING, never a false early return."""
    with RedisServer() as server:
        store = RedisVersionStore(server.url, prefix=PREFIX, heartbeat=0.1, confirm_timeout=0.2)
        foreign = redis.Redis.from_url(server.url).pubsub()
        try:
            assert store.wait_synced(10)
            foreign.subscribe(f"{PREFIX}bump")
            assert foreign.get_message(timeout=5)["type"] == "subscribe"
            with caplog.at_level(logging.WARNING, logger="identity_middleware"):
                started = time.monotonic()
                store.bump("42")
                took = time.monotonic() - started
            assert took >= store.silence_bound
            assert any("1 of 2 receivers did not acknowledge" in r.getMessage() for r in caplog.records)
            assert foreign.get_message(timeout=5)["type"] == "message"  # it was delivered
        finally:
            foreign.close()
            store.close()
