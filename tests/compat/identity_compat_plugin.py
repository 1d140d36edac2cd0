"""pytest plugin: run a third-party Flask test suite with identity_middleware installed.

Invariant 5 of the design says dynamic requests behave exactly as without the
middleware. The strongest evidence is somebody else's tests: this plugin is
loaded into a pytest run of Flask-Login's own suite (``-p identity_compat_plugin``)
and, without touching a line of that suite,

* wraps ``app.wsgi_app`` of every ``Flask`` the suite creates in
  ``IdentityMiddleware`` -- right after ``Flask.__init__``, so before any
  LoginManager is initialised, the order that is hardest for our hooks;
* with ``IDENTITY_COMPAT_MODE=cache``, also puts every loader registered through
  ``LoginManager.user_loader`` behind its own ``UserCache``.

Settings come from the environment as usual; the calling test lists ``/static/``
(``IDENTITY_STATIC_PATHS``), so the suite's own "static requests load no user"
tests run through the middleware's static branch -- the suite's apps have no
static folder, so nothing else changes.

At the end it writes what it did (apps wrapped, loaders cached, cache stats) as
JSON to ``IDENTITY_COMPAT_REPORT``, so the calling test can check the plugin was
really in the path and not silently inert.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flask
import flask_login
import pytest

from identity_middleware.middleware import IdentityMiddleware, is_static_request

MODE = os.environ.get("IDENTITY_COMPAT_MODE", "middleware")
if MODE not in ("middleware", "cache"):
    raise pytest.UsageError(f"IDENTITY_COMPAT_MODE={MODE!r}: expected 'middleware' or 'cache'")

# Tests that cannot run with a cache in front of the loader, and why. Flask-Login
# 0.6.3's suite never changes a user between requests (its USERS dict and the
# User objects in it are fixed), and every test that swaps the loader gets a new
# cache for the new loader, so nothing needs excluding today. A future suite that
# edits a user between requests without calling invalidate() would go here with
# its reason: such a test checks "no cache", not Flask-Login.
CACHE_EXCLUDED: dict[str, str] = {}

_report: dict[str, Any] = {"mode": MODE, "apps_wrapped": 0, "loaders_cached": 0, "static_requests": 0}
_caches: list[Any] = []


def _count_static_requests(sender: flask.Flask, **extra: Any) -> None:
    # A signal receiver, so the apps themselves carry nothing but the middleware.
    if is_static_request():
        _report["static_requests"] += 1


flask.request_started.connect(_count_static_requests)


def _wrap_every_app() -> None:
    original_init = flask.Flask.__init__

    @functools.wraps(original_init)
    def __init__(self: flask.Flask, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.wsgi_app = IdentityMiddleware(self.wsgi_app)  # type: ignore[method-assign]
        _report["apps_wrapped"] += 1

    flask.Flask.__init__ = __init__  # type: ignore[method-assign]


def _cache_every_loader() -> None:
    from identity_middleware.cache import UserCache

    original_user_loader = flask_login.LoginManager.user_loader

    @functools.wraps(original_user_loader)
    def user_loader(self: flask_login.LoginManager, callback: Any) -> Any:
        if getattr(callback, "_identity_user_cache", None) is not None:
            return original_user_loader(self, callback)  # UserCache.install() re-registering
        # One cache per registered loader: a test that replaces the loader has
        # replaced the source of truth, and must not be answered by the old one.
        cache = UserCache()
        _caches.append(cache)
        _report["loaders_cached"] += 1
        return original_user_loader(self, cache.cached(callback))

    flask_login.LoginManager.user_loader = user_loader  # type: ignore[method-assign]


_wrap_every_app()
if MODE == "cache":
    _cache_every_loader()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if MODE != "cache":
        return
    for item in items:
        reason = CACHE_EXCLUDED.get(item.name)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"excluded with the user cache: {reason}"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    totals: dict[str, int] = {}
    for cache in _caches:
        for field, value in cache.stats()._asdict().items():
            totals[field] = totals.get(field, 0) + value
    _report["cache_stats"] = totals
    _report["excluded"] = sorted(CACHE_EXCLUDED) if MODE == "cache" else []
    path = os.environ.get("IDENTITY_COMPAT_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(_report, fh)
