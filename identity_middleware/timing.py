"""Server-Timing debug header: the identity decision of a request, in browser devtools.

Whether a request skipped identity, was answered from the user cache or ran the
loader is invisible from the outside -- the page looks the same either way. With
``IDENTITY_DEBUG_HEADERS=1`` every response carries::

    Server-Timing: identity;desc="hit";dur=0.004

where ``desc`` is one of

* ``static``   -- the middleware marked the request and nothing asked for the user
  (a marked request that does ask reports the cache's outcome below instead);
* ``hit``      -- the user came from the cache;
* ``negative`` -- the cache answered "no such user" from a negative entry;
* ``miss``     -- the cache ran the loader;
* ``bypass``   -- no cache lookup happened (an anonymous request, a view that never
  touched ``current_user``, or a loader without a cache),

and ``dur`` is the milliseconds the cache lookup took (``0`` for ``static`` and
``bypass``). Browsers show it in the network panel's timing tab.

Off by default: the header tells every visitor whether a user id is cached, and
how long loading a user takes, which is fine on a developer's machine and not
something to publish from production.

The cache records its outcome per request in ``flask.g._identity_cache_outcome``
and ``flask.g._identity_cache_seconds``; this module only reads them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flask import g, request

from .config import resolve_one
from .flask_hooks import SAFE_ATTRIBUTE, is_marked

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from flask import Flask, Response

__all__ = ["OUTCOMES", "install", "request_outcome", "header_value", "start_response_with_header"]

#: Every ``desc`` the header can carry.
OUTCOMES = ("static", "hit", "miss", "negative", "bypass")

#: ``app.extensions`` key recording that the after_request function is registered.
_EXTENSION_KEY = "identity_server_timing"


def header_value(outcome: str, seconds: float = 0.0) -> str:
    """The ``Server-Timing`` value for one decision, ``seconds`` shown as milliseconds.

    Also for code that answers before Flask (the middleware's serve mode), which
    has no ``after_request`` to rely on.
    """
    return f'identity;desc="{outcome}";dur={max(seconds, 0.0) * 1000.0:.3f}'


def request_outcome() -> tuple[str, float]:
    """The identity decision of the current Flask request and its cost in seconds."""
    outcome = g.get("_identity_cache_outcome")
    if outcome is None:
        return ("static" if is_marked(request.environ) else "bypass"), 0.0
    return str(outcome), float(g.get("_identity_cache_seconds") or 0.0)


def _add_header(response: Response) -> Response:
    # ``add``, not ``set``: Server-Timing may repeat, and other tools add their own metrics.
    response.headers.add("Server-Timing", header_value(*request_outcome()))
    return response


# Adds a debug header, reads no identity: serve mode may skip it for static files
# (it adds the same header itself).
setattr(_add_header, SAFE_ATTRIBUTE, True)


def install(app: Flask, *, enabled: bool | None = None) -> bool:
    """Add the header to every response of ``app`` when ``IDENTITY_DEBUG_HEADERS`` is on.

    ``enabled`` is the constructor-argument level of the setting (the environment
    still wins, ``app.config`` comes after). Returns whether the header is on.
    Calling it again does not register a second function.
    """
    if not resolve_one("IDENTITY_DEBUG_HEADERS", enabled, app).value:
        return False
    if not app.extensions.get(_EXTENSION_KEY):
        # The list, not ``app.after_request``: that one refuses once the app has
        # served a request, and the middleware may set up on its first request.
        app.after_request_funcs.setdefault(None, []).append(_add_header)
        app.extensions[_EXTENSION_KEY] = True
    return True


def start_response_with_header(
    start_response: StartResponse, outcome: str = "static", started: float | None = None
) -> StartResponse:
    """``start_response`` that adds the header, for responses made before Flask runs.

    Serve mode answers static files in the middleware, where no ``after_request``
    runs; it passes its ``start_response`` through this. ``started`` is a
    ``time.perf_counter()`` reading; the duration runs until the headers are sent.
    """

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seconds = 0.0 if started is None else time.perf_counter() - started
        headers.append(("Server-Timing", header_value(outcome, seconds)))
        return start_response(status, headers, exc_info)  # type: ignore[arg-type]

    return start  # type: ignore[return-value]
