"""PROTOTYPE measurement: the ``dynamic`` endpoint with the cached-identity prototype, side by side.

Not part of ``python -m benchmarks`` (the prototype is not wired in). Same
apps, request and method as :mod:`benchmarks.dynamic`; the new variant is
``ours + sessions.install`` whose ``identity_loaded`` handler is registered
through :class:`identity_middleware.principal_cache.CachedIdentityHandler`
instead of ``identity_loaded.connect_via``. Instrumented twins time the parts.

Run: ``python -m benchmarks.dynamic_identity [--quick]``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from flask import Flask
from flask_principal import identity_loaded

from identity_middleware.principal_cache import CachedIdentityHandler

from . import dynamic
from ._common import standalone

CACHED_IDENTITY = "ours + sessions.install + cached identity (prototype)"


def _with_cached_identity(app: Flask) -> Flask:
    """Move the app's docs handler behind a CachedIdentityHandler."""
    handlers = [r for r in identity_loaded.receivers_for(app) if getattr(r, "__name__", "") == "on_identity_loaded"]
    if len(handlers) != 1:
        raise RuntimeError(f"expected the benchmark's one identity_loaded handler, found {handlers}")
    identity_loaded.disconnect(handlers[0], sender=app)
    cache = CachedIdentityHandler(app, app.extensions["dynamic_user_cache"])
    cache(handlers[0])
    app.extensions["dynamic_identity_cache"] = cache
    return app


def _apps(folder: str) -> dict[str, Flask]:
    os.makedirs(folder, exist_ok=True)
    built = dynamic.build(folder)
    cached = dynamic.auth_app(
        f"sqlite:///{os.path.join(folder, 'cached_identity.db')}", ours=True, with_sessions=True
    )
    return {
        dynamic.NO_AUTH: built[dynamic.NO_AUTH],
        dynamic.OURS_SESSIONS: built[dynamic.OURS_SESSIONS],
        CACHED_IDENTITY: _with_cached_identity(cached),
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    rounds, batch = (20, 10) if quick else (201, 10)
    with tempfile.TemporaryDirectory() as folder:
        apps = _apps(folder)
        environ = dynamic.logged_in_environ(apps[dynamic.OURS_SESSIONS])
        dynamic._check(apps, environ)
        twins = {name: app for name, app in _apps(os.path.join(folder, "timed")).items() if name != dynamic.NO_AUTH}
        dynamic._check(twins, environ)
        timed = {name: (app, dynamic.instrument(app)) for name, app in twins.items()}
        totals, parts = dynamic._measure(apps, timed, environ, rounds=rounds, batch=batch)
        stats = dict(apps[CACHED_IDENTITY].extensions["dynamic_identity_cache"].stats)
    anchor = totals[dynamic.NO_AUTH]
    rows: list[dict[str, Any]] = [
        {
            "benchmark": "dynamic_identity",
            "case": f"GET {dynamic.PATH} JSON, logged in admin",
            "variant": name,
            "us_per_request": round(us, 1),
            "vs_no_auth": round(us / anchor, 2),
        }
        for name, us in totals.items()
    ]
    for name, by_part in parts.items():
        whole = by_part.pop("_instrumented request")
        rows.extend(
            {
                "benchmark": "dynamic_identity",
                "case": f"part: {part}",
                "variant": name,
                "us": round(us, 1),
                "share_of_request": f"{us / whole:.0%}",
            }
            for part, us in by_part.items()
        )
    rows.append({"benchmark": "dynamic_identity", "case": "prototype counters", "variant": CACHED_IDENTITY, **stats})
    return rows


if __name__ == "__main__":
    standalone("PROTOTYPE: cached Principal identity", run, dynamic._table)
