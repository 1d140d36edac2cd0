"""UserCache, one behaviour per test: expiry, negative entries, bounds, invalidation,
adapters, the loader decorator, install(), configuration and the per-request record.

Time is a fake clock handed to ``timer=``: nothing here sleeps.
"""

from __future__ import annotations

import pytest
from flask import Flask, g
from flask_login import LoginManager

from identity_middleware import CacheStats, ConfigError, LocalVersionStore, UserCache
from identity_middleware.config import SETTINGS

CACHE_SETTINGS = (
    "IDENTITY_CACHE_TTL",
    "IDENTITY_CACHE_MAXSIZE",
    "IDENTITY_CACHE_NEGATIVE_TTL",
    "IDENTITY_VERSION_STORE",
    "IDENTITY_VERSION_PREFIX",
)


@pytest.fixture(autouse=True)
def _no_settings_in_environment(monkeypatch):
    # The environment wins over everything; a developer's shell must not change these tests.
    for name in CACHE_SETTINGS:
        monkeypatch.delenv(name, raising=False)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Users:
    """A loader with a call log; ``rows`` is the 'database'."""

    def __init__(self, rows=None) -> None:
        self.rows = dict(rows or {"1": "alice", "2": "bob"})
        self.calls: list[object] = []

    def __call__(self, user_id):
        self.calls.append(user_id)
        return self.rows.get(str(user_id))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(clock):
    return UserCache(ttl=60, negative_ttl=5, maxsize=100, timer=clock)


@pytest.fixture
def two_caches(clock):
    """Two caches sharing one version store: two workers sharing Redis, in one process."""
    store = LocalVersionStore()
    return UserCache(versions=store, timer=clock), UserCache(versions=store, timer=clock)


# -- keys, hits, misses ---------------------------------------------------------------


def test_int_and_str_ids_are_the_same_key(cache):
    users = Users()
    assert cache.get(1, users) == "alice"
    assert cache.get("1", users) == "alice"
    assert users.calls == [1]
    cache.invalidate("1")
    assert cache.get(1, users) == "alice"
    assert len(users.calls) == 2


def test_hits_and_misses_add_up_to_gets(cache):
    users = Users()
    for user_id in ["1", "2", "1", "1", "3", "3", "2"]:
        cache.get(user_id, users)
    stats = cache.stats()
    assert isinstance(stats, CacheStats)
    assert (stats.hits, stats.misses, stats.loads, stats.negative_hits) == (4, 3, 3, 1)
    assert stats.hits + stats.misses == 7
    assert stats.size == 3


# -- expiry -----------------------------------------------------------------------------


def test_entry_served_until_ttl_then_reloaded(cache, clock):
    users = Users()
    cache.get("1", users)
    clock.advance(59.9)
    users.rows["1"] = "alice v2"
    assert cache.get("1", users) == "alice"
    clock.advance(0.1)
    assert cache.get("1", users) == "alice v2"
    assert len(users.calls) == 2
    assert cache.stats().expirations == 1


def test_none_is_cached_for_negative_ttl_only(cache, clock):
    users = Users()
    assert cache.get("7", users) is None
    clock.advance(4.9)
    users.rows["7"] = "new user"
    assert cache.get("7", users) is None  # still the negative entry
    assert cache.stats().negative_hits == 1
    clock.advance(0.1)
    assert cache.get("7", users) == "new user"
    assert users.calls == ["7", "7"]


def test_negative_ttl_zero_never_caches_none(clock):
    cache = UserCache(ttl=60, negative_ttl=0, timer=clock)
    users = Users()
    for _ in range(3):
        assert cache.get("7", users) is None
    assert users.calls == ["7"] * 3
    assert cache.stats().size == 0
    assert cache.get("1", users) == "alice" and cache.get("1", users) == "alice"
    assert users.calls.count("1") == 1  # positive entries are still cached


def test_ttl_zero_runs_the_loader_every_time_and_still_counts(clock):
    cache = UserCache(ttl=0, timer=clock)
    users = Users()
    for _ in range(5):
        assert cache.get("1", users) == "alice"
    assert len(users.calls) == 5
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.size) == (0, 5, 5, 0)


def test_expired_entries_are_swept_not_left_to_pile_up(cache, clock):
    users = Users({str(i): f"user{i}" for i in range(50)})
    for i in range(50):
        cache.get(i, users)
    assert len(cache) == 50
    clock.advance(61)
    cache.get("0", users)  # a miss that stores triggers the sweep
    assert len(cache) == 1
    assert cache.stats().expirations == 50  # 49 swept + "0" dropped on access


def test_stats_size_counts_only_live_entries(cache, clock):
    users = Users()
    cache.get("1", users)
    cache.get("7", users)  # negative, 5 s
    clock.advance(6)
    assert cache.stats().size == 1


# -- bounds -----------------------------------------------------------------------------


def test_twenty_thousand_ids_stay_within_maxsize(clock):
    cache = UserCache(maxsize=1000, timer=clock)
    for i in range(20_000):
        cache.get(i, lambda user_id: {"id": user_id})
        assert len(cache) <= 1000
    stats = cache.stats()
    assert stats.size == 1000
    assert stats.evictions == 19_000
    assert cache.get(19_999, lambda user_id: pytest.fail("newest id was evicted")) == {"id": 19_999}


def test_client_chosen_giant_keys_are_loaded_every_time_and_never_held(clock):
    """A request_loader keyed by an API token: each key an attacker invents would otherwise sit in
    memory (as a negative entry) at whatever length the client sent."""
    import tracemalloc

    from identity_middleware.cache import MAX_KEY_CHARS

    cache = UserCache(maxsize=100, timer=clock)
    calls: list[int] = []

    def loader(token):
        calls.append(len(token))  # not the token: this list must not hold the keys either
        return None  # an unknown token

    for _ in range(2):
        assert cache.get("t" * MAX_KEY_CHARS, loader) is None
    assert calls == [MAX_KEY_CHARS]  # at the limit: cached (negative)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            giant = f"{n:08}" + "x" * MAX_KEY_CHARS
            assert cache.get(giant, loader) is None
            assert cache.get(giant, loader) is None
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(calls) == 1 + 400  # each giant key loaded every time
    assert len(cache) == 1
    assert held < 100_000  # not 200 x 1 KB keys


def test_least_recently_used_goes_first(clock):
    cache = UserCache(maxsize=3, timer=clock)
    users = Users({k: k for k in "abcd"})
    for key in "abc":
        cache.get(key, users)
    cache.get("a", users)  # a is now the most recent; b the least
    cache.get("d", users)  # evicts b
    users.calls.clear()
    for key in "acd":
        cache.get(key, users)
    assert users.calls == []
    cache.get("b", users)
    assert users.calls == ["b"]


# -- errors -----------------------------------------------------------------------------


def test_loader_exceptions_are_not_cached(cache):
    attempts = []

    def flaky(user_id):
        attempts.append(user_id)
        if len(attempts) == 1:
            raise ConnectionError("database went away")
        return "alice"

    with pytest.raises(ConnectionError):
        cache.get("1", flaky)
    assert cache.get("1", flaky) == "alice"
    assert cache.get("1", flaky) == "alice"
    stats = cache.stats()
    assert (stats.loads, stats.load_errors, stats.hits) == (2, 1, 1)


def test_loader_that_reenters_the_cache_for_its_own_key_does_not_deadlock(cache):
    # Same key re-entered from inside its own load: must load again, not wait on itself.
    depth = []

    def reentrant(user_id):
        depth.append(user_id)
        if len(depth) == 1:
            return ("outer", cache.get(user_id, reentrant))
        return "inner"

    assert cache.get("1", reentrant) == ("outer", "inner")
    assert len(depth) == 2


# -- invalidation -----------------------------------------------------------------------


def test_invalidate_reloads_that_user_only(cache):
    users = Users()
    cache.get("1", users)
    cache.get("2", users)
    users.rows["1"] = "alice (revoked)"
    cache.invalidate(1)
    assert cache.get("1", users) == "alice (revoked)"
    assert cache.get("2", users) == "bob"
    assert users.calls == ["1", "2", "1"]
    assert cache.stats().invalidations == 1


def test_invalidate_all_reloads_everyone(cache):
    users = Users()
    cache.get("1", users)
    cache.get("2", users)
    cache.invalidate_all()
    cache.get("1", users)
    cache.get("2", users)
    assert users.calls == ["1", "2", "1", "2"]
    assert cache.stats().invalidations == 1


def test_invalidation_reaches_another_cache_sharing_the_version_store(two_caches):
    # What RedisVersionStore does across processes, with two caches in one process.
    here, there = two_caches
    users = Users()
    there.get("1", users)
    here.invalidate("1")
    there.get("1", users)
    assert users.calls == ["1", "1"]
    here.invalidate_all()
    there.get("1", users)
    assert len(users.calls) == 3


def test_an_entry_is_stale_as_soon_as_its_stamp_moves(cache):
    # A bump that did not go through this cache (another worker, via the store).
    users = Users()
    cache.get("1", users)
    cache.versions.bump("1")
    cache.get("1", users)
    assert len(users.calls) == 2


def test_clear_empties_this_cache_without_bumping_versions(two_caches):
    here, there = two_caches
    users = Users()
    here.get("1", users)
    there.get("1", users)
    here.clear()
    here.get("1", users)
    there.get("1", users)
    assert users.calls == ["1", "1", "1"]


def test_assigning_a_new_version_store_forgets_entries(cache):
    users = Users()
    cache.get("1", users)
    store = LocalVersionStore()
    cache.versions = store
    assert cache.versions is store
    cache.get("1", users)
    assert len(users.calls) == 2
    with pytest.raises(TypeError):
        cache.versions = object()


# -- adapter ----------------------------------------------------------------------------


class Boxes:
    """Stores tuples, hands out a fresh list per caller; logs every call."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def to_cache(self, value):
        self.log.append(("to", value))
        return ("stored", value)

    def from_cache(self, stored):
        self.log.append(("from", stored))
        return ["fresh", stored[1]]


def test_adapter_stores_once_and_hands_out_to_every_caller(cache):
    cache.adapter = adapter = Boxes()
    users = Users()
    first = cache.get("1", users)
    second = cache.get("1", users)
    assert first == second == ["fresh", "alice"]
    assert first is not second
    assert adapter.log == [("to", "alice"), ("from", ("stored", "alice")), ("from", ("stored", "alice"))]


def test_adapter_never_sees_none(cache):
    cache.adapter = adapter = Boxes()
    assert cache.get("7", Users()) is None
    assert cache.get("7", Users()) is None
    assert adapter.log == []


def test_adapter_failure_is_a_load_error_and_not_cached(cache):
    class Broken(Boxes):
        def to_cache(self, value):
            raise RuntimeError("cannot detach")

    cache.adapter = Broken()
    users = Users()
    with pytest.raises(RuntimeError):
        cache.get("1", users)
    cache.adapter = None
    assert cache.get("1", users) == "alice"
    assert cache.stats().load_errors == 1


# -- the loader decorator and install() -------------------------------------------------


def test_cached_keeps_the_loader_name_and_goes_through_the_cache(cache):
    users = Users()

    @cache.cached
    def load_user(user_id):
        """Load one user."""
        return users(user_id)

    assert load_user.__name__ == "load_user"
    assert load_user.__doc__ == "Load one user."
    assert load_user.__wrapped__(1) == "alice"
    assert load_user("1") == "alice" and load_user("1") == "alice"
    assert users.calls == [1, "1"]  # one direct call, one cached load


def test_cached_twice_wraps_once(cache):
    users = Users()
    once = cache.cached(users)
    assert cache.cached(once) is once
    assert cache.cached(on_hit=None)(once) is once


def test_cached_by_another_cache_is_refused(cache):
    once = cache.cached(Users())
    with pytest.raises(ValueError, match="another UserCache"):
        UserCache().cached(once)


def test_on_hit_runs_only_when_the_loader_did_not(cache):
    seen = []
    loader = cache.cached(Users(), on_hit=seen.append)
    loader("1")
    assert seen == []
    loader("1")
    loader("1")
    assert seen == ["alice", "alice"]
    loader("7")
    loader("7")  # a negative hit: nothing to replay
    assert seen == ["alice", "alice"]


def test_install_puts_the_registered_loader_behind_the_cache(cache):
    manager = LoginManager()
    users = Users()
    manager.user_loader(users)
    installed = cache.install(manager)
    assert manager._user_callback is installed
    assert installed.__wrapped__ is users
    for _ in range(5):
        assert manager._user_callback("1") == "alice"
    assert users.calls == ["1"]


def test_install_twice_wraps_once(cache):
    manager = LoginManager()
    users = Users()
    manager.user_loader(users)
    first = cache.install(manager)
    assert cache.install(manager) is first
    assert manager._user_callback.__wrapped__ is users


def test_install_after_decorating_with_cached_wraps_once(cache):
    manager = LoginManager()
    decorated = cache.cached(Users())
    manager.user_loader(decorated)
    assert cache.install(manager) is decorated


def test_install_without_a_registered_loader_fails_clearly(cache):
    with pytest.raises(RuntimeError, match="no user_loader is registered"):
        cache.install(LoginManager())


def test_install_on_something_else_fails_clearly(cache):
    with pytest.raises(RuntimeError, match="needs a Flask-Login LoginManager"):
        cache.install(object())


# -- configuration ----------------------------------------------------------------------


def test_defaults(clock):
    cache = UserCache(timer=clock)
    values = {name: resolved.value for name, resolved in cache.settings.items()}
    assert values == {name: SETTINGS[name].default for name in CACHE_SETTINGS}
    assert {resolved.source for resolved in cache.settings.values()} == {"default"}
    assert isinstance(cache.versions, LocalVersionStore)


@pytest.mark.parametrize(
    ("name", "keyword", "env", "argument", "config", "expected"),
    [
        ("IDENTITY_CACHE_TTL", "ttl", "30", 20, 10, 30.0),
        ("IDENTITY_CACHE_MAXSIZE", "maxsize", "300", 200, 100, 300),
        ("IDENTITY_CACHE_NEGATIVE_TTL", "negative_ttl", "3", 2, 1, 3.0),
    ],
)
def test_precedence_environment_argument_config_default(monkeypatch, name, keyword, env, argument, config, expected):
    app = Flask(__name__)
    app.config[name] = config
    assert UserCache(app).settings[name].value == config
    assert UserCache(app).settings[name].source == "app.config"
    assert UserCache(app, **{keyword: argument}).settings[name].value == argument
    monkeypatch.setenv(name, env)
    resolved = UserCache(app, **{keyword: argument}).settings[name]
    assert (resolved.value, resolved.source) == (expected, "environment")


def test_init_app_applies_config_and_registers(clock):
    cache = UserCache(timer=clock)
    app = Flask(__name__)
    app.config.update(IDENTITY_CACHE_TTL=5, IDENTITY_CACHE_MAXSIZE=2)
    cache.init_app(app)
    assert app.extensions["identity_cache"] is cache
    users = Users({k: k for k in "abc"})
    for key in "abc":
        cache.get(key, users)
    assert len(cache) == 2
    clock.advance(5)
    cache.get("c", users)
    assert users.calls.count("c") == 2


def test_ttl_zero_from_config_turns_an_existing_cache_off(clock):
    cache = UserCache(timer=clock)
    users = Users()
    cache.get("1", users)
    app = Flask(__name__)
    app.config["IDENTITY_CACHE_TTL"] = 0
    cache.init_app(app)
    cache.get("1", users)
    cache.get("1", users)
    assert len(users.calls) == 3


@pytest.mark.parametrize(
    ("name", "keyword", "bad"),
    [
        ("IDENTITY_CACHE_TTL", "ttl", -1),
        ("IDENTITY_CACHE_TTL", "ttl", "abc"),
        ("IDENTITY_CACHE_TTL", "ttl", float("nan")),
        ("IDENTITY_CACHE_MAXSIZE", "maxsize", 0),
        ("IDENTITY_CACHE_MAXSIZE", "maxsize", 1.5),
        ("IDENTITY_CACHE_MAXSIZE", "maxsize", "many"),
        ("IDENTITY_CACHE_NEGATIVE_TTL", "negative_ttl", -0.5),
        ("IDENTITY_CACHE_NEGATIVE_TTL", "negative_ttl", "soon"),
    ],
)
def test_bad_argument_is_a_config_error_naming_setting_and_value(name, keyword, bad):
    with pytest.raises(ConfigError) as caught:
        UserCache(**{keyword: bad})
    assert caught.value.name == name
    assert name in str(caught.value) and repr(bad) in str(caught.value)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("IDENTITY_CACHE_TTL", "-5"),
        ("IDENTITY_CACHE_MAXSIZE", "0"),
        ("IDENTITY_CACHE_NEGATIVE_TTL", "x"),
        ("IDENTITY_VERSION_STORE", "memcached://127.0.0.1:11211"),
        ("IDENTITY_VERSION_STORE", "locale"),
    ],
)
def test_bad_environment_value_is_a_config_error_at_construction(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(ConfigError) as caught:
        UserCache()
    assert caught.value.name == name and repr(bad) in str(caught.value)
    assert "environment" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("IDENTITY_CACHE_TTL", "1 minute"),
        ("IDENTITY_CACHE_MAXSIZE", -3),
        ("IDENTITY_CACHE_NEGATIVE_TTL", -1),
        ("IDENTITY_VERSION_STORE", "http://127.0.0.1:6379"),
    ],
)
def test_bad_app_config_is_a_config_error_at_init_app(name, bad):
    app = Flask(__name__)
    app.config[name] = bad
    cache = UserCache()
    with pytest.raises(ConfigError) as caught:
        cache.init_app(app)
    assert caught.value.name == name and repr(bad) in str(caught.value)
    assert "identity_cache" not in app.extensions
    with pytest.raises(ConfigError):
        UserCache(app)


def test_explicit_version_store_wins_over_the_setting(monkeypatch):
    monkeypatch.setenv("IDENTITY_VERSION_STORE", "redis://127.0.0.1:6379/0")
    store = LocalVersionStore()
    cache = UserCache(versions=store)
    assert cache.versions is store
    assert cache.settings["IDENTITY_VERSION_STORE"].source == "argument"


def test_redis_url_builds_a_redis_version_store(monkeypatch, redis_url):
    from identity_middleware.redis_versions import RedisVersionStore

    monkeypatch.setenv("IDENTITY_VERSION_STORE", redis_url)
    cache = UserCache()
    try:
        assert isinstance(cache.versions, RedisVersionStore)
        assert cache.settings["IDENTITY_VERSION_STORE"].value == redis_url
    finally:
        cache.close()


def test_version_prefix_setting_reaches_the_redis_store(monkeypatch, redis_url, redis_prefix):
    monkeypatch.setenv("IDENTITY_VERSION_STORE", redis_url)
    cache = UserCache(version_prefix=redis_prefix)
    try:
        assert cache.versions.prefix == redis_prefix
        assert cache.settings["IDENTITY_VERSION_PREFIX"].source == "argument"
    finally:
        cache.close()


def test_changing_the_prefix_in_app_config_builds_a_new_store(monkeypatch, redis_url, redis_prefix):
    monkeypatch.setenv("IDENTITY_VERSION_STORE", redis_url)
    cache = UserCache()
    first = cache.versions
    app = Flask(__name__)
    app.config["IDENTITY_VERSION_PREFIX"] = redis_prefix
    try:
        cache.init_app(app)
        assert cache.versions is not first and cache.versions.prefix == redis_prefix
    finally:
        cache.close()


@pytest.mark.parametrize("bad", ["", "has space:", "x" * 101])
def test_bad_version_prefix_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="IDENTITY_VERSION_PREFIX"):
        UserCache(version_prefix=bad)


# -- the per-request record for the Server-Timing header --------------------------------


def test_each_get_in_a_request_records_its_outcome_and_duration(clock):
    app = Flask(__name__)
    cache = UserCache(app, timer=clock)
    users = Users()
    expected = [("1", "miss"), ("1", "hit"), ("7", "miss"), ("7", "negative")]
    for user_id, outcome in expected:
        with app.test_request_context("/"):
            cache.get(user_id, users)
            assert g._identity_cache_outcome == outcome
            assert isinstance(g._identity_cache_seconds, float) and g._identity_cache_seconds >= 0


def test_ttl_zero_records_bypass(clock):
    app = Flask(__name__)
    cache = UserCache(app, ttl=0, timer=clock)
    with app.test_request_context("/"):
        cache.get("1", Users())
        assert g._identity_cache_outcome == "bypass"


def test_nothing_is_recorded_outside_a_request(clock):
    app = Flask(__name__)
    cache = UserCache(app, timer=clock)
    with app.app_context():
        cache.get("1", Users())
        assert "_identity_cache_outcome" not in g


# -- one cache, several apps ------------------------------------------------------------


def two_apps_sharing(cache, users, second_config=None):
    """Two real Flask apps (Flask-Login each) behind one cache, as a process serving
    several apps (DispatcherMiddleware, say) would set them up."""
    from flask_login import current_user, login_user

    apps = []
    for name, config in (("first", {}), ("second", second_config or {})):
        app = Flask(name)
        app.config.update(SECRET_KEY="x", **config)
        LoginManager(app).user_loader(cache.cached(users))
        app.add_url_rule("/login/<user_id>", "login", lambda user_id: str(login_user(Named(user_id))))
        app.add_url_rule("/me", "me", lambda: str(current_user._get_current_object()))
        apps.append(app)
    cache.init_app(apps[0])
    cache.init_app(apps[1])
    return apps


class Named:
    """What a login form would hand to login_user: anything with get_id()."""

    is_authenticated = is_active = True
    is_anonymous = False

    def __init__(self, user_id):
        self.id = user_id

    def get_id(self):
        return self.id


def me(app, user_id="1"):
    client = app.test_client()
    assert client.get(f"/login/{user_id}").text == "True"
    return client.get("/me").text


def test_two_apps_with_the_same_settings_share_one_cache(clock):
    cache, users = UserCache(timer=clock), Users()
    first, second = two_apps_sharing(
        cache, users, {"IDENTITY_CACHE_TTL": SETTINGS["IDENTITY_CACHE_TTL"].default}
    )
    assert first.extensions["identity_cache"] is second.extensions["identity_cache"] is cache
    assert me(first) == "alice"
    assert me(second) == "alice"
    assert users.calls == ["1"]  # the second app was answered from the first app's load
    cache.invalidate("1")
    users.rows["1"] = "alice v2"
    assert me(second) == "alice v2"
    assert me(first) == "alice v2"
    assert users.calls == ["1", "1"]


def test_a_second_app_with_another_ttl_is_a_config_error_that_changes_nothing(clock):
    cache, users = UserCache(timer=clock), Users()
    with pytest.raises(ConfigError) as caught:
        two_apps_sharing(cache, users, {"IDENTITY_CACHE_TTL": 5})
    default = SETTINGS["IDENTITY_CACHE_TTL"].default
    assert caught.value.name == "IDENTITY_CACHE_TTL" and caught.value.value == 5.0
    message = str(caught.value)
    assert "'first'" in message and "own UserCache" in message and repr(float(default)) in message
    assert cache.settings["IDENTITY_CACHE_TTL"].value == default  # the first app's TTL stands
    cache.get("1", users)
    clock.advance(10)
    cache.get("1", users)
    assert users.calls == ["1"]  # still cached after 10 s: the TTL was not replaced


def test_a_second_app_never_closes_the_version_store_the_first_app_uses(monkeypatch, redis_url, redis_prefix):
    monkeypatch.setenv("IDENTITY_VERSION_STORE", redis_url)
    first, second = Flask("first"), Flask("second")
    first.config["IDENTITY_VERSION_PREFIX"] = redis_prefix
    second.config["IDENTITY_VERSION_PREFIX"] = redis_prefix + "other:"
    cache = UserCache(first)
    store = cache.versions
    try:
        assert store.wait_synced(10)
        with pytest.raises(ConfigError, match="IDENTITY_VERSION_PREFIX"):
            cache.init_app(second)
        assert "identity_cache" not in second.extensions
        assert cache.versions is store and store.synced  # same store, still open
        users = Users()
        cache.get("1", users)
        cache.get("1", users)
        assert users.calls == ["1"]
    finally:
        cache.close()


def test_the_shared_settings_error_never_shows_a_password():
    first, second = Flask("first"), Flask("second")
    first.config["IDENTITY_VERSION_STORE"] = "redis://:s3cret@127.0.0.1:6379/0"
    second.config["IDENTITY_VERSION_STORE"] = "redis://:other-s3cret@127.0.0.1:6379/1"
    cache = UserCache(first)  # connects lazily: nothing to reach here
    try:
        with pytest.raises(ConfigError, match="IDENTITY_VERSION_STORE") as caught:
            cache.init_app(second)
        assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    finally:
        cache.close()


def test_init_app_again_on_the_only_app_still_reconfigures(clock):
    cache = UserCache(timer=clock)
    app = Flask(__name__)
    cache.init_app(app)
    app.config["IDENTITY_CACHE_TTL"] = 5
    cache.init_app(app)
    assert cache.settings["IDENTITY_CACHE_TTL"].value == 5.0


def test_an_app_that_was_garbage_collected_no_longer_pins_the_settings(clock):
    import gc

    cache = UserCache(timer=clock)
    cache.init_app(Flask("gone"))
    gc.collect()
    app = Flask("next")
    app.config["IDENTITY_CACHE_TTL"] = 5
    cache.init_app(app)
    assert cache.settings["IDENTITY_CACHE_TTL"].value == 5.0


# -- async loaders ------------------------------------------------------------------------


async def async_loader(user_id):
    return "alice"


class AsyncCallable:
    async def __call__(self, user_id):
        return "alice"


@pytest.mark.parametrize("loader", [async_loader, AsyncCallable()], ids=["async def", "async __call__"])
def test_cached_refuses_an_async_loader(cache, loader):
    with pytest.raises(TypeError, match="async loader .*plain def"):
        cache.cached(loader)
    with pytest.raises(TypeError, match="async loader"):
        cache.cached(on_hit=None)(loader)


def test_install_refuses_an_async_loader(cache):
    login_manager = LoginManager()
    login_manager.user_loader(async_loader)
    with pytest.raises(TypeError, match="async loader"):
        cache.install(login_manager)
    assert login_manager._user_callback is async_loader  # nothing was replaced


# -- the local version store's memory --------------------------------------------------


def test_local_version_store_memory_stays_bounded_however_many_users_are_invalidated():
    """200,000 distinct invalidations with max_keys=10,000: memory of ~10,000 counters,
    not 200,000 (the unbounded store grew by ~88 MB per million)."""
    import tracemalloc

    store = LocalVersionStore(max_keys=10_000)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for user in range(200_000):
            store.bump(str(user))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    print(f"\nLocalVersionStore after 200,000 distinct invalidations: {store.size} counters, +{grown / 1e6:.2f} MB")
    assert store.size <= 10_000
    assert grown < 3_000_000  # ~10,000 counters (about 1.5 MB), not 200,000 (about 18 MB)


def test_local_version_store_never_returns_to_an_old_stamp_across_generations():
    store = LocalVersionStore(max_keys=3)
    history = [store.stamp("a")]
    for user in ["a", "b", "c", "d", "a", "e", "f", "a", "g"] * 3:  # overflows several times
        store.bump(user)
        now = store.stamp("a")
        if now != history[-1]:
            assert now not in history
            history.append(now)
    assert store.size <= 3
    assert len(history) > 6


def test_a_cached_entry_goes_stale_when_the_store_starts_a_new_generation(clock):
    store = LocalVersionStore(max_keys=2)
    cache, users = UserCache(versions=store, timer=clock), Users()
    cache.get("1", users)
    for other in ("x", "y", "z"):  # the third distinct key overflows: a new generation
        cache.invalidate(other)
    cache.get("1", users)
    assert users.calls == ["1", "1"]  # reloaded once, as after invalidate_all
    cache.get("1", users)
    assert users.calls == ["1", "1"]
