"""``flask identity status|check|invalidate`` through Flask's CLI runner, on the example app."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flask import Flask

from identity_middleware import cli
from identity_middleware.log import multi_process_server

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(cli.__file__).resolve().parent  # the installed package in CI's wheel run


@pytest.fixture
def app(sqlite_url, monkeypatch):
    for name in ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "SERVER_SOFTWARE", "UWSGI_PROCESSES", "UWSGI_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    from examples.app import create_app

    app = create_app(sqlite_url)
    cli.register(app)
    return app


def run(app: Flask, *args: str):
    return app.test_cli_runner().invoke(args=["identity", *args])


def test_group_is_registered_once(app):
    cli.register(app)
    assert app.cli.commands["identity"] is cli.identity
    assert set(cli.identity.commands) == {"status", "check", "invalidate"}


# -- status -------------------------------------------------------------------------


def test_status_lists_every_setting_with_its_source(sqlite_url, monkeypatch):
    monkeypatch.setenv("IDENTITY_CACHE_TTL", "30")
    from examples.app import create_app

    app = create_app(sqlite_url, config={"IDENTITY_CACHE_MAXSIZE": 500})
    cli.register(app)
    result = run(app, "status")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line.strip().startswith("IDENTITY_")}
    assert rows["IDENTITY_CACHE_TTL"] == ["30", "environment"]
    assert rows["IDENTITY_CACHE_MAXSIZE"] == ["500", "app.config"]
    assert rows["IDENTITY_STATIC_PATHS"] == ["/favicon.ico", "argument"]
    assert rows["IDENTITY_CACHE_NEGATIVE_TTL"][1:] == ["default"]
    assert rows["IDENTITY_VERSION_STORE"] == ["local", "default"]
    assert rows["IDENTITY_SERVE_STATIC"] == ["0", "default"]
    assert rows["IDENTITY_DEBUG_HEADERS"] == ["0", "default"]


def test_status_shows_mounts_shadowing_views_and_listed_paths(app):
    output = run(app, "status").output
    assert "/static/" in output and "folder " + app.static_folder in output
    assert "/widgets/static/" in output and "widgets.static" in output
    assert "not static: /static/config.js (dynamic view 'config_js' shadows the mount)" in output
    assert "/favicon.ico" in output and "covers favicon" in output
    assert "<LocalVersionStore" in output and "this process only" in output


def test_status_shows_the_view_an_exact_listed_path_makes_anonymous_without_warning(app):
    """README's own example lists /favicon.ico, a dynamic view, on purpose: no warning for it."""
    output = run(app, "status").output
    assert "/favicon.ico" in output and "exact  covers favicon -- a view: identity loads only when it asks, on GET and HEAD" in output
    warnings = output.split("Warnings:", 1)[1]
    assert warnings.strip() == "none"


def _prefix_app(static_paths):
    from identity_middleware import IdentityMiddleware

    app = Flask(__name__)
    app.add_url_rule("/assets/manifest.json", "manifest", lambda: "{}")
    app.add_url_rule("/assets/me.json", "me", lambda: "{}")
    app.add_url_rule("/assets/upload", "upload", lambda: "", methods=["POST"])
    app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=static_paths)  # type: ignore[method-assign]
    cli.register(app)
    return app


def test_status_warns_when_a_listed_prefix_covers_dynamic_views_naming_each_once():
    warnings = run(_prefix_app(["/assets/"]), "status").output.split("Warnings:", 1)[1]
    assert (
        "listed prefix /assets/ also covers the dynamic views 'manifest' (/assets/manifest.json) "
        "and 'me' (/assets/me.json): GET and HEAD requests to it skip Flask-Principal's eager identity load" in warnings
    )
    assert "upload" not in warnings  # POST-only: never static, never affected


def test_status_warns_in_the_singular_for_one_dynamic_view():
    app = Flask(__name__)
    app.add_url_rule("/assets/manifest.json", "manifest", lambda: "{}")
    from identity_middleware import IdentityMiddleware

    app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=["/assets/"])  # type: ignore[method-assign]
    cli.register(app)
    warnings = run(app, "status").output.split("Warnings:", 1)[1]
    assert "also covers the dynamic view 'manifest' (/assets/manifest.json): GET and HEAD" in warnings


def test_status_warns_about_a_local_store_with_several_workers(app, monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    warnings = run(app, "status").output.split("Warnings:", 1)[1]
    assert "version store is local to each process (WEB_CONCURRENCY=4)" in warnings


def test_status_warns_when_login_manager_and_principal_are_missing():
    from identity_middleware import IdentityMiddleware

    bare = Flask(__name__)
    bare.wsgi_app = IdentityMiddleware(bare.wsgi_app)  # type: ignore[method-assign]
    cli.register(bare)
    result = run(bare, "status")
    assert result.exit_code == 0, result.output
    warnings = result.output.split("Warnings:", 1)[1]
    assert "no Flask-Login LoginManager" in warnings
    assert "no Flask-Principal Principal" in warnings
    assert "User cache:\n  not installed" in result.output


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["/venv/bin/gunicorn", "app:app"], {}, "running under gunicorn"),
        (["/venv/lib/python3/site-packages/gunicorn/__main__.py"], {}, "running under gunicorn"),
        (["/usr/bin/uwsgi"], {}, "running under uwsgi"),
        (["flask"], {"WEB_CONCURRENCY": "3"}, "WEB_CONCURRENCY=3"),
        (["flask"], {"GUNICORN_CMD_ARGS": "--workers 4 --bind :80"}, "GUNICORN_CMD_ARGS=--workers 4 --bind :80"),
        (["flask"], {"WEB_CONCURRENCY": "1"}, None),
        (["flask"], {}, None),
    ],
)
def test_multi_process_server_detection(argv, environ, expected):
    assert multi_process_server(environ, argv, modules={}) == expected


# -- check --------------------------------------------------------------------------


def test_check_a_static_path_names_the_mount_and_endpoint(app):
    result = run(app, "check", "/static/app.css", "/widgets/static/widget.css")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "'/static/app.css' GET: static -- routed to static endpoint 'static' [mount /static/]"
    assert lines[1].startswith("'/widgets/static/widget.css' GET: static -- routed to static endpoint 'widgets.static'")


def test_check_a_shadowed_path_names_the_rule(app):
    result = run(app, "check", "/static/config.js")
    assert result.exit_code == 1  # not static: a script can test the verdict
    output = result.output
    assert output.startswith("'/static/config.js' GET: not static -- shadowed by rule '/static/config.js'")
    assert "config_js" in output


def test_check_non_canonical_paths_name_the_failed_check(app):
    output = run(app, "check", "/static/../admin", "/static//app.css", "/static/./app.css").output
    assert "'/static/../admin' GET: not static -- not canonical: the path contains a '..' segment" in output
    assert "'/static//app.css' GET: not static -- not canonical: the path contains '//'" in output
    assert "'/static/./app.css' GET: not static -- not canonical: the path contains a '.' segment" in output


def test_check_listed_path_method_and_dynamic_page(app):
    result = run(app, "check", "/favicon.ico", "/", "/static-reports")
    assert result.exit_code == 1  # one of them is not static
    output = result.output.splitlines()
    assert output[0] == "'/favicon.ico' GET: static -- listed path [listed /favicon.ico]"
    assert output[1] == "'/' GET: not static -- not under a static mount or a listed path"
    assert output[2].startswith("'/static-reports' GET: not static")
    post = run(app, "check", "--method", "post", "/static/app.css").output
    assert post.strip() == "'/static/app.css' POST: not static -- method POST is never static"


def test_check_needs_the_middleware():
    bare = Flask(__name__)
    cli.register(bare)
    result = run(bare, "check", "/static/app.css")
    assert result.exit_code != 0
    assert "IdentityMiddleware does not wrap" in result.output


def test_check_exits_zero_only_when_every_path_is_static(app):
    assert run(app, "check", "/static/app.css", "/favicon.ico").exit_code == 0
    assert run(app, "check", "/static/app.css", "/static/config.js").exit_code == 1


@pytest.mark.parametrize(
    ("argument", "says"),
    [
        ("static/app.css", "'static/app.css' does not start with '/'; paths are checked as requests carry them, e.g. '/static/app.css'"),
        ("https://example.com/static/app.css", "is a URL; give its path only, e.g. '/static/app.css'"),
        ("//cdn.example.com/static/app.css", "is a URL; give its path only"),
        ("/static/app.css?v=3", "has a query or fragment; give the path without"),
    ],
)
def test_check_refuses_what_is_not_a_request_path_and_says_what_to_give(app, argument, says):
    result = run(app, "check", argument)
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())
    assert "not under a static mount" not in result.output


# -- invalidate ---------------------------------------------------------------------


def test_invalidate_refuses_with_the_local_store(app):
    cache = app.extensions["identity_cache"]
    before = cache.stats().invalidations
    result = run(app, "invalidate", "1")
    assert result.exit_code == 1
    assert "would only affect this CLI's own process" in result.output
    assert cache.stats().invalidations == before
    assert run(app, "invalidate", "--all").exit_code == 1


def test_invalidate_needs_ids_or_all_not_both(app):
    assert run(app, "invalidate").exit_code == 2
    assert run(app, "invalidate", "1", "--all").exit_code == 2


def test_invalidate_fails_when_redis_is_unreachable(app, monkeypatch, redis_prefix):
    from identity_middleware.redis_versions import RedisVersionStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    store = RedisVersionStore(f"redis://127.0.0.1:{port}/0", prefix=redis_prefix, socket_timeout=0.2)
    app.extensions["identity_cache"].versions = store
    monkeypatch.setattr(cli, "SYNC_TIMEOUT", 0.5)
    try:
        result = run(app, "invalidate", "1")
    finally:
        store.close()
    assert result.exit_code == 1
    assert "not connected" in result.output and "nothing was invalidated" in result.output


OTHER_PROCESS = textwrap.dedent(
    """
    import json, sys
    from identity_middleware import UserCache
    from identity_middleware.redis_versions import RedisVersionStore

    store = RedisVersionStore(sys.argv[1], prefix=sys.argv[2])
    assert store.wait_synced(10), "no link to Redis"
    cache = UserCache(versions=store, ttl=300)
    loads = []

    def loader(user_id):
        loads.append(user_id)
        return {"id": user_id}

    def get_all():
        for user_id in ("1", "2"):
            cache.get(user_id, loader)
        print(json.dumps(loads), flush=True)

    get_all()
    for line in sys.stdin:
        get_all()
    store.close()
    """
)


def test_invalidate_through_redis_reaches_a_cache_in_another_process(app, redis_url, redis_prefix):
    from identity_middleware.redis_versions import RedisVersionStore

    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, redis_url, redis_prefix],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    store = RedisVersionStore(redis_url, prefix=redis_prefix)
    app.extensions["identity_cache"].versions = store

    def loads_in_other() -> list[str]:
        other.stdin.write("get\n")
        other.stdin.flush()
        return json.loads(other.stdout.readline())

    def wait_for(expected: list[str]) -> list[str]:
        deadline = time.monotonic() + 5
        seen = loads_in_other()
        while seen != expected and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = loads_in_other()
        return seen

    try:
        assert json.loads(other.stdout.readline()) == ["1", "2"]
        assert loads_in_other() == ["1", "2"]  # both cached over there

        result = run(app, "invalidate", "1")
        assert result.exit_code == 0, result.output
        assert "invalidated user 1 through <RedisVersionStore" in result.output
        assert wait_for(["1", "2", "1"]) == ["1", "2", "1"]  # user 1 reloaded, user 2 still cached

        result = run(app, "invalidate", "--all")
        assert result.exit_code == 0, result.output
        assert wait_for(["1", "2", "1", "1", "2"]) == ["1", "2", "1", "1", "2"]
    finally:
        store.close()
        other.stdin.close()
        other.wait(timeout=10)
    assert other.returncode == 0


# -- status tells the truth about the version store ----------------------------------


def test_status_connects_a_healthy_redis_store_before_calling_it_anything(sqlite_url, redis_url, redis_prefix, monkeypatch):
    """The listener starts on first use; status must not call an unused, healthy store degraded."""
    monkeypatch.setenv("IDENTITY_VERSION_STORE", redis_url)
    monkeypatch.setenv("IDENTITY_VERSION_PREFIX", redis_prefix)
    from examples.app import create_app

    app = create_app(sqlite_url)
    cli.register(app)
    store = app.extensions["identity_cache"].versions
    assert "not yet used" in repr(store)  # nothing connected yet: and the repr says so
    try:
        output = run(app, "status").output
    finally:
        store.close()
    assert "degraded" not in output
    assert "synced> (shared)" in output
    assert "link: connected from this process" in output


def test_status_says_why_an_unreachable_redis_store_is_not_connected(sqlite_url, redis_prefix, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("IDENTITY_VERSION_STORE", f"redis://:hunter2@127.0.0.1:{port}/0?password=hunter2")
    monkeypatch.setenv("IDENTITY_VERSION_PREFIX", redis_prefix)
    monkeypatch.setattr(cli, "STATUS_TIMEOUT", 0.3)
    from examples.app import create_app

    app = create_app(sqlite_url)
    cli.register(app)
    store = app.extensions["identity_cache"].versions
    try:
        output = run(app, "status").output
    finally:
        store.close()
    assert "link: not connected after 0.3 s (ConnectionError" in output
    assert "workers load every user from the database" in output
    assert f"redis://***@127.0.0.1:{port}/0?password=***" in output
    assert "hunter2" not in output


# -- the command exists for every app, through the flask.commands entry point ----------

CACHE_ONLY_APP = textwrap.dedent(
    """
    from flask import Flask
    from flask_login import LoginManager
    from identity_middleware import UserCache

    app = Flask("cache_only")
    LoginManager(app)
    user_cache = UserCache(app)
    """
)


def _flask_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "cache_only.py").write_text(CACHE_ONLY_APP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env.pop("FLASK_APP", None)
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "cache_only", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


def test_flask_identity_exists_for_an_app_with_only_a_user_cache(tmp_path):
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="flask.commands")}
    assert names.get("identity") == "identity_middleware.cli:identity", (
        "the flask.commands entry point is not installed: pip install -e '.[test]'"
    )
    result = _flask_cli(tmp_path, "identity", "status")
    assert result.returncode == 0, result.stderr
    assert "identity_middleware status for app 'cache_only'" in result.stdout
    assert "IdentityMiddleware: not installed" in result.stdout
    assert "IDENTITY_CACHE_TTL" in result.stdout and "<LocalVersionStore" in result.stdout
    assert "IdentityMiddleware does not wrap this app's wsgi_app" in result.stdout


def test_registering_the_group_twice_changes_nothing(app):
    cli.register(app)
    cli.register(app)
    assert list(app.cli.commands).count("identity") == 1


def test_middleware_does_not_import_the_cli_or_the_cli_the_middleware():
    """No import circle: the CLI and the logging read app.extensions, not the middleware module."""
    import ast

    def imported(module: str) -> set[str]:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.add(node.module or "")
                names.update(alias.name for alias in node.names if node.module is None)
        return names

    assert "cli" not in imported("middleware")
    assert "middleware" not in imported("cli")
    assert "middleware" not in imported("log")
    assert "cli" not in imported("log")
