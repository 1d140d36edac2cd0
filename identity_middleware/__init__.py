"""identity_middleware: static requests skip identity loading; users come from a safe cache.

Public API::

    from identity_middleware import IdentityMiddleware, UserCache

    app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=["/favicon.ico"])
    user_cache = UserCache(app)

``RedisVersionStore`` needs the ``redis`` extra and is imported on first use, so
apps without Redis never import redis-py.
"""

from __future__ import annotations

from typing import Any

from .cache import CacheStats, UserCache
from .config import ConfigError
from .identity_memo import memoize_identity
from .middleware import IdentityMiddleware, is_static_request
from .serve_rules import static_safe
from .static import StaticFiles
from .versions import InvalidationUnconfirmed, LocalVersionStore, VersionStore

__all__ = [
    "UserCache",
    "CacheStats",
    "memoize_identity",
    "IdentityMiddleware",
    "is_static_request",
    "static_safe",
    "StaticFiles",
    "ConfigError",
    "LocalVersionStore",
    "VersionStore",
    "InvalidationUnconfirmed",
    "RedisVersionStore",
]


def __getattr__(name: str) -> Any:
    if name == "RedisVersionStore":
        from .redis_versions import RedisVersionStore

        return RedisVersionStore
    raise AttributeError(f"module 'identity_middleware' has no attribute {name!r}")
