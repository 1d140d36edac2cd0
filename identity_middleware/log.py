"""What the library tells operators: the startup line and configuration warnings.

A middleware that touches authentication has to be able to show what it runs
with. Everything goes through the standard :mod:`logging` module under the
``identity_middleware`` logger (its children, such as
``identity_middleware.redis_versions``, propagate to it):

* INFO, once per app at startup: every effective setting and where it came
  from (environment, argument, ``app.config`` or default) -- :func:`startup`;
* WARNING at startup for configurations that work but probably do not do what
  the owner wants (:func:`config_warnings`, also printed by
  ``flask identity status``);
* WARNING when a Redis version store loses its link (logged by
  :mod:`identity_middleware.redis_versions`).

Passwords in Redis URLs never reach the log.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .config import SETTINGS, Resolved, redacted_url, resolve_one
from .matching import path_adapter
from .versions import LocalVersionStore

if TYPE_CHECKING:
    from flask import Flask

    from .cache import UserCache
    from .middleware import IdentityMiddleware

__all__ = [
    "logger",
    "startup",
    "effective_settings",
    "display",
    "config_warnings",
    "multi_process_server",
]

logger = logging.getLogger("identity_middleware")

#: ``app.extensions`` key recording that the startup line was logged for this app.
_LOGGED = "identity_startup_logged"


def effective_settings(
    middleware: IdentityMiddleware | None = None, cache: UserCache | None = None
) -> dict[str, Resolved]:
    """Every setting the middleware and the cache run with, in ``SETTINGS`` order."""
    found: dict[str, Resolved] = {}
    for owner in (middleware, cache):
        found.update(getattr(owner, "settings", None) or {})
    return {name: found[name] for name in SETTINGS if name in found}


def display(resolved: Resolved) -> str:
    """A setting's value as an operator would write it; passwords masked."""
    value = resolved.value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "(none)"
    if isinstance(value, str):
        return redacted_url(value)
    return repr(value) if not isinstance(value, (int, float)) else f"{value:g}"


def multi_process_server(
    environ: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    modules: Mapping[str, Any] | None = None,
) -> str | None:
    """Why this process looks like (or is deployed for) a multi-worker server, or None.

    Heuristic on purpose -- there is no standard way to ask: running under
    gunicorn or uWSGI (program name, ``SERVER_SOFTWARE``, uWSGI's embedded
    ``uwsgi`` module), or the environment variables those servers read their
    worker count from (``WEB_CONCURRENCY``, ``GUNICORN_CMD_ARGS``,
    ``UWSGI_PROCESSES``/``UWSGI_WORKERS``). The CLI usually runs in the deployed
    environment, so the variables are what lets it warn too.
    """
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    modules = sys.modules if modules is None else modules
    program = os.path.basename(argv[0]).lower() if argv else ""
    if program == "__main__.py":  # python -m gunicorn: argv[0] is .../gunicorn/__main__.py
        program = os.path.basename(os.path.dirname(argv[0])).lower()
    software = environ.get("SERVER_SOFTWARE", "").lower()
    for server in ("gunicorn", "uwsgi"):
        if program.startswith(server):
            return f"running under {server}"
        if server in software:
            return f"SERVER_SOFTWARE={environ['SERVER_SOFTWARE']}"
    if "uwsgi" in modules:
        return "running under uWSGI"
    for name in ("WEB_CONCURRENCY", "UWSGI_PROCESSES", "UWSGI_WORKERS"):
        raw = environ.get(name, "").strip()
        if raw.isdigit() and int(raw) > 1:
            return f"{name}={raw}"
    gunicorn_args = environ.get("GUNICORN_CMD_ARGS", "")
    if "-w" in gunicorn_args.split() or "--workers" in gunicorn_args:
        return f"GUNICORN_CMD_ARGS={gunicorn_args}"
    return None


def config_warnings(app: Flask | None, middleware: Any = None, cache: Any = None) -> list[str]:
    """Configurations that run but probably do not do what the owner meant.

    The same list is logged at startup and printed by ``flask identity status``.
    """
    warnings: list[str] = []
    if app is not None:
        if middleware is None:
            warnings.append(
                "IdentityMiddleware does not wrap this app's wsgi_app: static requests load identity"
            )
        if getattr(app, "login_manager", None) is None:
            warnings.append(
                "no Flask-Login LoginManager on this app: there is no user loading to skip or cache"
            )
        from .flask_hooks import principals_of

        if not principals_of(app):
            warnings.append(
                "no Flask-Principal Principal on this app: only Flask-Login's loading is skipped"
            )
        if middleware is not None:
            from .matching import is_static_endpoint

            for path, endpoints in listed_coverage(app, middleware.listed).items():
                dynamic = [e for e in endpoints if not is_static_endpoint(e)]
                if dynamic:
                    warnings.append(
                        f"listed path {path} is served by the dynamic view "
                        f"{', '.join(map(repr, dynamic))}: it loads identity only when that view asks for it"
                    )
    versions = getattr(cache, "versions", None)
    if isinstance(versions, LocalVersionStore):
        server = multi_process_server()
        if server is not None:
            warnings.append(
                f"the version store is local to each process ({server}): invalidate() in one "
                "worker does not reach the others; set IDENTITY_VERSION_STORE to a Redis URL"
            )
    elif cache is None and app is not None and getattr(app, "login_manager", None) is not None:
        if resolve_one("IDENTITY_VERSION_STORE", None, app).source != "default":
            warnings.append("IDENTITY_VERSION_STORE is set but no UserCache is installed on this app")
    return warnings


def listed_coverage(app: Flask, listed: Sequence[str]) -> dict[str, list[str]]:
    """For each listed path, the endpoints of the app's rules it covers.

    An exact path covers the rule the URL map routes a GET of it to; a prefix
    covers every rule whose text starts with it (and the prefix itself).
    """
    adapter = path_adapter(app)  # None when the host decides: do not guess
    coverage: dict[str, list[str]] = {}
    for path in listed:
        endpoints: list[str] = []
        if path.endswith("/"):
            for rule in app.url_map.iter_rules():
                if rule.rule.startswith(path) and rule.endpoint not in endpoints:
                    endpoints.append(rule.endpoint)
        endpoint = _route(adapter, path)
        if endpoint is not None and endpoint not in endpoints:
            endpoints.append(endpoint)
        coverage[path] = endpoints
    return coverage


def _route(adapter: Any, path: str) -> str | None:
    if adapter is None:
        return None
    try:
        rule, _ = adapter.match(path, "GET", return_rule=True)
    except Exception:  # noqa: BLE001 -- 404, 405, redirects: no endpoint serves it
        return None
    return rule.endpoint  # type: ignore[no-any-return]


def startup(middleware: Any = None, cache: Any = None, *, app: Flask | None = None) -> str:
    """Log the effective settings at INFO, and any :func:`config_warnings` at WARNING.

    Call once the app is fully set up (the middleware does, on its first
    request). Logs once per app; returns the INFO message either way.
    ``cache`` defaults to the app's ``app.extensions["identity_cache"]``.
    """
    if app is None:
        app = getattr(middleware, "app", None)
    if cache is None and app is not None:
        cache = app.extensions.get("identity_cache")
    settings = effective_settings(middleware, cache)
    parts = [f"{name}={display(r)} ({r.source})" for name, r in settings.items()]
    versions = getattr(cache, "versions", None)
    if cache is None:
        parts.append("user cache: not installed")
    elif versions is not None:
        parts.append(f"version store: {type(versions).__name__}")
    message = "identity_middleware started: " + ", ".join(parts)
    if app is not None and app.extensions.get(_LOGGED):
        return message
    if app is not None:
        app.extensions[_LOGGED] = True
    logger.info("%s", message)
    for warning in config_warnings(app, middleware, cache):
        logger.warning("%s", warning)
    return message
