"""Version stamps shared through Redis, so ``invalidate()`` reaches every worker and host.

Each process keeps its users in its own :class:`~identity_middleware.UserCache`;
only the *fact* that a user changed travels through Redis. ``bump(key)`` runs one
small Lua script that ``INCR``\\s the user's counter (``<prefix>v:<key>``; the
global generation is ``<prefix>gen``) and ``PUBLISH``\\es the bump on
``<prefix>bump`` in the same atomic step, so a bump is never recorded without being
announced. Every process mirrors the stamps in local memory and a daemon thread
applies the bumps it hears, so ``stamp()`` -- called on every cache hit -- reads a
dict and never touches the network.

Why pub/sub and not keyspace notifications: notifications need
``notify-keyspace-events`` set on the server (often locked down on managed Redis,
and server-wide, so every app on that Redis pays for every key event), they carry no
payload (a receiver cannot tell its own bump from someone else's), and they are
delivered over pub/sub anyway, with the same at-most-once guarantee. A channel of our
own needs no server configuration and carries exactly what a receiver needs.

Pub/sub is at-most-once: a message sent while a subscriber is disconnected is lost.
So the mirror is trusted only while the subscription is known to be alive. The
moment the link is lost -- a connection error, the subscriber dropped or silently
reconnected by redis-py, no answer to the heartbeat ``PING``, Redis restarted --
``stamp()`` returns a fresh ``object()`` on every call: the cache serves nothing and
every request loads its user from the database. Requests never see an exception.

**Resynchronising.** After a reconnect the listener first subscribes and waits for
the server's confirmation, and only then starts a new *epoch*: an empty mirror
compared by identity, so every stamp handed out before compares unequal and every
entry cached before is stale. Reading the counters back from Redis is not needed:
an entry loaded in the new epoch read its stamp after the subscription was
confirmed, so its database read happened after any bump we could have missed
(the bumping process commits before it bumps), and every later bump reaches us.
The same argument covers a Redis that restarted with empty data or was flushed:
stamps mix in the process-local epoch and count bumps locally, never the Redis
counters, so counters that went backwards cannot make an old stamp valid again.

**Invalidating while Redis is unreachable.** ``bump()`` never raises. It logs a
WARNING, bumps this process at once (it is degraded anyway, so it serves nothing
stale), and remembers the key; the listener sends the remembered bumps once the
link is back. Other processes that lost their link too are degraded and start a
new epoch on reconnect, so they cannot serve the old user either. The gap is a
*partial* partition: a process that still reaches Redis while this one does not
keeps serving its cached entry until the replay arrives or the entry's TTL ends.

**Workers.** The listener thread is a daemon and :meth:`RedisVersionStore.close`
stops it within a poll interval. After ``os.fork()`` (gunicorn ``--preload``) the
child drops the parent's mirror, thread, subscription and pending bumps, takes a
new process token and starts its own listener on first use; redis-py's connection
pool already refuses to share sockets across a fork. This relies on
``os.register_at_fork``, which ``os.fork``, ``multiprocessing`` and gunicorn go
through; a C extension that forks without ``PyOS_AfterFork_Child`` would leave the
child trusting a mirror nobody updates.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Hashable

from .config import SETTINGS, ConfigError, redacted_url

if TYPE_CHECKING:
    import redis

__all__ = ["RedisVersionStore"]

log = logging.getLogger(__name__)

_SETTING = "IDENTITY_VERSION_STORE"

# One script for both kinds of bump: INCR the counter, announce it, atomically.
# Payload: "<process token> <kind> <new value> <key>" -- the key goes last because
# user ids may contain spaces.
_BUMP_LUA = """
local value = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ' .. value .. ' ' .. ARGV[3])
return value
"""

#: Bumps remembered during an outage; beyond this, one ``bump_all`` replaces them.
_MAX_PENDING = 1_000
#: Keys mirrored in one epoch; beyond this a new epoch starts (one reload per
#: cached user), which keeps memory bounded however many users get invalidated.
_MAX_MIRRORED = 100_000


class _Epoch(dict):
    """Per-key bump counts for one trusted period, compared by identity.

    A stamp is ``(epoch, count)``. Equality by identity means a stamp from an
    earlier epoch never equals one from a later epoch, even when both mirrors
    happen to hold the same counts -- which is how a resynchronisation or a
    ``bump_all`` makes every earlier stamp stale in O(1).
    """

    __slots__ = ()
    __eq__ = object.__eq__  # type: ignore[assignment]
    __ne__ = object.__ne__  # type: ignore[assignment]
    __hash__ = object.__hash__  # type: ignore[assignment]


class _LinkLost(Exception):
    """Raised inside the listener when the subscription can no longer be trusted."""


class _ReconnectWatch:
    """Degrades the store the moment redis-py silently reconnects a subscriber.

    redis-py retries a failed read by reconnecting and resubscribing on its own;
    messages published in between are lost without an error. Registered as the
    connection's connect callback (redis-py keeps a weak reference to it).
    """

    __slots__ = ("store", "fired", "__weakref__")

    def __init__(self, store: RedisVersionStore) -> None:
        self.store = store
        self.fired = False

    def on_connect(self, connection: Any) -> None:
        self.fired = True
        self.store._lose_link("the subscriber connection was re-established")


class RedisVersionStore:
    """Version stamps in Redis, mirrored in this process for a network-free ``stamp()``.

    Use it as ``UserCache(versions=RedisVersionStore("redis://127.0.0.1:6379/0"))``
    or select it with ``IDENTITY_VERSION_STORE=redis://...``.

    :param url_or_client: a ``redis://``, ``rediss://`` or ``unix://`` URL (password
        as ``redis://:secret@host:6379/0``), or a ready ``redis.Redis`` client. A
        client built from a URL here fails fast (short socket timeouts, one retry),
        so an invalidation during an outage does not hold a request for seconds;
        a client you pass in keeps its own retry policy.
    :param prefix: prepended to every key and to the channel, so several apps can
        share one Redis. Stores that must see each other's bumps use the same prefix.
    :param heartbeat: seconds between ``PING``\\s on the subscription; the link
        counts as lost after ``3 * heartbeat`` without a reply, which bounds how long
        a half-open connection (a silent network partition) can go unnoticed.
    :param reconnect_backoff: ``(first, longest)`` delay in seconds between
        reconnection attempts, doubling (with jitter) from the first to the longest.
    :param socket_timeout: socket and connect timeout for a client built from a URL,
        and the longest the first ``stamp()`` in a process waits for a connection.

    Nothing connects in the constructor: the listener starts with the first
    ``stamp()`` in a process, so a gunicorn master that builds the app with
    ``--preload`` (and may invalidate while seeding -- sending needs no listener)
    has no thread to fork. That first ``stamp()`` waits for the listener's first
    connection attempt -- milliseconds, at most ``socket_timeout`` -- so a fresh
    worker's first loads are stored with trusted stamps instead of being loaded
    twice. If Redis is unreachable the store starts *degraded* -- the app serves,
    the cache loads every user from the database, a WARNING is logged -- rather than
    refusing to boot, which would turn a Redis blip into an outage.
    :meth:`wait_synced` blocks until the mirror is trusted.
    """

    __slots__ = (
        "_mirror",
        "_client",
        "_owns_client",
        "_url",
        "_prefix",
        "_channel",
        "_gen_key",
        "_script",
        "_heartbeat",
        "_backoff",
        "_lock",
        "_stop",
        "_synced",
        "_first_attempt",
        "_first_wait",
        "_thread",
        "_pid",
        "_token",
        "_down",
        "_closed",
        "_pending",
        "_pending_all",
        "_watch",
        "__weakref__",
    )

    # Set by _reset_process_state (at construction and again after a fork). Declared
    # here so a type checker knows them in the methods defined before it; annotations
    # without a value add no class attributes, so __slots__ is unaffected.
    _mirror: _Epoch | None
    _lock: threading.Lock
    _stop: threading.Event
    _synced: threading.Event
    _first_attempt: threading.Event
    _thread: threading.Thread | None
    _pid: int
    _token: str
    _down: bool
    _pending: set[str]
    _pending_all: bool
    _watch: _ReconnectWatch | None

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        *,
        prefix: str = "identity:",
        heartbeat: float = 1.0,
        reconnect_backoff: tuple[float, float] = (0.05, 1.0),
        socket_timeout: float = 1.0,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        first, longest = reconnect_backoff
        if not (0 < first <= longest) or not heartbeat > 0 or not socket_timeout > 0:
            raise ValueError(
                "heartbeat, socket_timeout and reconnect_backoff=(first, longest) "
                "must be positive with first <= longest"
            )
        self._client, self._url, self._owns_client = _make_client(url_or_client, socket_timeout)
        self._prefix = prefix
        self._channel = f"{prefix}bump"
        self._gen_key = f"{prefix}gen"
        self._script = self._client.register_script(_BUMP_LUA)
        self._heartbeat = float(heartbeat)
        self._first_wait = float(socket_timeout)
        self._backoff = (float(first), float(longest))
        self._closed = False
        self._reset_process_state()
        _LIVE_STORES.add(self)

    # -- the hot path ------------------------------------------------------------

    def stamp(self, key: str) -> Hashable:
        """The current stamp of ``key``: local memory only, never the network."""
        mirror = self._mirror
        if mirror is None:
            return self._untrusted_stamp(key)
        return (mirror, mirror.get(key, 0))

    def _untrusted_stamp(self, key: str) -> Hashable:
        if not self._closed:
            self._start_if_needed()
            # The first stamps in a process wait for the listener's first attempt
            # (milliseconds; at most the connect timeout), or a fresh worker would
            # store its first loads with untrusted stamps and load every user twice.
            first = self._first_attempt
            if not first.is_set() and first.wait(self._first_wait):
                mirror = self._mirror
                if mirror is not None:
                    return (mirror, mirror.get(key, 0))
        return object()  # equal to nothing: the cache loads instead of trusting

    # -- invalidation ------------------------------------------------------------

    def bump(self, key: str) -> None:
        """Make every stamp read so far for ``key`` stale, here at once and everywhere.

        Returns after this process's mirror changed and Redis recorded and
        announced the bump; during an outage it logs a WARNING, bumps locally and
        sends the bump after reconnecting. Never raises.
        """
        key = str(key)
        with self._lock:
            mirror = self._mirror
            if mirror is not None:
                self._count(mirror, key)
            send = not (self._down or self._closed)
            if not send:
                self._remember(key)
        if send:
            self._send(f"{self._prefix}v:{key}", "k", key)
        elif not self._closed:
            self._start_if_needed()
            log.warning(
                "Redis unreachable: invalidation of user %r applied in this process only; "
                "other processes get it when the link to %s is back",
                key,
                self._url,
            )

    def bump_all(self) -> None:
        """Make every stamp read so far, for every key, stale -- in every process."""
        with self._lock:
            if self._mirror is not None:
                self._mirror = _Epoch()
            send = not (self._down or self._closed)
            if not send:
                self._remember(None)
        if send:
            self._send(self._gen_key, "a", "")
        elif not self._closed:
            self._start_if_needed()
            log.warning(
                "Redis unreachable: invalidation of all users applied in this process only; "
                "other processes get it when the link to %s is back",
                self._url,
            )

    def _send(self, counter_key: str, kind: str, key: str) -> None:
        # A successful send needs no listener: a process that only invalidates (a
        # gunicorn master seeding with --preload, a CLI) starts no thread.
        try:
            self._publish(counter_key, kind, key)
        except Exception as exc:  # noqa: BLE001 -- an invalidation must never fail a request
            with self._lock:
                self._remember(None if kind == "a" else key)
            self._lose_link(f"sending an invalidation failed: {exc!r}")
            self._start_if_needed()  # it sends the remembered bump once Redis is back
            log.warning(
                "Redis unreachable: invalidation of %s applied in this process only; "
                "other processes get it when the link to %s is back",
                "all users" if kind == "a" else f"user {key!r}",
                self._url,
            )

    def _publish(self, counter_key: str, kind: str, key: str) -> int:
        return self._script(keys=[counter_key], args=[self._channel, f"{self._token} {kind}", key])

    def _count(self, mirror: _Epoch, key: str) -> None:
        """One bump of ``key`` in ``mirror``; the caller holds the lock."""
        if len(mirror) >= _MAX_MIRRORED and key not in mirror:
            self._mirror = _Epoch()  # new epoch: every old stamp is stale anyway
        else:
            mirror[key] = mirror.get(key, 0) + 1

    def _remember(self, key: str | None) -> None:
        """Keep a bump for the replay after reconnecting; the caller holds the lock."""
        if key is None or len(self._pending) >= _MAX_PENDING:
            self._pending_all = True
            self._pending.clear()
        elif not self._pending_all:
            self._pending.add(key)

    # -- state -------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True while the mirror is trusted (subscribed, resynchronised, link alive)."""
        return self._mirror is not None

    def wait_synced(self, timeout: float) -> bool:
        """Start the listener if needed and wait up to ``timeout`` s for a trusted mirror."""
        if self._closed:
            return False
        self._start_if_needed()
        return self._synced.wait(timeout)

    def close(self) -> None:
        """Stop the listener thread and release the connections this store made.

        Afterwards ``stamp()`` returns untrusted stamps and bumps stay local; a
        client passed in by the caller is left open for its owner.
        """
        with self._lock:
            self._closed = True
            self._mirror = None
            self._synced.clear()
            thread, self._thread = self._thread, None
        self._stop.set()
        self._first_attempt.set()  # nobody waits for a connection that will not come
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(2.0, 3 * self._heartbeat))
        if self._owns_client:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 -- closing a dead link is not an error
                pass
        _LIVE_STORES.discard(self)

    @property
    def prefix(self) -> str:
        """The key and channel prefix; stores that must hear each other share it."""
        return self._prefix

    def __repr__(self) -> str:
        state = "closed" if self._closed else "synced" if self.synced else "degraded"
        if state == "degraded" and self._thread is None:
            state = "not yet used"  # the listener starts on first use in each process
        return f"<RedisVersionStore {self._url} prefix={self._prefix!r} {state}>"

    def _reset_process_state(self) -> None:
        """State that belongs to one process: fresh at construction and after a fork."""
        self._mirror = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._first_attempt = threading.Event()  # set once the first (re)connect ended
        self._thread = None
        self._pid = os.getpid()
        # Tells our own bumps apart from others' when they come back on the channel;
        # a forked child needs its own, or it would ignore its siblings.
        self._token = secrets.token_hex(8)
        self._down = False
        self._pending = set()
        self._pending_all = False
        self._watch = None

    def _after_fork_in_child(self) -> None:
        closed = self._closed
        self._reset_process_state()
        self._closed = closed

    def _start_if_needed(self) -> None:
        if self._pid != os.getpid():  # forked by C code that skipped the at-fork hooks
            self._after_fork_in_child()
        if self._thread is None and not self._closed:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(self._stop,),
                name=f"identity-versions[{self._prefix}]",
                daemon=True,
            )
            self._thread.start()

    def _lose_link(self, reason: str) -> None:
        """Stop trusting the mirror now; the listener reconnects and resynchronises."""
        with self._lock:
            was_trusted = self._mirror is not None
            self._mirror = None
            self._synced.clear()
            self._down = True
        if was_trusted and not self._closed:
            log.warning(
                "lost the link to Redis at %s (%s): the user cache loads every user "
                "from the database until it is back",
                self._url,
                reason,
            )

    # -- the listener thread -----------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        first, longest = self._backoff
        delay = first
        attempts = 0
        while not stop.is_set():
            pubsub = None
            trusted_since = None
            try:
                pubsub = self._subscribe(stop)
                replayed = self._resync()
                trusted_since = time.monotonic()
                self._first_attempt.set()
                if attempts or replayed:
                    log.info(
                        "link to Redis at %s is back: stamps resynchronised, "
                        "%s invalidation(s) made meanwhile sent",
                        self._url,
                        replayed,
                    )
                attempts = 0
                self._listen(pubsub, stop)
            except Exception as exc:  # noqa: BLE001 -- the listener must outlive any error
                if stop.is_set():
                    break
                self._lose_link(repr(exc))  # logs a WARNING if the mirror was trusted
                self._first_attempt.set()
                if attempts == 0 and trusted_since is None:
                    log.warning(
                        "cannot reach Redis at %s (%r): serving without the user cache "
                        "until it is reachable",
                        self._url,
                        exc,
                    )
                elif trusted_since is None:
                    log.debug("Redis at %s still unreachable: %r", self._url, exc)
                attempts += 1
            finally:
                if pubsub is not None:
                    _quietly_close(pubsub, self._watch)
                self._watch = None
            # A link that held for a while earns a quick reconnect; a flapping one
            # keeps backing off.
            if trusted_since is not None and time.monotonic() - trusted_since >= longest:
                delay = first
            stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, longest)

    def _subscribe(self, stop: threading.Event) -> Any:
        """Subscribe and wait for the server's confirmation: bumps after it reach us."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        try:
            pubsub.subscribe(self._channel)
            watch = _ReconnectWatch(self)
            pubsub.connection.register_connect_callback(watch.on_connect)
            self._watch = watch  # redis-py holds it weakly; we keep it alive
            deadline = time.monotonic() + 3 * self._heartbeat
            while not stop.is_set():
                message = pubsub.get_message(timeout=self._poll_interval())
                if message is not None and message["type"] == "subscribe":
                    return pubsub
                if message is not None and message["type"] == "message":
                    continue  # published before we trust anything; the new epoch covers it
                if time.monotonic() > deadline:
                    raise _LinkLost("no subscription confirmation")
            raise _LinkLost("closing")
        except BaseException:
            _quietly_close(pubsub, self._watch)
            self._watch = None
            raise

    def _resync(self) -> int | str:
        """Start a new epoch (trust again), then replay bumps made while down.

        Returns how many bumps were replayed (``"all"`` for a generation bump).
        """
        with self._lock:
            if self._closed:
                raise _LinkLost("closed")
            pending, pending_all = self._pending, self._pending_all
            self._pending, self._pending_all = set(), False
            self._down = False
            self._mirror = _Epoch()
            self._synced.set()
        try:
            if pending_all:
                self._publish(self._gen_key, "a", "")
            else:
                for key in pending:
                    self._publish(f"{self._prefix}v:{key}", "k", key)
        except Exception:
            with self._lock:
                if pending_all:
                    self._remember(None)
                for key in pending:
                    self._remember(key)
            raise
        return "all" if pending_all else len(pending)

    def _listen(self, pubsub: Any, stop: threading.Event) -> None:
        watch = self._watch
        poll = self._poll_interval()
        heard = time.monotonic()
        next_ping = heard + self._heartbeat
        while not stop.is_set():
            message = pubsub.get_message(timeout=poll)
            now = time.monotonic()
            if watch is not None and watch.fired:
                raise _LinkLost("the subscriber connection was re-established")
            if self._down:
                raise _LinkLost("an invalidation could not be sent")
            if message is not None:
                heard = now
                if message["type"] == "message":
                    self._apply(message["data"])
                elif message["type"] == "unsubscribe":
                    raise _LinkLost("unsubscribed")
            if now - heard > 3 * self._heartbeat:
                raise _LinkLost(f"no reply from Redis for {now - heard:.1f} s")
            if now >= next_ping:
                pubsub.ping()
                next_ping = now + self._heartbeat

    def _apply(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        token, kind, _value, key = (text.split(" ", 3) + ["", "", ""])[:4]
        if token == self._token:
            return  # our own bump: already applied when it was made
        with self._lock:
            mirror = self._mirror
            if mirror is None:
                return  # untrusted anyway; the next epoch starts empty
            if kind == "k":
                self._count(mirror, key)
            else:  # "a", or anything we do not understand: the safe side
                self._mirror = _Epoch()

    def _poll_interval(self) -> float:
        # How long one wait for a message lasts: bounds close() latency and heartbeat
        # precision without waking more than a few times per second.
        return min(0.1, self._heartbeat)


def _make_client(url_or_client: Any, socket_timeout: float) -> tuple[Any, str, bool]:
    """A redis-py client, a printable (password-free) name for it, and who closes it."""
    if not isinstance(url_or_client, str):
        if not (hasattr(url_or_client, "pubsub") and hasattr(url_or_client, "register_script")):
            raise TypeError(
                "RedisVersionStore needs a Redis URL or a redis.Redis client, "
                f"not {type(url_or_client).__name__}"
            )
        pool = getattr(url_or_client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", {})
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return url_or_client, f"{where}/{kwargs.get('db', 0)}", False

    expected = SETTINGS[_SETTING].expected
    try:
        url = SETTINGS[_SETTING].parse(url_or_client)
        if url == "local":
            raise ValueError
    except (ValueError, TypeError):
        raise ConfigError(_SETTING, redacted_url(url_or_client), expected) from None
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigError(
            _SETTING, redacted_url(url), "redis-py installed: pip install 'identity_middleware[redis]'"
        ) from None
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        # One quick retry rides over a pooled connection that a Redis restart
        # closed; more would hold the request that called invalidate().
        "retry": Retry(NoBackoff(), 1),
    }
    if not url.startswith("unix:"):
        options["socket_keepalive"] = True  # notice a dead peer on idle TCP links
    try:
        client = redis.Redis.from_url(url, **options)
        # redis-py connects lazily and would report an unknown URL option only then,
        # from the listener thread, forever. Building one (unconnected) connection
        # surfaces it now, as a configuration error.
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError, redis.RedisError) as exc:
        raise ConfigError(_SETTING, redacted_url(url), f"{expected} ({exc})") from None
    return client, redacted_url(url), True


def _quietly_close(pubsub: Any, watch: _ReconnectWatch | None) -> None:
    try:
        if watch is not None and pubsub.connection is not None:
            # The connection goes back to the pool and may serve commands next.
            pubsub.connection.deregister_connect_callback(watch.on_connect)
        pubsub.close()
    except Exception:  # noqa: BLE001 -- it is already broken; nothing to report
        pass


# -- fork safety: every live store forgets its parent's thread and links ---------------

_LIVE_STORES: weakref.WeakSet[RedisVersionStore] = weakref.WeakSet()


def _reset_stores_in_child() -> None:
    for store in list(_LIVE_STORES):
        store._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_stores_in_child)
