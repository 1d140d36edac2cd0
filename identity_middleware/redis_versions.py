"""Version stamps shared through Redis, so ``invalidate()`` reaches every worker and host.

Each process keeps its users in its own :class:`~identity_middleware.UserCache`;
only the *fact* that a user changed travels through Redis. ``bump(key)``
``PUBLISH``\\es the bump on ``<prefix>bump``; every process mirrors the stamps in
local memory and a daemon thread applies the bumps it hears, so ``stamp()`` --
called on every cache hit -- reads a dict and never touches the network. Nothing
is stored in Redis per user: the only keys are short-lived acknowledgement lists
(below), which expire on their own, so a long uptime or a flood of invalidations
leaves no keys behind.

Why pub/sub and not keyspace notifications: notifications need
``notify-keyspace-events`` set on the server (often locked down on managed Redis,
and server-wide, so every app on that Redis pays for every key event), they carry no
payload (a receiver cannot tell its own bump from someone else's), and they are
delivered over pub/sub anyway, with the same at-most-once guarantee. A channel of our
own needs no server configuration and carries exactly what a receiver needs.

**What ``bump()`` promises.** It returns normally only when no process that shares
the prefix can still validate a stamp read before the call. Redis answers the
``PUBLISH`` with the number of subscribers it handed the message to; each of their
listeners applies the bump and then acknowledges it (``RPUSH`` to
``<prefix>ack:<sender>:<n>``, expiring after a minute), and ``bump()`` waits for
that many acknowledgements. A receiver that does not acknowledge within
``confirm_timeout`` is waited out instead: a listener that has heard nothing from
Redis for ``3 * heartbeat`` drops its mirror, and it cannot have heard anything
Redis sent after our message without hearing our message first (one connection,
in order), so ``silence_bound`` seconds after Redis confirmed the publish it has
either applied the bump or stopped trusting its mirror. When Redis itself does not
confirm -- frozen, down, partitioned from this process -- ``bump()`` applies the bump
here, keeps it for the replay below, waits out the silence bound of the outage (so
every process that lost Redis too has dropped its mirror by then) and raises
:class:`~identity_middleware.versions.InvalidationUnconfirmed`: what it cannot know
is whether some process still reaches Redis while this one does not (a partial
partition), and that process would keep serving the old user until the replay.

Pub/sub is at-most-once: a message sent while a subscriber is disconnected is lost.
So the mirror is trusted only while the subscription is known to be alive. The
moment the link is lost -- a connection error, the subscriber dropped or silently
reconnected by redis-py, no answer to the heartbeat ``PING``, Redis restarted --
``stamp()`` returns a fresh ``object()`` on every call: the cache serves nothing and
every request loads its user from the database. Requests never see an exception.

**Resynchronising.** After a reconnect the listener first subscribes and waits for
the server's confirmation, sends the bumps this process made while the link was
down, and only then starts a new *epoch*: an empty mirror with a generation number
never used before in this process, so every stamp handed out before compares
unequal and every entry cached before is stale. Reading anything back from Redis is
not needed: an entry loaded in the new epoch read its stamp after the subscription
was confirmed, so its database read happened after any bump we could have missed
(the bumping process commits before it bumps), and every later bump reaches us.
The same argument covers a Redis that restarted with empty data or was flushed:
stamps count bumps locally and never read Redis, so nothing on the server can make
an old stamp valid again.

**Keys.** A user id is any ``str``. One that UTF-8 cannot encode (a lone surrogate
from JSON or a command line) travels hex-encoded with a marker of its own, so it is
delivered exactly like any other and can never make Redis, redis-py or a listener
fail -- an encoding error must not look like an outage.

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

import itertools
import logging
import os
import random
import secrets
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Hashable

from .config import SETTINGS, ConfigError, redacted
from .versions import DEFAULT_MAX_KEYS, InvalidationUnconfirmed, _generations, key_label

if TYPE_CHECKING:
    import redis

__all__ = ["RedisVersionStore"]

log = logging.getLogger(__name__)

_SETTING = "IDENTITY_VERSION_STORE"

#: Bumps remembered during an outage; beyond this, one ``bump_all`` replaces them.
_MAX_PENDING = 1_000
#: Seconds an acknowledgement list lives when its sender stopped waiting for it.
_ACK_TTL = 60
#: Slack added to the silence bound for scheduling (a listener wakes up late).
_GRACE = 0.25


class _Epoch(dict):
    """Per-key bump counts for one trusted period, with a generation ``number``.

    A stamp is ``(number, count)``. Numbers come from one process-wide counter and
    are never reused, so a stamp from an earlier epoch never equals one from a later
    epoch even when both count the same -- which is how a resynchronisation or a
    ``bump_all`` makes every earlier stamp stale in O(1). Stamps hold the number,
    not the dict, so a stale cache entry does not keep an old mirror alive.
    """

    __slots__ = ("number",)

    def __init__(self) -> None:
        super().__init__()
        self.number = next(_generations)


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


def _wire_key(key: str) -> tuple[str, str]:
    """``(kind, text)`` for a user id on the channel: as is, or hex when UTF-8 cannot carry it."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "x", key.encode("utf-8", "surrogatepass").hex()
    return "k", key


def _is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the link is down (retry later), not that the request was bad."""
    import redis

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))


class RedisVersionStore:
    """Version stamps in Redis, mirrored in this process for a network-free ``stamp()``.

    Use it as ``UserCache(versions=RedisVersionStore("redis://127.0.0.1:6379/0"))``
    or select it with ``IDENTITY_VERSION_STORE=redis://...``.

    :param url_or_client: a ``redis://``, ``rediss://`` or ``unix://`` URL (password
        as ``redis://:secret@host:6379/0``), or a ready ``redis.Redis`` client. A
        client built from a URL here fails fast (short socket timeouts, one retry),
        so an invalidation during an outage does not hold a request for seconds;
        a client you pass in keeps its own retry policy (keep it short: the
        listener acknowledges bumps through it, and its timeouts add to
        ``silence_bound``).
    :param prefix: prepended to every key and to the channel, so several apps can
        share one Redis. Stores that must see each other's bumps use the same prefix
        (and the same ``heartbeat``, which the bound below assumes).
    :param heartbeat: seconds between ``PING``\\s on the subscription; the link
        counts as lost after ``3 * heartbeat`` without a reply, which bounds how long
        a half-open connection (a silent network partition) can go unnoticed.
    :param reconnect_backoff: ``(first, longest)`` delay in seconds between
        reconnection attempts, doubling (with jitter) from the first to the longest.
    :param socket_timeout: socket and connect timeout for a client built from a URL,
        and the longest the first ``stamp()`` in a process waits for a connection.
    :param confirm_timeout: how long ``bump()`` waits for every receiver's
        acknowledgement before waiting out ``silence_bound`` instead.
    :param max_keys: most per-user counters mirrored; a new user beyond it starts a
        new epoch (each cached user reloads once) instead of growing the mirror.

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
        "_listener_client",
        "_owns_client",
        "_url",
        "_prefix",
        "_channel",
        "_heartbeat",
        "_backoff",
        "_confirm_timeout",
        "_block_limit",
        "_listener_block",
        "_max_keys",
        "_lock",
        "_stop",
        "_synced",
        "_first_attempt",
        "_first_wait",
        "_thread",
        "_pid",
        "_token",
        "_sequence",
        "_down",
        "_heard_at",
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
    _sequence: itertools.count
    _down: bool
    _heard_at: float
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
        confirm_timeout: float = 1.0,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        first, longest = reconnect_backoff
        if not (
            0 < first <= longest and heartbeat > 0 and socket_timeout > 0 and confirm_timeout > 0
        ):
            raise ValueError(
                "heartbeat, socket_timeout, confirm_timeout and reconnect_backoff=(first, longest) "
                "must be positive with first <= longest"
            )
        if not (isinstance(max_keys, int) and max_keys > 0):
            raise ValueError(f"max_keys must be a positive int, not {max_keys!r}")
        self._client, self._url, self._owns_client = _make_client(url_or_client, socket_timeout)
        if self._owns_client:
            # The listener's own commands (acknowledgements, replays) time out within a
            # heartbeat and never retry, so a Redis that freezes mid-command cannot keep
            # a mirror trusted past the silence bound.
            assert isinstance(url_or_client, str)
            self._listener_client = _make_client(
                url_or_client, min(socket_timeout, heartbeat), retries=0
            )[0]
            self._listener_block = 2 * min(socket_timeout, heartbeat)
        else:
            self._listener_client = self._client
            kwargs = getattr(getattr(self._client, "connection_pool", None), "connection_kwargs", {})
            self._listener_block = 2 * float(kwargs.get("socket_timeout") or socket_timeout)
        client_timeout = getattr(
            getattr(self._client, "connection_pool", None), "connection_kwargs", {}
        ).get("socket_timeout")
        # A BLPOP must return before the client's own socket timeout fires.
        self._block_limit = float(client_timeout) / 2 if client_timeout else float(confirm_timeout)
        self._prefix = prefix
        self._channel = f"{prefix}bump"
        self._heartbeat = float(heartbeat)
        self._first_wait = float(socket_timeout)
        self._confirm_timeout = float(confirm_timeout)
        self._backoff = (float(first), float(longest))
        self._max_keys = max_keys
        self._closed = False
        self._reset_process_state()
        _LIVE_STORES.add(self)

    # -- the hot path ------------------------------------------------------------

    def stamp(self, key: str) -> Hashable:
        """The current stamp of ``key``: local memory only, never the network."""
        mirror = self._mirror
        if mirror is None:
            return self._untrusted_stamp(key)
        return (mirror.number, mirror.get(key, 0))

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
                    return (mirror.number, mirror.get(key, 0))
        return object()  # equal to nothing: the cache loads instead of trusting

    # -- invalidation ------------------------------------------------------------

    def bump(self, key: str) -> None:
        """Make every stamp read so far for ``key`` stale, here at once and everywhere.

        Returns normally only when no process sharing the prefix can validate an
        old stamp of ``key`` any more: every receiver acknowledged, or the ones that
        did not were waited out (``silence_bound`` after Redis confirmed). Raises
        :class:`~identity_middleware.versions.InvalidationUnconfirmed` when Redis
        does not confirm (unreachable, frozen, refused, store closed) -- after the
        bump took effect in this process and was kept for the replay.
        """
        self._invalidate(str(key))

    def bump_all(self) -> None:
        """Make every stamp read so far, for every key, stale -- in every process.

        The same contract as :meth:`bump`.
        """
        self._invalidate(None)

    def _invalidate(self, key: str | None) -> None:
        with self._lock:
            mirror = self._mirror
            if mirror is not None:
                if key is None:
                    self._mirror = _Epoch()
                else:
                    self._count(mirror, key)
            closed, down = self._closed, self._down
            if down and not closed:
                self._remember(key)
        if closed:
            raise self._unconfirmed(key, "the version store is closed", replayed=False)
        if down:
            self._start_if_needed()  # it sends the remembered bump once Redis is back
            # Redis went silent within a heartbeat of the last thing we heard from it;
            # every process that lost it too drops its mirror a silence bound later.
            self._wait_until(self._heard_at + self._heartbeat + self.silence_bound)
            raise self._unconfirmed(key, "the link to Redis is down", replayed=True)
        self._send(key)

    def _send(self, key: str | None) -> None:
        # A successful send needs no listener: a process that only invalidates (a
        # gunicorn master seeding with --preload, a CLI) starts no thread.
        started = time.monotonic()
        try:
            sequence, receivers = self._publish(self._client, key)
        except Exception as exc:  # noqa: BLE001 -- sorted below; the caller gets one exception type
            if not _is_outage(exc):
                # Redis answered and refused (ACL, a proxy's error...): the link is fine
                # and retrying would fail the same way, so nothing is kept for a replay.
                raise self._unconfirmed(key, f"Redis refused it: {exc!r}", replayed=False) from exc
            with self._lock:
                self._remember(key)
            self._lose_link(f"sending an invalidation failed: {exc!r}")
            self._start_if_needed()  # it sends the remembered bump once Redis is back
            # Redis was silent from before we sent at the latest: a silence bound after
            # that, every process that lost it too has dropped its mirror.
            self._wait_until(started + self.silence_bound)
            raise self._unconfirmed(key, f"Redis did not confirm it: {exc!r}", replayed=True) from exc
        confirmed = time.monotonic()
        missing = self._await_acks(sequence, receivers, confirmed + self._confirm_timeout)
        if missing:
            wait = confirmed + self.silence_bound - time.monotonic()
            log.warning(
                "%d of %d receivers did not acknowledge the invalidation of %s within %.1f s "
                "(a process busy, cut off from Redis, or a foreign subscriber on %r); waiting "
                "%.1f s more, after which none of them trusts its cached stamps any more",
                missing,
                receivers,
                key_label(key),
                self._confirm_timeout,
                self._channel,
                max(wait, 0.0),
            )
            self._wait_until(confirmed + self.silence_bound)

    @staticmethod
    def _wait_until(moment: float) -> None:
        remaining = moment - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    def _publish(self, client: Any, key: str | None) -> tuple[int, int]:
        """Send one bump; ``(sequence number, receivers)`` as Redis reported them."""
        sequence = next(self._sequence)
        kind, text = ("a", "") if key is None else _wire_key(key)
        receivers = client.publish(self._channel, f"{self._token} {kind} {sequence} {text}")
        return sequence, int(receivers)

    def _await_acks(self, sequence: int, receivers: int, deadline: float) -> int:
        """Wait for ``receivers`` acknowledgements of bump ``sequence``; how many are missing."""
        key = f"{self._prefix}ack:{self._token}:{sequence}"
        heard = 0
        try:
            while heard < receivers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Fractional BLPOP timeouts need Redis >= 6.
                if self._client.blpop([key], timeout=min(remaining, self._block_limit)) is not None:
                    heard += 1
        except Exception as exc:  # noqa: BLE001 -- the bump is out; stragglers are waited out
            log.debug("waiting for acknowledgements on %s failed: %r", self._url, exc)
        return receivers - heard

    def _unconfirmed(self, key: str | None, why: str, *, replayed: bool) -> InvalidationUnconfirmed:
        if self._closed:
            others = "other processes were not told: they may serve the old entry until its TTL ends"
        else:
            then = "it is sent when the link is back; until then" if replayed else "until their entry's TTL ends"
            others = (
                "every process that lost Redis too has stopped serving cached users until it "
                f"resynchronises; {then} a process that still reaches Redis may serve the old entry"
            )
        return InvalidationUnconfirmed(
            f"invalidation of {key_label(key)} through Redis at {self._url} is not confirmed ({why}). "
            f"This process no longer serves the old entry; {others}",
            key=key,
            replayed=replayed,
        )

    def _count(self, mirror: _Epoch, key: str) -> None:
        """One bump of ``key`` in ``mirror``; the caller holds the lock."""
        if len(mirror) >= self._max_keys and key not in mirror:
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

    @property
    def silence_bound(self) -> float:
        """Seconds after which a process that heard nothing from Redis has dropped its mirror.

        Three heartbeats plus one poll interval (the listener checks between polls)
        -- or, if longer, the most one listener command (an acknowledgement, which
        starts right after hearing) can block -- plus a little slack for scheduling.
        :meth:`bump` waits this long after Redis confirmed a publish when a receiver
        does not acknowledge it. About 3.35 s with the defaults.
        """
        return max(3 * self._heartbeat + self._poll_interval(), self._listener_block) + _GRACE

    @property
    def mirrored(self) -> int:
        """Per-user counters in this process's mirror now (at most ``max_keys``)."""
        mirror = self._mirror
        return 0 if mirror is None else len(mirror)

    def wait_synced(self, timeout: float) -> bool:
        """Start the listener if needed and wait up to ``timeout`` s for a trusted mirror."""
        if self._closed:
            return False
        self._start_if_needed()
        return self._synced.wait(timeout)

    def close(self) -> None:
        """Stop the listener thread and release the connections this store made.

        Afterwards ``stamp()`` returns untrusted stamps and ``bump()`` raises
        :class:`~identity_middleware.versions.InvalidationUnconfirmed` after bumping
        nothing anywhere; a client passed in by the caller is left open for its owner.
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
            for client in (self._client, self._listener_client):
                try:
                    client.close()
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
        # Tells our own bumps apart from others' when they come back on the channel,
        # and names our acknowledgement lists; a forked child needs its own, or it
        # would ignore its siblings.
        self._token = secrets.token_hex(8)
        self._sequence = itertools.count(1)
        self._down = False
        self._heard_at = 0.0  # when the listener last heard from Redis (monotonic)
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
        """Replay the bumps made while down, then start a new epoch (trust again).

        The replay goes first so that a Redis that freezes during it cannot leave a
        trusted mirror behind a blocked listener; bumps made meanwhile are replayed
        too before anything is trusted. Returns how many bumps were replayed
        (``"all"`` when a generation bump covered them).
        """
        replayed, everything = 0, False
        while True:
            with self._lock:
                if self._closed:
                    raise _LinkLost("closed")
                pending, pending_all = self._pending, self._pending_all
                self._pending, self._pending_all = set(), False
                if not (pending or pending_all):
                    self._heard_at = time.monotonic()
                    self._down = False
                    self._mirror = _Epoch()
                    self._synced.set()
                    return "all" if everything else replayed
            try:
                sent = self._replay(pending, pending_all)
            except Exception:
                with self._lock:
                    if pending_all:
                        self._remember(None)
                    for key in pending:
                        self._remember(key)
                raise
            if isinstance(sent, str):
                everything = True
            else:
                replayed += sent

    def _replay(self, pending: set[str], pending_all: bool) -> int | str:
        """Publish remembered bumps (no acknowledgements awaited: their callers were told)."""
        client = self._listener_client
        if not pending_all:
            for key in pending:
                try:
                    self._publish(client, key)
                except Exception as exc:  # noqa: BLE001 -- sorted below
                    if _is_outage(exc):
                        raise
                    # Redis refuses this one: never retry it forever. Everyone reloads
                    # instead, which covers it.
                    log.error(
                        "Redis at %s refused the replay of the invalidation of %s (%r); "
                        "invalidating every user instead",
                        self._url,
                        key_label(key),
                        exc,
                    )
                    break
            else:
                return len(pending)
        try:
            self._publish(client, None)
        except Exception as exc:  # noqa: BLE001
            if _is_outage(exc):
                raise
            log.error(
                "Redis at %s refused the replay of the invalidation of all users (%r); "
                "other processes may serve old entries until their TTL ends",
                self._url,
                exc,
            )
        return "all"

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
                heard = self._heard_at = now
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
        """Apply one bump heard on the channel, then acknowledge it to its sender."""
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        token, kind, sequence, key = (text.split(" ", 3) + ["", "", ""])[:4]
        if token != self._token:  # our own bump was applied when it was made
            if kind == "x":
                try:
                    key = bytes.fromhex(key).decode("utf-8", "surrogatepass")
                except ValueError:
                    kind = "?"
            with self._lock:
                mirror = self._mirror
                if mirror is not None:  # else untrusted anyway; the next epoch starts empty
                    if kind in ("k", "x"):
                        self._count(mirror, key)
                    else:  # "a", or anything we do not understand: the safe side
                        self._mirror = _Epoch()
        if token.isalnum() and len(token) <= 32 and sequence.isdigit():
            ack = f"{self._prefix}ack:{token}:{sequence}"
            pipe = self._listener_client.pipeline(transaction=False)
            pipe.rpush(ack, 1)
            pipe.expire(ack, _ACK_TTL)
            pipe.execute()

    def _poll_interval(self) -> float:
        # How long one wait for a message lasts: bounds close() latency and heartbeat
        # precision without waking more than a few times per second.
        return min(0.1, self._heartbeat)


def _make_client(url_or_client: Any, socket_timeout: float, *, retries: int = 1) -> tuple[Any, str, bool]:
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
        raise ConfigError(_SETTING, redacted(url_or_client), expected) from None
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigError(
            _SETTING, redacted(url), "redis-py installed: pip install 'identity_middleware[redis]'"
        ) from None
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        # One quick retry rides over a pooled connection that a Redis restart
        # closed; more would hold the request that called invalidate().
        "retry": Retry(NoBackoff(), retries),
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
        raise ConfigError(_SETTING, redacted(url), f"{expected} ({exc})") from None
    return client, redacted(url), True


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
