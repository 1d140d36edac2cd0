"""What a static file costs a logged-in user: with the middleware and without.

Time per request for a ~2 KB CSS file (the example app's ``app.css``),
logged in as alice, driven in-process through each app's WSGI callable with
the body consumed and closed:

* ``wrapped``: the example app (Flask-Login + Flask-Principal + SQLAlchemy on
  SQLite) behind ``IdentityMiddleware`` -- nothing reads the user, so the
  request does no identity work (target: <= 1.0x bare);
* ``observed``: the same, with the example's ``UserCache`` (bound to
  SQLAlchemy) and a login gate in ``before_request`` that reads
  ``current_user`` -- the user is loaded on demand, a cache hit;
* ``observed_naive``: that gated, cached app without the middleware, for
  contrast (Principal's eager identity load and session save included);
* ``naive``: the same app unwrapped -- user query, roles query and
  ``identity_loaded`` for the stylesheet, plus Principal's session save;
* ``skip_static``: the same app unwrapped with ``Principal(skip_static=True)``;
* ``bare``: a Flask app with the same static folder and no auth extension at
  all -- the anchor (target: wrapped <= 1.0x bare; observed is reported).

Then the cost of classifying a *dynamic* path (the price every page pays for
the middleware) with 10 and with 1,000 routes, against a URL-map match of the
same path (target: <= 2 us, flat).

Variants are interleaved within each repeat and the median of the repeats is
reported, so a noisy neighbour on a shared machine hits every variant alike.
Ratios matter; absolute microseconds depend on the machine.

Run: ``python -m benchmarks.static_skip [--quick]``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable

from werkzeug.test import EnvironBuilder

from ._common import interleaved_us, markdown_table, standalone

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]

CSS = "/static/app.css"
DYNAMIC_PATH = "/users/42/profile"


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    return None


def _request(app: WSGIApp, base: dict[str, Any]) -> int:
    """One request through ``app`` with a fresh copy of ``base``; returns the body size."""
    app_iter = app(dict(base), _start_response)
    try:
        return sum(len(chunk) for chunk in app_iter)
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()


def _logged_in_environ(app: Any) -> dict[str, Any]:
    client = app.test_client()
    response = client.post("/login", data={"email": "alice@example.com"})
    if response.status_code != 302:
        raise RuntimeError(f"login failed: {response.status_code}")
    cookie = client.get_cookie("session")
    # The browser that logged in: same address and user agent, so Flask-Login's session
    # protection finds the session fresh and nothing rewrites the cookie on every request.
    return EnvironBuilder(
        path=CSS, headers={"Cookie": f"session={cookie.value}"}, environ_base=dict(client.environ_base)
    ).get_environ()


def _apps(database_folder: str) -> dict[str, WSGIApp]:
    from flask import Flask

    from examples.app import HERE, create_app

    def example(name: str, **options: Any) -> Any:
        return create_app(f"sqlite:///{os.path.join(database_folder, name + '.db')}", cache=False, **options)

    bare = Flask("bare", static_folder=os.path.join(HERE, "static"))
    bare.config["SECRET_KEY"] = "example-only-secret"
    return {
        "wrapped": example("wrapped"),
        "observed": _with_login_gate(create_app(f"sqlite:///{os.path.join(database_folder, 'observed.db')}")),
        "observed_naive": _with_login_gate(
            create_app(f"sqlite:///{os.path.join(database_folder, 'observed_naive.db')}", middleware=False)
        ),
        "naive": example("naive", middleware=False),
        "skip_static": example("skip_static", middleware=False, skip_static=True),
        "bare": bare,
    }


def _with_login_gate(app: Any) -> Any:
    """A site-wide login gate, the common way internal tools protect even their assets."""
    from flask import abort, request
    from flask_login import current_user

    @app.before_request
    def login_gate() -> None:
        if request.endpoint != "login" and not current_user.is_authenticated:
            abort(401)

    return app


def _time_static(quick: bool) -> list[dict[str, Any]]:
    iterations, repeats = (300, 5) if quick else (2000, 9)
    with tempfile.TemporaryDirectory() as folder:
        apps = _apps(folder)
        example = apps["wrapped"]
        environ = _logged_in_environ(example)  # the same signed cookie is valid in every app
        sizes = {name: _request(app, environ) for name, app in apps.items()}
        if len(set(sizes.values())) != 1:
            raise RuntimeError(f"variants answered different bodies: {sizes}")
        loader_calls = {name: getattr(app.extensions.get("example"), "loader_calls", None) for name, app in apps.items()}
        for app in apps.values():  # warm up: first-request setup, caches, imports
            for _ in range(50):
                _request(app, environ)
        samples = interleaved_us(_request, apps, environ, rounds=repeats, batch=iterations)
        calls_during = {
            name: (getattr(app.extensions.get("example"), "loader_calls", None), loader_calls[name])
            for name, app in apps.items()
        }
    medians = {name: statistics.median(values) for name, values in samples.items()}
    bare = medians["bare"]
    rows = []
    for name, us in medians.items():
        after, before = calls_during[name]
        rows.append(
            {
                "benchmark": "static_skip",
                "case": f"2 KB CSS, logged in ({sizes[name]} B)",
                "variant": name,
                "us_per_request": round(us, 1),
                "vs_bare": round(us / bare, 2),
                "loader_calls_per_request": None if after is None else round((after - before) / (50 + iterations * repeats), 2),
            }
        )
    return rows


def _routes_app(count: int) -> Any:
    from flask import Flask

    app = Flask(f"routes{count}", static_folder=tempfile.gettempdir())
    for i in range(count - 1):
        app.add_url_rule(f"/section{i}/<int:item>/edit", f"route{i}", lambda item: "")
    app.add_url_rule("/users/<int:user_id>/profile", "profile", lambda user_id: "")
    return app


def _time_classification(quick: bool) -> list[dict[str, Any]]:
    from identity_middleware.matching import Classifier

    calls, repeats = (20_000, 5) if quick else (200_000, 7)
    rows = []
    environ = EnvironBuilder(path=DYNAMIC_PATH).get_environ()
    for count in (10, 1000):
        app = _routes_app(count)
        classifier = Classifier(app, ["/favicon.ico", "/assets/"])
        adapter = app.url_map.bind("localhost")
        if classifier.classify(environ) or adapter.match(DYNAMIC_PATH)[0] != "profile":
            raise RuntimeError("the dynamic path must route to the profile view and not be static")
        classify_samples, match_samples = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                classifier.classify(environ)
            classify_samples.append((time.perf_counter() - started) / calls * 1e6)
            started = time.perf_counter()
            for _ in range(calls // 20):
                adapter.match(DYNAMIC_PATH)
            match_samples.append((time.perf_counter() - started) / (calls // 20) * 1e6)
        classify_us, match_us = statistics.median(classify_samples), statistics.median(match_samples)
        for variant, us in (("classify", classify_us), ("URL-map match", match_us)):
            rows.append(
                {
                    "benchmark": "static_skip",
                    "case": f"dynamic path, {count} routes",
                    "variant": variant,
                    "us_per_call": round(us, 3),
                    "vs_url_map": round(us / match_us, 3),
                }
            )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Static request time per variant, then classification cost; one row each."""
    return _time_static(quick) + _time_classification(quick)


def _table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        us = row.get("us_per_request", row.get("us_per_call"))
        ratio = f"{row['vs_bare']:.2f}x bare Flask" if "vs_bare" in row else f"{row['vs_url_map']:.3f}x URL-map match"
        cells.append((row["case"], row["variant"], us, ratio))
    return markdown_table(("case", "variant", "us", "ratio"), cells)


if __name__ == "__main__":
    standalone("Static requests skip identity", run, _table)
