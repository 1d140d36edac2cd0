"""UserCache under real threads: single flight, failing loads, the in-flight
invalidation race, and a soak of gets and invalidations checking freshness.

Every wait is bounded, so a bug shows up as a failed assertion, not a hung run.
"""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, scoped_session, sessionmaker

from identity_middleware import UserCache

JOIN_TIMEOUT = 10.0  # seconds; generous for a loaded 2-core machine, never reached when correct


@pytest.fixture(autouse=True)
def _no_settings_in_environment(monkeypatch):
    for name in ("IDENTITY_CACHE_TTL", "IDENTITY_CACHE_MAXSIZE", "IDENTITY_CACHE_NEGATIVE_TTL", "IDENTITY_VERSION_STORE"):
        monkeypatch.delenv(name, raising=False)


def run_threads(count, target):
    """Start ``count`` threads on ``target(index)``; return per-thread results or exceptions."""
    results: list[object] = [None] * count

    def body(index):
        try:
            results[index] = ("ok", target(index))
        except BaseException as exc:  # noqa: BLE001 -- the test inspects it
            results[index] = ("error", exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"{len(hung)} threads still waiting after {JOIN_TIMEOUT}s"
    return results


def get_all_at_once(cache, count, loader):
    """``count`` threads released together, each calling ``cache.get("1", loader)``."""
    barrier = threading.Barrier(count)

    def get(_):
        barrier.wait(JOIN_TIMEOUT)
        return cache.get("1", loader)

    return run_threads(count, get)


def test_stampede_on_a_cold_key_runs_one_load():
    cache = UserCache()
    calls = []

    def slow_loader(user_id):
        calls.append(user_id)
        time.sleep(0.05)
        return {"id": user_id}

    results = get_all_at_once(cache, 32, slow_loader)
    assert len(calls) == 1
    assert all(kind == "ok" for kind, _ in results)
    values = {id(value) for _, value in results}
    assert len(values) == 1  # everyone got the one loaded object (no adapter)
    stats = cache.stats()
    assert stats.loads == 1 and stats.hits + stats.misses == 32


def test_waiters_each_get_their_own_handout_from_the_adapter():
    cache = UserCache()

    class Adapter:
        def __init__(self):
            self.stored = 0
            self.handed = 0

        def to_cache(self, value):
            self.stored += 1
            return tuple(value)

        def from_cache(self, stored):
            self.handed += 1
            return list(stored)

    cache.adapter = adapter = Adapter()

    def slow_loader(user_id):
        time.sleep(0.05)
        return ["alice", "admin"]

    results = get_all_at_once(cache, 8, slow_loader)
    values = [value for _, value in results]
    assert all(value == ["alice", "admin"] for value in values)
    assert len({id(value) for value in values}) == 8
    assert adapter.stored == 1 and adapter.handed == 8


def test_a_loader_that_raises_once_releases_every_caller_and_one_retries():
    cache = UserCache()
    calls = []

    def flaky(user_id):
        calls.append(user_id)
        time.sleep(0.05)
        if len(calls) == 1:
            raise ConnectionError("database restarting")
        return "alice"

    results = get_all_at_once(cache, 32, flaky)
    errors = [value for kind, value in results if kind == "error"]
    assert len(errors) == 1 and isinstance(errors[0], ConnectionError)
    assert [value for kind, value in results if kind == "ok"] == ["alice"] * 31
    assert len(calls) == 2  # the failed load and exactly one retry
    assert cache.get("1", flaky) == "alice"
    assert len(calls) == 2
    stats = cache.stats()
    assert (stats.loads, stats.load_errors) == (2, 1)


def test_a_loader_that_always_raises_fails_every_caller_one_at_a_time():
    cache = UserCache()
    running = []
    overlap = []

    def broken(user_id):
        running.append(1)
        overlap.append(len(running))
        time.sleep(0.005)
        running.pop()
        raise ConnectionError("down")

    results = get_all_at_once(cache, 16, broken)
    assert all(kind == "error" and isinstance(value, ConnectionError) for kind, value in results)
    assert max(overlap) == 1  # retries are one at a time, never a stampede
    assert cache.stats().size == 0 and cache.stats().load_errors == len(overlap)


def test_no_lock_is_held_while_a_loader_runs():
    cache = UserCache()
    entered, release = threading.Event(), threading.Event()

    def blocked(user_id):
        entered.set()
        release.wait(JOIN_TIMEOUT)
        return "slow"

    worker = threading.Thread(target=cache.get, args=("1", blocked), daemon=True)
    worker.start()
    try:
        assert entered.wait(JOIN_TIMEOUT)
        # Another key, an invalidation and the stats all go through while "1" loads.
        other = run_threads(1, lambda _: (cache.get("2", lambda uid: "fast"), cache.invalidate("3"), cache.stats()))
        assert other[0][0] == "ok" and other[0][1][0] == "fast"
    finally:
        release.set()
        worker.join(JOIN_TIMEOUT)


class FirstLoadHeld:
    """A loader reading ``database``; its first call is held, value read, until ``release`` is set."""

    def __init__(self, database):
        self.database = database
        self.loads = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, user_id):
        value = self.database[user_id]  # read at the start, like a SELECT
        self.loads.append(value)
        if len(self.loads) == 1:
            self.entered.set()
            self.release.wait(JOIN_TIMEOUT)
        return value


def test_invalidation_during_a_load_makes_its_result_stale_at_once():
    cache = UserCache()
    database = {"1": "admin"}
    loader = FirstLoadHeld(database)
    first = run_threads_in_background(lambda: cache.get("1", loader))
    assert loader.entered.wait(JOIN_TIMEOUT)
    database["1"] = "revoked"
    cache.invalidate("1")  # lands while the first load is in flight
    # A get that starts now must not wait for, or receive, the in-flight stale load.
    assert cache.get("1", loader) == "revoked"
    loader.release.set()
    assert first.result() == "admin"  # the request that started before may see the old value
    # ...but the old value was not stored over the new one, and is never served again.
    for _ in range(3):
        assert cache.get("1", loader) == "revoked"
    assert loader.loads == ["admin", "revoked"]


def test_the_stale_in_flight_result_is_not_served_to_the_next_get():
    cache = UserCache()
    database = {"1": 1}
    loader = FirstLoadHeld(database)
    first = run_threads_in_background(lambda: cache.get("1", loader))
    assert loader.entered.wait(JOIN_TIMEOUT)
    database["1"] = 2
    cache.invalidate("1")
    loader.release.set()
    assert first.result() == 1
    assert cache.get("1", loader) == 2  # reloads: the stored result carried the old stamp
    assert loader.loads == [1, 2]


class run_threads_in_background:
    def __init__(self, function):
        self._result = self._error = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function):
        try:
            self._result = function()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc

    def result(self):
        self._thread.join(JOIN_TIMEOUT)
        assert not self._thread.is_alive(), "background get hung"
        if self._error is not None:
            raise self._error
        return self._result


def test_soak_a_get_after_invalidate_never_sees_older_data():
    """8 threads, thousands of mixed gets and invalidations over 50 keys.

    The "database" holds a version per key; an invalidator bumps it, then calls
    ``invalidate``, then publishes the version as the floor. A get reads the floor
    *before* it starts, so whatever it receives must be at least that version.
    A small ``maxsize`` keeps evictions racing with lock-free hits.
    """
    keys = [str(i) for i in range(50)]
    database = dict.fromkeys(keys, 0)
    floor = dict.fromkeys(keys, 0)
    write_lock = threading.Lock()
    cache = UserCache(maxsize=32)
    gets = [0] * 8
    violations = []

    def loader(user_id):
        version = database[user_id]  # read first, like a SELECT at the start of the load
        if random.random() < 0.2:
            time.sleep(0)  # let other threads in mid-load
        return (user_id, version)

    def worker(index):
        rng = random.Random(index)
        for _ in range(3000):
            key = rng.choice(keys)
            if rng.random() < 0.15:
                with write_lock:
                    database[key] += 1
                    version = database[key]
                cache.invalidate(key)
                with write_lock:
                    floor[key] = max(floor[key], version)
            else:
                minimum = floor[key]
                got_key, version = cache.get(key, loader)
                gets[index] += 1
                if got_key != key or version < minimum:
                    violations.append((key, version, minimum))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads far more often than usual
    try:
        results = run_threads(8, worker)
    finally:
        sys.setswitchinterval(interval)
    assert all(kind == "ok" for kind, _ in results), results
    assert violations == []
    stats = cache.stats()
    assert stats.hits + stats.misses == sum(gets)
    assert stats.hits > 0 and stats.invalidations > 0 and stats.evictions > 0
    assert stats.size <= 32


# -- the same promise through bind_sqlalchemy against real PostgreSQL ------------------------


class _SoakBase(DeclarativeBase):
    pass


class Account(_SoakBase):
    __tablename__ = "soak_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(default=0)


@pytest.mark.parametrize("isolation", ["READ COMMITTED", "REPEATABLE READ"])
def test_soak_bind_sqlalchemy_never_serves_older_than_a_committed_invalidation(postgres_url, isolation):
    """4 request threads and 1 writer over 5 users in real PostgreSQL.

    The writer bumps a user's ``version`` column and commits (the binding invalidates
    after commit), then publishes the version as the floor. A request reads the floor
    when it starts, then -- at random -- touches the user first, runs another query
    first (under REPEATABLE READ that fixes its snapshot), or loads the user row into
    its identity map first; then it gets the user through the cache. Its own view is
    never older than the floor it read, so anything older came from an entry stored
    under a stamp newer than its data: the race the store rule closes.
    """
    from identity_middleware.sqlalchemy import bind_sqlalchemy

    keys = [str(i) for i in range(1, 6)]
    engine = create_engine(postgres_url, isolation_level=isolation, pool_size=8)
    _SoakBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(Account(id=int(k)) for k in keys)
        s.commit()
    factory = sessionmaker(engine)
    db = scoped_session(factory)  # one session per thread, as one per request
    cache = UserCache(ttl=300)
    binding = bind_sqlalchemy(cache, db, Account)
    floor = dict.fromkeys(keys, 0)
    floor_lock = threading.Lock()
    violations: list[tuple] = []
    done = threading.Event()

    def loader(user_id):
        return db.get(Account, int(user_id))

    def request_thread(index):
        rng = random.Random(index)
        for _ in range(120):
            key = rng.choice(keys)
            minimum = floor[key]
            mode = rng.randrange(3)
            held = None
            if mode == 1:
                db.scalar(select(Account.version).where(Account.id == int(rng.choice(keys))))
            elif mode == 2:
                held = db.get(Account, int(key))  # in the identity map before the loader runs
            if mode:
                time.sleep(rng.random() / 1000)  # let the writer commit in between
            version = cache.get(key, loader).version
            if version < minimum:
                violations.append((key, version, minimum, mode))
            del held
            db.remove()

    def writer(_):
        rng = random.Random(99)
        while not done.is_set():
            key = rng.choice(keys)
            with factory() as s:
                account = s.get(Account, int(key))
                account.version += 1
                s.commit()  # the binding invalidates the account after this commit
                version = account.version
            with floor_lock:
                floor[key] = max(floor[key], version)
            time.sleep(rng.random() / 500)

    writer_thread = run_threads_in_background(lambda: writer(0))
    try:
        results = run_threads(4, request_thread)
    finally:
        done.set()
        writer_thread.result()
        binding.remove()
        db.remove()
        engine.dispose()
    assert all(kind == "ok" for kind, _ in results), results
    assert violations == []
    stats = cache.stats()
    assert stats.hits > 0 and stats.invalidations > 0
