"""What the library tells operators, and when: settings, warnings, the Redis link.

A middleware that touches authentication has to be able to show what it runs
with. Everything goes through the standard :mod:`logging` module under the
``identity_middleware`` logger (its children, such as
``identity_middleware.redis_versions``, propagate to it). Each message is logged
when what it reports is known, and says so:

* **when a component is built** (:func:`configured`) -- ``IdentityMiddleware``
  or ``UserCache`` (each :meth:`~identity_middleware.UserCache.init_app`): one
  INFO line with every effective setting and where it came from. What can be
  checked then is checked then: a Redis version store is tried once, so "cannot
  reach Redis" is a WARNING at startup even if no user ever logs in, and a
  local store under a multi-worker server is a WARNING too;
* **at the first request** (:func:`first_request`) -- the middleware builds its
  classifier then, because routes, blueprints and extensions may be added after
  wrapping: one INFO line with the static mounts and listed paths, and WARNINGs
  that depend on routes (a listed prefix that covers dynamic views, no
  LoginManager or Principal on the app);
* **when the Redis link drops or comes back** -- logged by
  :mod:`identity_middleware.redis_versions`.

``flask identity status`` prints the same facts on demand. Every value goes
through :func:`identity_middleware.config.redacted`: no credential is printed.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .config import SETTINGS, Resolved, redacted, redacted_words, resolve_one
from .matching import is_flask_static_view, path_adapter
from .versions import LocalVersionStore

if TYPE_CHECKING:
    from flask import Flask
    from werkzeug.routing import Rule

__all__ = [
    "logger",
    "configured",
    "first_request",
    "effective_settings",
    "display",
    "config_warnings",
    "route_warnings",
    "listed_coverage",
    "multi_process_server",
    "probe_version_store",
]

logger = logging.getLogger("identity_middleware")

#: Seconds the startup check of a Redis version store waits for a connection.
PROBE_TIMEOUT = 1.0

_SAFE_METHODS = frozenset({"GET", "HEAD"})


# -- what a component runs with -------------------------------------------------------


def effective_settings(*components: Any) -> dict[str, Resolved]:
    """Every setting the given components (middleware, cache) run with, in ``SETTINGS`` order."""
    found: dict[str, Resolved] = {}
    for owner in components:
        found.update(getattr(owner, "settings", None) or {})
    return {name: found[name] for name in SETTINGS if name in found}


def display(resolved: Resolved) -> str:
    """A setting's value as an operator would write it; credentials masked."""
    value = resolved.value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "(none)"
    if isinstance(value, str):
        return str(redacted(value))
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return describe_store(value) if resolved.name == "IDENTITY_VERSION_STORE" else redacted_words(repr(value))


def describe_store(store: Any) -> str:
    """A version store in a few words: its kind and, for Redis, where (no password)."""
    if isinstance(store, LocalVersionStore):
        return "local"
    return redacted_words(repr(store)).strip("<>")


def _settings_text(settings: Mapping[str, Resolved]) -> str:
    return ", ".join(f"{name}={display(r)} ({r.source})" for name, r in settings.items())


def _app_name(app: Flask | None) -> str:
    return f"app {app.name!r}" if app is not None else "no Flask app"


def configured(component: Any, app: Flask | None = None) -> str:
    """Log what ``component`` (an ``IdentityMiddleware`` or ``UserCache``) was built with.

    Called by the component itself, at construction and at each ``init_app``.
    Returns the INFO message.
    """
    kind = type(component).__name__
    app = app if app is not None else getattr(component, "app", None)
    settings = effective_settings(component)
    message = f"{kind} for {_app_name(app)}: {_settings_text(settings)}"
    warnings: list[str] = []
    if kind == "IdentityMiddleware":
        if app is None:
            message += "; not a Flask app's wsgi_app: only listed paths are static, no Flask-side hooks"
        else:
            message += "; static mounts are read from the URL map at the first request"
    versions = getattr(component, "versions", None)
    if versions is not None:
        message += f"; version store: {describe_store(versions)}"
        warnings += store_warnings(versions, settings.get("IDENTITY_VERSION_STORE"))
    logger.info("%s", message)
    for warning in warnings:
        logger.warning("%s", warning)
    return message


def store_warnings(versions: Any, setting: Resolved | None = None) -> list[str]:
    """What is wrong with a version store that can be seen without a request."""
    warnings: list[str] = []
    if isinstance(versions, LocalVersionStore):
        server = multi_process_server()
        if server is not None:
            warnings.append(
                f"the version store is local to each process ({server}): invalidate() in one "
                "worker does not reach the others; set IDENTITY_VERSION_STORE to a Redis URL"
            )
    elif setting is not None and isinstance(setting.value, str) and setting.value != "local":
        problem = probe_version_store(setting.value)
        if problem is not None:
            warnings.append(
                f"cannot reach Redis at {redacted(setting.value)} ({problem}): until it is "
                "reachable, every request loads its user from the database"
            )
    return warnings


def probe_version_store(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Try a Redis URL once (a PING on a connection of its own); None if it answers.

    The store itself connects on first use (so a preloading server forks no
    thread); this one-off check only tells the operator at startup. It keeps no
    connection, so nothing crosses a fork. The reason never contains the URL.
    """
    try:
        import redis
    except ImportError:  # pragma: no cover - the store could not have been built
        return "redis-py is not installed"
    client = None
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        client.ping()
    except Exception as exc:  # noqa: BLE001 -- any failure is the answer
        return f"{type(exc).__name__}: {redacted_words(str(exc))}"
    finally:
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
    return None


# -- what the first request fixes ----------------------------------------------------


def first_request(middleware: Any, classifier: Any = None) -> str:
    """Log the static mounts and listed paths the classifier was just built with.

    Called by the middleware when it builds its classifier (the first request,
    or :meth:`~identity_middleware.IdentityMiddleware.rebuild`), with the
    WARNINGs that depend on routes. Returns the INFO message.
    """
    app = getattr(middleware, "app", None)
    classifier = classifier if classifier is not None else middleware.classifier
    mounts = ", ".join(f"{prefix} ({endpoint})" for prefix, endpoint in classifier.mounts.items())
    listed = ",".join(middleware.listed)
    message = (
        f"IdentityMiddleware for {_app_name(app)}, URL map read (first request or rebuild()): "
        f"static mounts {mounts or '(none)'}; listed paths {listed or '(none)'}"
    )
    cache = app.extensions.get("identity_cache") if app is not None else None
    if app is not None and cache is None:
        message += "; no UserCache on this app"
    serve_summary = getattr(middleware, "serve_summary", None)
    served = serve_summary() if callable(serve_summary) else None
    if served:  # per mount: answered before Flask, or which function keeps it from it
        message += f"; {served}"
    logger.info("%s", message)
    for warning in route_warnings(app, middleware.listed):
        logger.warning("%s", warning)
    return message


def route_warnings(app: Flask | None, listed: Sequence[str] = ()) -> list[str]:
    """Warnings that depend on the app's routes and extensions, known at the first request."""
    if app is None:
        return []
    warnings: list[str] = []
    if getattr(app, "login_manager", None) is None:
        warnings.append("no Flask-Login LoginManager on this app: there is no user loading to skip or cache")
    from .flask_hooks import principals_of

    if not principals_of(app):
        warnings.append("no Flask-Principal Principal on this app: only Flask-Login's loading is skipped")
    for path, rules in listed_coverage(app, listed).items():
        if not path.endswith("/"):
            continue  # an exact path names one URL: listing it is deliberate (status shows its view)
        views = [r for r in rules if not is_flask_static_view(app, r.endpoint)]
        if views:
            warnings.append(
                f"listed prefix {path} also covers {_views_phrase(views)}: GET and HEAD requests "
                "to it skip Flask-Principal's eager identity load and Flask-Login's remember-cookie "
                "refresh (the user and identity still load when the view asks); list exact paths "
                "instead if that is not meant"
            )
    return warnings


def config_warnings(app: Flask | None, middleware: Any = None, cache: Any = None) -> list[str]:
    """Every warning ``flask identity status`` prints: route, store and wiring warnings."""
    warnings: list[str] = []
    if app is not None and middleware is None:
        warnings.append("IdentityMiddleware does not wrap this app's wsgi_app: static requests load identity")
    warnings += route_warnings(app, getattr(middleware, "listed", ()))
    versions = getattr(cache, "versions", None)
    if isinstance(versions, LocalVersionStore):
        warnings += store_warnings(versions)
    elif cache is None and app is not None and getattr(app, "login_manager", None) is not None:
        if resolve_one("IDENTITY_VERSION_STORE", None, app).source != "default":
            warnings.append("IDENTITY_VERSION_STORE is set but no UserCache is installed on this app")
    return warnings


def _views_phrase(rules: Sequence[Rule]) -> str:
    names = [f"{r.endpoint!r} ({r.rule})" for r in rules]
    if len(names) == 1:
        return f"the dynamic view {names[0]}"
    return "the dynamic views " + ", ".join(names[:-1]) + " and " + names[-1]


def listed_coverage(app: Flask, listed: Sequence[str]) -> dict[str, list[Rule]]:
    """For each listed path, the rules that answer GET or HEAD requests it marks.

    An exact path covers the rule the URL map routes a GET of it to; a prefix
    covers every rule under it that accepts GET or HEAD (a POST-only view is
    never affected: only GET and HEAD are ever static), and the prefix itself.
    """
    adapter = path_adapter(app)  # None when the host decides: do not guess
    coverage: dict[str, list[Rule]] = {}
    for path in listed:
        rules: list[Rule] = []
        if path.endswith("/"):
            for rule in app.url_map.iter_rules():
                if rule.rule.startswith(path) and answers_get(rule) and rule not in rules:
                    rules.append(rule)
        routed = _route(adapter, path)
        if routed is not None and routed not in rules:
            rules.append(routed)
        coverage[path] = rules
    return coverage


def answers_get(rule: Rule) -> bool:
    """Whether ``rule`` accepts GET or HEAD, the only methods ever marked static."""
    return rule.methods is None or bool(rule.methods & _SAFE_METHODS)


def _route(adapter: Any, path: str) -> Rule | None:
    if adapter is None:
        return None
    try:
        rule, _ = adapter.match(path, "GET", return_rule=True)
    except Exception:  # noqa: BLE001 -- 404, 405, redirects: no rule serves it
        return None
    return rule  # type: ignore[no-any-return]


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
