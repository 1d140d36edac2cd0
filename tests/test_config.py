"""Settings precedence (environment > argument > app.config > default) and ConfigError."""

from __future__ import annotations

import pytest
from flask import Flask

from identity_middleware import ConfigError
from identity_middleware.config import SETTINGS, resolve, resolve_one


@pytest.fixture
def app() -> Flask:
    return Flask(__name__)


def test_default_when_nothing_is_given(app):
    resolved = resolve_one("IDENTITY_CACHE_TTL", None, app, environ={})
    assert (resolved.value, resolved.source) == (SETTINGS["IDENTITY_CACHE_TTL"].default, "default")


def test_app_config_beats_default(app):
    app.config["IDENTITY_CACHE_TTL"] = 30
    assert resolve_one("IDENTITY_CACHE_TTL", None, app, environ={}).value == 30.0


def test_argument_beats_app_config(app):
    app.config["IDENTITY_CACHE_TTL"] = 30
    resolved = resolve_one("IDENTITY_CACHE_TTL", 12, app, environ={})
    assert (resolved.value, resolved.source) == (12.0, "argument")


def test_environment_beats_argument(app):
    app.config["IDENTITY_CACHE_TTL"] = 30
    resolved = resolve_one("IDENTITY_CACHE_TTL", 12, app, environ={"IDENTITY_CACHE_TTL": "7.5"})
    assert (resolved.value, resolved.source) == (7.5, "environment")


def test_process_environment_is_read_by_default(app, monkeypatch):
    monkeypatch.setenv("IDENTITY_CACHE_MAXSIZE", "42")
    assert resolve(["IDENTITY_CACHE_MAXSIZE"], app=app)["IDENTITY_CACHE_MAXSIZE"].value == 42


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("IDENTITY_CACHE_TTL", "abc"),
        ("IDENTITY_CACHE_TTL", "-1"),
        ("IDENTITY_CACHE_TTL", "nan"),
        ("IDENTITY_CACHE_TTL", "inf"),
        ("IDENTITY_CACHE_MAXSIZE", "0"),
        ("IDENTITY_CACHE_MAXSIZE", "1.5"),
        ("IDENTITY_CACHE_MAXSIZE", "many"),
        ("IDENTITY_CACHE_NEGATIVE_TTL", "-0.5"),
        ("IDENTITY_STATIC_PATHS", "favicon.ico"),
        ("IDENTITY_STATIC_PATHS", "/assets/../secret/"),
        ("IDENTITY_STATIC_PATHS", "/assets/./x"),
        ("IDENTITY_STATIC_PATHS", "/a//b"),
        ("IDENTITY_STATIC_PATHS", "/a\\b.css"),
        ("IDENTITY_STATIC_PATHS", "/lone-\udc80-surrogate"),
        ("IDENTITY_VERSION_STORE", "memcached://127.0.0.1"),
        ("IDENTITY_VERSION_STORE", "redis://127.0.0.1:notaport/0"),
        ("IDENTITY_VERSION_STORE", "nonsense"),
        ("IDENTITY_SERVE_STATIC", "maybe"),
        ("IDENTITY_DEBUG_HEADERS", "2"),
    ],
)
def test_bad_environment_value_names_setting_value_and_expectation(app, name, raw):
    with pytest.raises(ConfigError) as info:
        resolve_one(name, None, app, environ={name: raw})
    message = str(info.value)
    assert name in message and repr(raw) in message and "expected" in message
    assert info.value.name == name and info.value.value == raw


def test_bad_app_config_value_is_reported_with_its_source(app):
    app.config["IDENTITY_CACHE_MAXSIZE"] = -3
    with pytest.raises(ConfigError, match="from app.config"):
        resolve_one("IDENTITY_CACHE_MAXSIZE", None, app, environ={})


def test_booleans_are_not_numbers(app):
    with pytest.raises(ConfigError):
        resolve_one("IDENTITY_CACHE_MAXSIZE", True, app, environ={})


def test_static_paths_are_split_on_commas_and_trimmed(app):
    resolved = resolve_one("IDENTITY_STATIC_PATHS", None, app, environ={"IDENTITY_STATIC_PATHS": " /favicon.ico, /assets/ ,"})
    assert resolved.value == ("/favicon.ico", "/assets/")


def test_static_paths_accept_a_list_argument(app):
    assert resolve_one("IDENTITY_STATIC_PATHS", ["/robots.txt"], app, environ={}).value == ("/robots.txt",)


@pytest.mark.parametrize("url", ["local", "redis://127.0.0.1:6379/0", "rediss://:secret@cache.example:6380/2", "unix:///run/redis.sock"])
def test_version_store_accepts_local_and_redis_urls(app, url):
    assert resolve_one("IDENTITY_VERSION_STORE", url, app, environ={}).value == url


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("0", False), ("true", True), ("off", False)])
def test_switches_parse_common_spellings(app, raw, value):
    assert resolve_one("IDENTITY_SERVE_STATIC", None, app, environ={"IDENTITY_SERVE_STATIC": raw}).value is value


def test_a_bad_redis_url_is_reported_without_its_password(app):
    raw = "redis://:hunter2@cache.example:notaport/0"
    with pytest.raises(ConfigError) as info:
        resolve_one("IDENTITY_VERSION_STORE", None, app, environ={"IDENTITY_VERSION_STORE": raw})
    assert "hunter2" not in str(info.value)
    assert "IDENTITY_VERSION_STORE" in str(info.value) and "cache.example" in str(info.value)


def test_switch_error_lists_every_spelling_it_accepts(app):
    with pytest.raises(ConfigError) as info:
        resolve_one("IDENTITY_SERVE_STATIC", None, app, environ={"IDENTITY_SERVE_STATIC": "maybe"})
    message = str(info.value)
    for spelling in ("1, true, yes or on", "0, false, no, off or empty"):
        assert spelling in message
    assert "expected 0 or 1" not in message


@pytest.mark.parametrize(("raw", "value"), [("YES", True), ("On", True), ("no", False), ("", False), ("FALSE", False)])
def test_switches_accept_what_the_message_says(app, raw, value):
    assert resolve_one("IDENTITY_DEBUG_HEADERS", None, app, environ={"IDENTITY_DEBUG_HEADERS": raw}).value is value


def test_environment_static_paths_extend_the_argument(app):
    resolved = resolve_one("IDENTITY_STATIC_PATHS", ["/favicon.ico"], app, environ={"IDENTITY_STATIC_PATHS": "/robots.txt,/favicon.ico"})
    assert resolved.value == ("/favicon.ico", "/robots.txt")
    assert resolved.source == "argument + environment"


def test_environment_static_paths_extend_app_config(app):
    app.config["IDENTITY_STATIC_PATHS"] = "/favicon.ico"
    resolved = resolve_one("IDENTITY_STATIC_PATHS", None, app, environ={"IDENTITY_STATIC_PATHS": "/assets/"})
    assert (resolved.value, resolved.source) == (("/favicon.ico", "/assets/"), "app.config + environment")


def test_environment_static_paths_alone_are_the_list(app):
    resolved = resolve_one("IDENTITY_STATIC_PATHS", None, app, environ={"IDENTITY_STATIC_PATHS": "/assets/"})
    assert (resolved.value, resolved.source) == (("/assets/",), "environment")


def test_environment_still_replaces_a_single_value_setting_without_reading_the_code_value(app):
    resolved = resolve_one("IDENTITY_CACHE_TTL", "not a number", app, environ={"IDENTITY_CACHE_TTL": "5"})
    assert (resolved.value, resolved.source) == (5.0, "environment")


def test_a_bad_static_path_names_the_path_and_the_problem(app):
    with pytest.raises(ConfigError) as info:
        resolve_one("IDENTITY_STATIC_PATHS", None, app, environ={"IDENTITY_STATIC_PATHS": "/favicon.ico,assets/"})
    assert "('assets/' does not start with '/')" in str(info.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/notadb", "the database must be a number after the port, like /0, not '/notadb'"),
        ("redis://127.0.0.1:99999/0", "the port must be a number from 1 to 65535"),
        ("redis://127.0.0.1:0/0", "the port must be a number from 1 to 65535"),
        ("redis:///0", "the URL names no host"),
        ("http://127.0.0.1:6379/0", "the URL must start with redis://, rediss:// or unix://"),
        ("unix://run/redis.sock", "a unix:// URL must name an absolute socket path"),
        ("redis://127.0.0.1:6379/0?db=x", "the db query parameter must be a number"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "redis-py: Invalid value for "),  # names socket_timeout
        ("redis://:abc/def@127.0.0.1:6379/0", "a '/', '?', '#' or '@' in the user name or password must be percent-encoded"),
        ("redis://:abc#def@127.0.0.1:6379/0", "must be percent-encoded"),
        ("redis://:abc?def@127.0.0.1:6379/0", "must be percent-encoded"),
    ],
)
def test_a_bad_redis_url_says_which_part_is_wrong(app, url, problem):
    with pytest.raises(ConfigError) as info:
        resolve_one("IDENTITY_VERSION_STORE", url, app, environ={})
    assert problem in str(info.value)
    for secret in ("abc", "def"):
        if "@" in url:
            assert secret not in str(info.value) and secret not in repr(info.value.value)
