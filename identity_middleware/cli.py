"""``flask identity``: ask a deployed app what it decides, and invalidate users everywhere.

Operators need three answers without reading code: what does this app run with
(and where did each value come from), is this path static and why, and how do I
make every worker forget a user now. The ``identity`` command group answers them::

    flask identity status
    flask identity check /static/app.css /favicon.ico --method HEAD
    flask identity invalidate 42 17        # or: --all

The group reaches the ``flask`` command through the ``flask.commands`` entry
point the package declares, so ``flask --app ... identity`` works for every app
-- one with the middleware, one with only a ``UserCache``, or one with neither
(``status`` then says so). :func:`register` adds it to ``app.cli`` as well, for
``app.test_cli_runner()`` or a copy of the package that is not installed.

This module reads the app's ``app.extensions`` and never imports the
middleware: the middleware does not depend on the CLI and the CLI does not
depend back on it.

``invalidate`` runs in the CLI's own process. It therefore only makes sense with a
version store shared between processes (Redis): with the default local store it
would bump a counter nobody else reads, so it refuses instead of pretending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from flask import current_app
from flask.cli import AppGroup

from . import log
from .config import redacted_words
from .matching import is_flask_static_view, static_folder
from .versions import InvalidationUnconfirmed, LocalVersionStore

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["identity", "register"]

#: Seconds ``invalidate`` waits for a Redis version store to confirm its link.
SYNC_TIMEOUT = 5.0

#: Seconds ``status`` waits for a Redis version store to connect before it reports.
STATUS_TIMEOUT = 2.0

identity = AppGroup("identity", help="Inspect identity_middleware's decisions and invalidate cached users.")


def register(app: Flask) -> None:
    """Add the ``identity`` group to ``app.cli`` (once; later calls change nothing)."""
    if "identity" not in app.cli.commands:
        app.cli.add_command(identity)


def _middleware(app: Flask) -> Any:
    return app.extensions.get("identity_middleware")


def _cache(app: Flask) -> Any:
    return app.extensions.get("identity_cache")


# -- status -------------------------------------------------------------------------


@identity.command("status")
def status() -> None:
    """Effective settings and their source, static mounts, listed paths, warnings."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    middleware, cache = _middleware(app), _cache(app)

    click.echo(f"identity_middleware status for app {app.name!r}")
    settings = log.effective_settings(middleware, cache)
    click.echo("\nSettings (value, source):")
    width = max((len(name) for name in settings), default=0)
    for name, resolved in settings.items():
        click.echo(f"  {name:<{width}}  {log.display(resolved):<24}  {resolved.source}")
    if not settings:
        click.echo("  (none: neither IdentityMiddleware nor UserCache is installed)")

    if middleware is not None:
        _echo_mounts(app, middleware)
        _echo_listed(app, middleware)
        _echo_serve_mode(middleware)
    else:
        click.echo("\nIdentityMiddleware: not installed (app.wsgi_app is not wrapped)")

    click.echo("\nUser cache:")
    if cache is None:
        click.echo("  not installed (app.extensions['identity_cache'] is empty)")
    else:
        _echo_store(cache)
        stats = cache.stats()
        click.echo("  stats in this process: " + " ".join(f"{k}={v}" for k, v in stats._asdict().items()))

    warnings = log.config_warnings(app, middleware, cache)
    click.echo("\nWarnings:" + ("" if warnings else " none"))
    for warning in warnings:
        click.echo(f"  ! {warning}")


def _echo_store(cache: Any) -> None:
    """The version store, connected first: "degraded" must mean Redis is really unreachable."""
    versions = cache.versions
    if isinstance(versions, LocalVersionStore):
        click.echo(f"  version store: {versions!r} (this process only)")
        return
    wait_synced = getattr(versions, "wait_synced", None)
    if not callable(wait_synced):  # a custom store: nothing to connect
        click.echo(f"  version store: {redacted_words(repr(versions))} (shared)")
        return
    connected = wait_synced(STATUS_TIMEOUT)
    click.echo(f"  version store: {redacted_words(repr(versions))} (shared)")
    if connected:
        click.echo("  link: connected from this process; invalidations reach every worker")
        return
    setting = cache.settings.get("IDENTITY_VERSION_STORE")
    url = setting.value if setting is not None and isinstance(setting.value, str) else None
    reason = log.probe_version_store(url) if url else None
    click.echo(
        f"  link: not connected after {STATUS_TIMEOUT:g} s"
        + (f" ({reason})" if reason else "")
        + "; while Redis is unreachable, workers load every user from the database"
    )


def _echo_mounts(app: Flask, middleware: Any) -> None:
    classifier = middleware.classifier
    click.echo("\nStatic mounts (static when the URL map routes a GET to Flask's own static view):")
    if not classifier.mounts:
        click.echo("  (none)")
    for prefix, endpoint in classifier.mounts.items():
        folder = static_folder(app, endpoint)
        click.echo(f"  {prefix:<24} -> {endpoint:<20} folder {folder or '(none)'}")
        for rule in app.url_map.iter_rules():
            if not rule.rule.startswith(prefix) or not log.answers_get(rule):
                continue
            if rule.endpoint == endpoint and is_flask_static_view(app, endpoint):
                continue
            if rule.endpoint == endpoint:
                why = f"endpoint {endpoint!r} is not Flask's own static view"
            else:
                why = f"dynamic view {rule.endpoint!r} shadows the mount"
            click.echo(f"      not static: {rule.rule} ({why})")
    for prefix, folder in (getattr(middleware, "static_dirs", None) or {}).items():
        click.echo(f"  {prefix:<24} -> {'(static_dirs)':<20} folder {folder}")


def _echo_listed(app: Flask, middleware: Any) -> None:
    click.echo("\nListed paths (static on the owner's word, for GET and HEAD):")
    coverage = log.listed_coverage(app, middleware.listed)
    if not coverage:
        click.echo("  (none)")
    for path, rules in coverage.items():
        kind = "prefix" if path.endswith("/") else "exact"
        if not rules:
            click.echo(f"  {path:<24} {kind:<6} no route (404 unless serve mode has the file)")
            continue
        views = [r for r in rules if not is_flask_static_view(app, r.endpoint)]
        covered = ", ".join(dict.fromkeys(r.endpoint for r in rules))
        note = " -- a view: identity loads only when it asks, on GET and HEAD" if views else ""
        click.echo(f"  {path:<24} {kind:<6} covers {covered}{note}")


def _echo_serve_mode(middleware: Any) -> None:
    if not middleware.settings["IDENTITY_SERVE_STATIC"].value:
        click.echo("\nServe mode (IDENTITY_SERVE_STATIC): off")
        return
    click.echo("\nServe mode (IDENTITY_SERVE_STATIC): per mount")
    verdicts = middleware.serve_verdicts()  # the rules live in serve_rules.py
    if not verdicts:
        click.echo("  (no static folder)")
    for verdict in verdicts:
        click.echo(f"  {verdict.describe()}")
        for skipped in verdict.skipped:
            click.echo(f"      skips {skipped}")


# -- check --------------------------------------------------------------------------


def _checked_path(path: str) -> str:
    """The path as a request's PATH_INFO would carry it, or a usage error saying why not."""
    if "://" in path or path.startswith("//"):
        raise click.BadParameter(
            f"{path!r} is a URL; give its path only, e.g. '/static/app.css' "
            "(use --host for apps whose URL map matches hosts)",
            param_hint="PATH",
        )
    if not path.startswith("/"):
        raise click.BadParameter(
            f"{path!r} does not start with '/'; paths are checked as requests carry them, "
            f"e.g. '/{path}'",
            param_hint="PATH",
        )
    if "?" in path or "#" in path:
        raise click.BadParameter(
            f"{path!r} has a query or fragment; give the path without '?...' or '#...'",
            param_hint="PATH",
        )
    return path


@identity.command("check")
@click.argument("paths", nargs=-1, required=True)
@click.option("--method", "-m", default="GET", show_default=True, help="HTTP method of the request.")
@click.option("--host", default=None, help="Host header, for apps whose URL map matches hosts.")
def check(paths: tuple[str, ...], method: str, host: str | None) -> None:
    """Say whether each PATH would be static (skip identity), and why.

    PATH is a request path as the server passes it to the app ('/static/app.css'),
    not a URL. Exits 0 when every PATH is static, 1 when any is not, 2 on a bad PATH.
    """
    for path in paths:
        _checked_path(path)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    middleware = _middleware(app)
    if middleware is None:
        raise click.ClickException(
            "IdentityMiddleware does not wrap this app's wsgi_app: no request is static"
        )
    all_static = True
    for path in paths:
        decision = middleware.explain(path, method, host=host)
        all_static = all_static and decision.marked
        verdict = "static" if decision.marked else "not static"
        details = []
        if decision.mount:
            details.append(f"mount {decision.mount}")
        if decision.listed:
            details.append(f"listed {decision.listed}")
        if decision.endpoint and decision.endpoint not in decision.reason:
            details.append(f"endpoint {decision.endpoint}")
        suffix = f" [{'; '.join(details)}]" if details else ""
        click.echo(f"{path!r} {decision.method}: {verdict} -- {decision.reason}{suffix}")
    if not all_static:
        click.get_current_context().exit(1)


# -- invalidate ---------------------------------------------------------------------


@identity.command("invalidate")
@click.argument("user_ids", nargs=-1)
@click.option("--all", "everyone", is_flag=True, help="Invalidate every cached user.")
def invalidate(user_ids: tuple[str, ...], everyone: bool) -> None:
    """Make every process stop serving the cached USER_IDS (or everyone with --all).

    Goes through the configured version store, so it needs one shared between
    processes (IDENTITY_VERSION_STORE=redis://...).
    """
    if everyone == bool(user_ids):
        raise click.UsageError("give USER_ID... or --all (not both)")
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    cache = _cache(app)
    if cache is None:
        raise click.ClickException("no UserCache on this app (app.extensions['identity_cache'])")
    versions = cache.versions
    if isinstance(versions, LocalVersionStore):
        raise click.ClickException(
            "refusing to invalidate: the version store is local (IDENTITY_VERSION_STORE=local), "
            "so an invalidation here would only affect this CLI's own process, not the workers "
            "serving requests. Set IDENTITY_VERSION_STORE to a Redis URL to invalidate from the "
            "command line, or call user_cache.invalidate() inside the app."
        )
    wait_synced = getattr(versions, "wait_synced", None)
    if callable(wait_synced) and not wait_synced(SYNC_TIMEOUT):
        raise click.ClickException(
            f"the version store {versions!r} is not connected after {SYNC_TIMEOUT:g} s; "
            "nothing was invalidated"
        )
    try:
        if everyone:
            cache.invalidate_all()
        else:
            for user_id in user_ids:
                cache.invalidate(user_id)
    except InvalidationUnconfirmed as exc:
        # Redis did not confirm: the store would replay the bump after reconnecting,
        # which this short-lived process will not live to do.
        raise click.ClickException(f"{exc}; run the command again") from None
    if getattr(versions, "synced", True) is False:
        raise click.ClickException(
            f"the link to the version store {versions!r} was lost while invalidating; "
            "run the command again"
        )
    what = "all users" if everyone else "user " + ", ".join(user_ids)
    click.echo(f"invalidated {what} through {versions!r}")
