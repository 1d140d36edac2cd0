"""RedisVersionStore on a healthy Redis: bumps reach every process, stamps stay local.

Runs against the shared Redis at 127.0.0.1:6379 with a unique key prefix per test
(never flushed; the test's own keys are deleted afterwards). URL flavours that need
a server configured differently (password, unix socket, TLS) get a private
``redis-server`` from ``tests/redis_server.py``. Failure behaviour lives in
``test_redis_faults.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

redis = pytest.importorskip("redis")

from conftest import wait_for  # noqa: E402
from identity_middleware import ConfigError, InvalidationUnconfirmed, RedisVersionStore, UserCache  # noqa: E402
from identity_middleware.config import redacted  # noqa: E402
from redis_server import RedisServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shared(redis_url, redis_prefix):
    """A raw client on the shared Redis; deletes the test's keys afterwards."""
    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{redis_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def make_store(redis_url, redis_prefix, shared):
    """Stores on the shared Redis with this test's prefix, closed afterwards."""
    stores = []

    def make(**options):
        options.setdefault("prefix", redis_prefix)
        store = RedisVersionStore(options.pop("url", redis_url), **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def synced(store) -> RedisVersionStore:
    assert store.wait_synced(10), f"{store!r} did not sync"
    return store


# -- one process --------------------------------------------------------------------


def test_stamps_are_stable_between_bumps(make_store):
    store = synced(make_store())
    assert store.stamp("1") == store.stamp("1")
    assert hash(store.stamp("1")) == hash(store.stamp("1"))
    assert store.stamp("1") != store.stamp("2") or store.stamp("1")[1] == 0


def test_a_fresh_worker_caches_from_its_first_request(make_store):
    """No wait_synced(): the first stamp waits for the first connect, so no double load."""
    cache, loads = UserCache(versions=make_store(), ttl=300), []

    def loader(user_id):
        loads.append(user_id)
        return {"id": user_id}

    assert cache.get(1, loader) is cache.get(1, loader)
    assert loads == [1]


def test_a_process_that_only_invalidates_starts_no_thread(make_store, redis_prefix):
    """A gunicorn master seeding users with --preload must have no thread to fork."""
    witness = synced(make_store())  # another worker: its listener is the one thread
    one, everyone = witness.stamp("1"), witness.stamp("2")
    listeners = [t for t in threading.enumerate() if t.name == f"identity-versions[{redis_prefix}]"]
    store = make_store()
    store.bump("1")  # returns once the witness acknowledged: no waiting for it here
    assert witness.stamp("1") != one and witness.stamp("2") == everyone
    store.bump_all()
    assert witness.stamp("2") != everyone
    assert [t for t in threading.enumerate() if t.name == f"identity-versions[{redis_prefix}]"] == listeners


def test_bump_changes_the_stamp_in_the_bumping_process_before_it_returns(make_store):
    store = synced(make_store())
    seen = {store.stamp("7")}
    for _ in range(5):
        store.bump("7")
        now = store.stamp("7")
        assert now not in seen
        seen.add(now)
    other = store.stamp("8")
    store.bump("7")
    assert store.stamp("8") == other  # one user's bump leaves the others alone


def test_bump_all_changes_every_stamp_before_it_returns(make_store):
    store = synced(make_store())
    store.bump("1")
    before = {key: store.stamp(key) for key in ("1", "2", "3")}
    store.bump_all()
    for key, stamp in before.items():
        assert store.stamp(key) != stamp


def test_invalidations_leave_no_keys_in_redis(make_store, shared, redis_prefix):
    """Bounded: 1,000 distinct invalidated users (and a bump_all) leave 0 keys behind --
    nothing per user is stored, and the acknowledgement lists are consumed."""
    store, other = synced(make_store()), synced(make_store())
    for user in range(1_000):
        store.bump(str(user))
    other.bump_all()
    keys = list(shared.scan_iter(match=f"{redis_prefix}*"))
    print(f"\nkeys under the prefix after 1,000 invalidations: {len(keys)}")
    assert keys == []


def test_a_bump_reaches_another_store_on_the_same_prefix(make_store):
    sender, receiver = synced(make_store()), synced(make_store())
    user, everyone = receiver.stamp("5"), receiver.stamp("6")
    sender.bump("5")
    assert wait_for(lambda: receiver.stamp("5") != user)
    assert receiver.stamp("6") == everyone
    sender.bump_all()
    assert wait_for(lambda: receiver.stamp("6") != everyone)


def fence(sender, receiver) -> None:
    """Wait until ``receiver`` heard a bump ``sender`` publishes now.

    Redis delivers one subscriber's messages in the order it executed the PUBLISHes,
    so everything published before the fence has reached ``receiver`` too.
    """
    before = receiver.stamp("fence")
    sender.bump("fence")
    assert wait_for(lambda: receiver.stamp("fence") != before)


def test_another_prefix_is_another_app(make_store, redis_prefix, shared):
    mine = synced(make_store())
    theirs = synced(make_store(prefix=redis_prefix + "other:"))
    their_fence = synced(make_store(prefix=redis_prefix + "other:"))
    before = theirs.stamp("5")
    mine.bump("5")
    mine.bump_all()
    fence(their_fence, theirs)
    assert theirs.stamp("5") == before
    assert shared.get(f"{redis_prefix}other:v:5") is None


def test_own_bump_coming_back_from_redis_is_not_counted_twice(make_store):
    """The bumping process already applied its bump; its echo must not cost another miss."""
    store, other = synced(make_store()), synced(make_store())
    store.bump("9")
    after_bump = store.stamp("9")
    fence(other, store)  # the echo of "9" was published before the fence
    assert store.stamp("9") == after_bump


def test_stamp_does_no_network_io(tmp_path):
    """100,000 stamps cost the server nothing: Redis sees only the heartbeat."""
    with RedisServer() as server:
        store = RedisVersionStore(server.url, prefix="p:")
        try:
            synced(store)
            admin = redis.Redis.from_url(server.url)
            before = admin.info("stats")["total_commands_processed"]
            for i in range(100_000):
                store.stamp(str(i % 50))
            after = admin.info("stats")["total_commands_processed"]
            assert after - before <= 10  # one INFO, a few PINGs at most
        finally:
            store.close()


def test_user_cache_serves_hits_and_reloads_after_a_bump_elsewhere(make_store):
    here = UserCache(versions=synced(make_store()), ttl=300)
    there = UserCache(versions=synced(make_store()), ttl=300)
    loads = []

    def loader(user_id):
        loads.append(user_id)
        return {"id": user_id, "load": len(loads)}

    first = here.get(3, loader)
    assert here.get("3", loader) is first and loads == [3]
    there.invalidate(3)
    assert wait_for(lambda: here.get(3, loader) is not first)
    assert loads == [3, 3]


def test_accepts_a_ready_client_and_leaves_it_open(redis_url, redis_prefix, shared):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store, witness = RedisVersionStore(client, prefix=redis_prefix), None
    try:
        witness = synced(RedisVersionStore(redis_url, prefix=redis_prefix))
        synced(store)
        before = store.stamp("1")
        witness.bump("1")  # received through a decode_responses=True client
        assert wait_for(lambda: store.stamp("1") != before)
    finally:
        store.close()
        if witness is not None:
            witness.close()
    assert client.ping() is True


# -- URLs and configuration ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/abc",  # redis-py would silently use db 0
        "redis://127.0.0.1:6379/1/2",  # ... or db 12
        "redis://127.0.0.1:6379/-1",
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1:abc/0",
        "redis://127.0.0.1:0/0",
        "redis://",
        "redis:///0",
        "redis:/127.0.0.1",
        "redis://127.0.0.1/0?db=x",
        "redis://127.0.0.1/0?socket_timeout=soon",
        "redis://127.0.0.1/0#fragment",
        "redis://127.0.0 .1/0",
        "unix://",
        "unix://relative/path.sock",  # would silently mean /path.sock
        "redis://127.0.0.1/0?no_such_option=1",  # redis-py would fail only when connecting
        "rediss://127.0.0.1/0?ssl_cert_reqs=bogus",
        "http://127.0.0.1:6379/0",
        "local",
        "",
    ],
)
def test_malformed_urls_are_config_errors_naming_setting_and_value(url):
    with pytest.raises(ConfigError) as caught:
        RedisVersionStore(url)
    shown = redacted(url)  # a fragment or an unknown query parameter could hold a secret
    assert caught.value.name == "IDENTITY_VERSION_STORE"
    assert caught.value.value == shown
    assert "IDENTITY_VERSION_STORE" in str(caught.value) and repr(shown) in str(caught.value)


def test_a_password_never_appears_in_a_config_error():
    with pytest.raises(ConfigError) as caught:
        RedisVersionStore("redis://:hunter2@127.0.0.1:6379/abc")
    assert "hunter2" not in str(caught.value)
    assert "IDENTITY_VERSION_STORE" in str(caught.value)


def test_the_setting_selects_redis_and_rejects_bad_urls(monkeypatch, redis_url, redis_prefix):
    from flask import Flask

    app = Flask(__name__)
    app.config["IDENTITY_VERSION_STORE"] = "redis://127.0.0.1:6379/db0"
    with pytest.raises(ConfigError, match="IDENTITY_VERSION_STORE"):
        UserCache(app)
    monkeypatch.setenv("IDENTITY_VERSION_STORE", redis_url)
    cache = UserCache(app)
    try:
        assert isinstance(cache.versions, RedisVersionStore)
    finally:
        cache.close()


def test_not_a_client_is_a_type_error():
    with pytest.raises(TypeError, match="Redis URL or a redis.Redis client"):
        RedisVersionStore(6379)


def test_password_in_the_url(caplog):
    with RedisServer(extra=("--requirepass", "s3cret")) as server:
        good = RedisVersionStore(f"redis://:s3cret@127.0.0.1:{server.port}/0", prefix="p:")
        bad = RedisVersionStore(f"redis://:wrong@127.0.0.1:{server.port}/0", prefix="p:")
        try:
            with caplog.at_level("WARNING", logger="identity_middleware"):
                assert good.wait_synced(10)
                assert not bad.wait_synced(0.5)  # degraded, not crashed
                assert bad.stamp("1") != bad.stamp("1")
                with pytest.raises(InvalidationUnconfirmed) as caught:
                    bad.bump("1")  # degraded: the caller is told, without the password
                assert "wrong" not in str(caught.value) and "***" in str(caught.value)
            assert "s3cret" not in repr(good) and "wrong" not in repr(bad)
            assert "wrong" not in caplog.text and "s3cret" not in caplog.text
            assert any("cannot reach Redis" in r.getMessage() for r in caplog.records)
        finally:
            good.close()
            bad.close()


def assert_a_bump_reaches_another_store(url: str) -> None:
    """Two stores on ``url``: one bumps, the other sees the stamp move."""
    a = RedisVersionStore(url, prefix="p:")
    b = RedisVersionStore(url, prefix="p:")
    try:
        synced(a), synced(b)
        before = b.stamp("1")
        a.bump("1")
        assert wait_for(lambda: b.stamp("1") != before)
    finally:
        a.close()
        b.close()


def test_unix_socket_url(tmp_path):
    sock = str(tmp_path / "redis.sock")
    with RedisServer(extra=("--unixsocket", sock, "--unixsocketperm", "700")):
        assert_a_bump_reaches_another_store(f"unix://{sock}?db=0")


def test_rediss_url_with_tls():
    with RedisServer(tls=True) as server:
        assert_a_bump_reaches_another_store(f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={server.ca_file}")


# -- several processes ---------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from identity_middleware import UserCache
    from identity_middleware.redis_versions import RedisVersionStore

    url, prefix = sys.argv[1], sys.argv[2]
    cache = UserCache(versions=RedisVersionStore(url, prefix=prefix), ttl=600)
    loads = 0

    def loader(user_id):
        global loads
        loads += 1
        return (user_id, loads)

    assert cache.versions.wait_synced(10)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "arm":  # cache user 42 and prove the next get is a hit
            cache.get("42", loader)
            before = loads
            cache.get("42", loader)
            print("armed", loads - before, flush=True)
        elif command[0] == "watch":  # report when a get first has to load again
            before = loads
            print("watching", flush=True)
            deadline = time.monotonic() + 10
            while loads == before and time.monotonic() < deadline:
                cache.get("42", loader)
                time.sleep(0.0002)  # let the listener thread have the GIL
            print("loaded", time.monotonic(), loads - before, flush=True)
        elif command[0] == "quit":
            break
    cache.close()
    """
)


def test_invalidation_in_one_process_reaches_another_and_measure_the_delay(
    make_store, redis_url, redis_prefix
):
    """Two processes, each with its own UserCache: 200 invalidations, delay p50/p99."""
    cache = UserCache(versions=synced(make_store()), ttl=600)
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, redis_url, redis_prefix],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )

    def ask(command: str) -> list[str]:
        child.stdin.write(command + "\n")
        child.stdin.flush()
        return child.stdout.readline().split()

    try:
        assert child.stdout.readline().strip() == "ready"
        delays = []
        for _ in range(200):
            assert ask("arm") == ["armed", "0"]  # the second get was a hit
            assert ask("watch") == ["watching"]
            started = time.monotonic()
            cache.invalidate("42")
            reply = child.stdout.readline().split()
            assert reply[0] == "loaded" and reply[2] == "1", reply  # loaded fresh, once
            delays.append(float(reply[1]) - started)
        ask("quit")
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[int(len(delays) * 0.99) - 1]
    print(
        f"\ninvalidation propagation between processes over {len(delays)} invalidations "
        f"(from the start of invalidate() to the other process's first reload): "
        f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {delays[-1] * 1000:.2f} ms"
    )
    assert p99 < 1.0


def _forked_worker(store, role, conn):
    """Runs in a child forked from a process whose store was already in use."""
    try:
        assert not store.synced  # nothing inherited: the parent's mirror and thread stay there
        assert store.wait_synced(10)
        names = [t.name for t in threading.enumerate() if t.name.startswith("identity-versions")]
        assert len(names) == 1, names  # its own listener, just one
        conn.send("ready")
        if role == "receiver":
            before = store.stamp("7")
            conn.recv()  # "go": a sibling bumps now
            ok = wait_for(lambda: store.stamp("7") != before, timeout=10)
            conn.send("seen" if ok else "missed")
        else:
            conn.recv()
            store.bump("7")
            conn.send("bumped")
        conn.recv()
    except BaseException as exc:  # report, do not hang the parent
        conn.send(f"error {exc!r}")
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_workers_get_their_own_thread_and_connections_and_see_each_other(make_store):
    """gunicorn --preload: the store is created (and used) before the workers fork."""
    store = synced(make_store())
    parent_stamp = store.stamp("7")
    context = multiprocessing.get_context("fork")
    pipes, workers = [], []
    for role in ("receiver", "sender"):
        parent_end, child_end = context.Pipe()
        worker = context.Process(target=_forked_worker, args=(store, role, child_end), daemon=True)
        worker.start()
        pipes.append(parent_end)
        workers.append(worker)
    try:
        for pipe in pipes:
            assert pipe.poll(15), "a forked worker did not start"
            assert pipe.recv() == "ready"
        receiver, sender = pipes
        receiver.send("go")
        sender.send("go")
        assert sender.recv() == "bumped"
        assert receiver.poll(15) and receiver.recv() == "seen"  # sibling tokens differ
        assert wait_for(lambda: store.stamp("7") != parent_stamp)  # and the parent heard it
        for pipe in pipes:
            pipe.send("done")
    finally:
        for worker in workers:
            worker.join(timeout=10)
    assert [w.exitcode for w in workers] == [0, 0]
    assert store.synced  # the parent's store is untouched by its children


# -- keys of any string, refusals, bounded memory -------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["\ud800", "a\udfffb", "user with spaces", "", "\x00", "ünïcødé", "💥", "x" * 10_000],
    ids=["lone high surrogate", "lone low surrogate", "spaces", "empty", "NUL", "accents", "emoji", "long"],
)
def test_any_string_key_is_delivered_and_never_switches_the_store_off(make_store, key):
    """A lone surrogate (from JSON or a command line) used to make redis-py raise; the store
    took it for an outage and failed on it at every reconnect, off for good."""
    sender, receiver = synced(make_store()), synced(make_store())
    cache = UserCache(versions=receiver, ttl=300)
    loads = []

    def loader(user_id):
        loads.append(user_id)
        return {"id": user_id}

    cache.get(key, loader)
    cache.get("1", loader)
    mine, other = receiver.stamp(key), receiver.stamp("1")
    sender.bump(key)  # returns normally: delivered and acknowledged
    assert receiver.stamp(key) != mine and receiver.stamp("1") == other  # exactly that key
    assert sender.synced and receiver.synced
    cache.get(key, loader)
    cache.get("1", loader)
    assert loads == [key, "1", key]  # that user reloaded, the other still a hit
    UserCache(versions=sender, ttl=300).invalidate(key)  # through the cache too
    assert receiver.stamp(key) != mine and sender.synced and receiver.synced


def test_a_refused_invalidation_fails_alone_at_the_caller():
    """Redis answers but refuses (here: PUBLISH renamed away, as an ACL would): the caller
    gets the error, nothing is kept for a replay, and the store stays on."""
    with RedisServer(extra=("--rename-command", "PUBLISH", "")) as server:
        store = RedisVersionStore(server.url, prefix="p:")
        try:
            synced(store)
            cache, loads = UserCache(versions=store, ttl=300), []
            cache.get("1", lambda user_id: loads.append(user_id) or user_id)
            with pytest.raises(InvalidationUnconfirmed, match="refused") as caught:
                store.bump("2")
            assert not caught.value.replayed
            assert isinstance(caught.value.__cause__, redis.ResponseError)
            assert store.synced  # not an outage: the mirror is still trusted
            cache.get("1", lambda user_id: loads.append(user_id) or user_id)
            assert loads == ["1"]  # hits go on
        finally:
            store.close()


def test_the_mirror_stays_within_max_keys(make_store):
    """Bounded: 1,500 distinct invalidations heard, at most max_keys counters mirrored;
    overflowing starts a new epoch, so a stamp never returns to an old value."""
    sender, receiver = synced(make_store()), synced(make_store(max_keys=500))
    first = receiver.stamp("0")
    most = 0
    for user in range(1_500):
        sender.bump(str(user))
        most = max(most, receiver.mirrored)
    print(f"\nmirror after 1,500 distinct invalidations: {receiver.mirrored} counters (most {most})")
    assert most <= 500
    assert receiver.stamp("0") != first
