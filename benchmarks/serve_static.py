"""Serve mode against the other ways of answering a static file, in one run.

Time per request, in-process through each WSGI callable, body consumed and
closed, for a 2 KB CSS file and a 1 MB JS file:

* serve mode: ``IdentityMiddleware(app.wsgi_app, serve_static=True)`` on a
  Flask app (classification + :class:`StaticFiles`), on a Flask app with
  Flask-Login and Flask-Principal (whose hooks serve mode knows to be harmless,
  so it is still answered before Flask -- checked before timing), and
  ``StaticFiles`` alone behind a two-line dispatcher;
* WhiteNoise (the anchor: targets are <= 1.0x WhiteNoise on both sizes);
* werkzeug's ``SharedDataMiddleware``;
* Flask's own static view;
* a trivial WSGI app returning the same bytes with fixed headers (the floor:
  target <= 3x the floor on the 2 KB file).

No ``wsgi.file_wrapper`` is offered, so large files are read in Python by
every contestant -- the honest in-process cost. Variants are interleaved and
the best of several repeats is kept, which is what a shared, noisy machine
allows; ratios matter, absolute microseconds do not.

Run: ``python -m benchmarks.serve_static [--quick]``.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable

from werkzeug.test import create_environ

from ._common import markdown_table, standalone

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]

CASES = (("2 KB CSS", "app.css", 2 * 1024), ("1 MB JS", "app.js", 1024 * 1024))


def _write_files(folder: str) -> dict[str, bytes]:
    contents = {}
    line = b".rule-%06d { color: #123456; margin: 0 auto; }\n"
    for _, name, size in CASES:
        data = b"".join(line % i for i in range(size // len(line % 0) + 1))[:size]
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
        contents[name] = data
    return contents


def _not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


def _floor(contents: dict[str, bytes]) -> WSGIApp:
    """The least any WSGI app can do: fixed headers, bytes already in memory."""
    responses = {
        f"/static/{name}": (
            [("Content-Type", "text/css; charset=utf-8"), ("Content-Length", str(len(data)))],
            [data],
        )
        for name, data in contents.items()
    }

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        headers, body = responses[environ["PATH_INFO"]]
        start_response("200 OK", list(headers))
        return body

    return app


def _apps(folder: str, contents: dict[str, bytes]) -> dict[str, WSGIApp]:
    from flask import Flask
    from werkzeug.middleware.shared_data import SharedDataMiddleware
    from whitenoise import WhiteNoise

    from identity_middleware import IdentityMiddleware
    from identity_middleware.static import StaticFiles

    def dispatch(files: StaticFiles) -> WSGIApp:
        def static_files(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            response = files(environ, start_response)
            return _not_found(environ, start_response) if response is None else response

        return static_files

    served = Flask("serve_mode", static_folder=folder, static_url_path="/static")
    served.wsgi_app = IdentityMiddleware(served.wsgi_app, serve_static=True)  # type: ignore[method-assign]

    return {
        "serve mode (IdentityMiddleware)": served,
        "serve mode, Login + Principal app": _login_principal_app(folder),
        "StaticFiles alone": dispatch(StaticFiles({"/static/": folder})),
        # why small files are kept in memory: the same, reading the disk per request
        "StaticFiles alone, no in-memory copy": dispatch(StaticFiles({"/static/": folder}, in_memory_max=0)),
        "WhiteNoise": WhiteNoise(_not_found, root=folder, prefix="/static/"),
        "SharedDataMiddleware": SharedDataMiddleware(_not_found, {"/static": folder}),
        "Flask static view": Flask("plain", static_folder=folder, static_url_path="/static"),
        "trivial WSGI (floor)": _floor(contents),
    }


def _login_principal_app(folder: str) -> WSGIApp:
    """An ordinary Login + Principal app in serve mode; refuses to be timed if Flask would answer."""
    from flask import Flask
    from flask_login import LoginManager
    from flask_principal import Principal

    from identity_middleware import IdentityMiddleware

    app = Flask("serve_mode_login", static_folder=folder, static_url_path="/static")
    app.config["SECRET_KEY"] = "benchmark"
    LoginManager(app).user_loader(lambda user_id: None)
    Principal(app)
    app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True)  # type: ignore[method-assign]
    for verdict in app.wsgi_app.serve_verdicts():
        if not verdict.served:
            raise AssertionError(verdict.describe())
    return app


def _call(app: WSGIApp, environ: dict[str, Any]) -> tuple[str, int]:
    status: list[str] = []

    def start_response(s: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        status.append(s)

    body = app(dict(environ), start_response)
    size = 0
    try:
        for chunk in body:
            size += len(chunk)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return status[0], size


def _per_request_us(app: WSGIApp, environ: dict[str, Any], n: int) -> float:
    call = _call
    start = time.perf_counter_ns()
    for _ in range(n):
        call(app, environ)
    return (time.perf_counter_ns() - start) / n / 1000


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure every variant on both files; one row per (file, variant)."""
    repeats = 3 if quick else 7
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        contents = _write_files(folder)
        apps = _apps(folder, contents)
        for case, name, size in CASES:
            environ = create_environ(f"/static/{name}")
            for variant, app in apps.items():  # correctness first, and warm-up
                status, length = _call(app, environ)
                if not status.startswith("200") or length != size:
                    raise AssertionError(f"{variant} answered {status} with {length} bytes for {name}")
            n = (300 if quick else 3000) if size < 65536 else (10 if quick else 60)
            best = {variant: float("inf") for variant in apps}
            for _ in range(repeats):  # interleaved, so drift hits every variant alike
                for variant, app in apps.items():
                    best[variant] = min(best[variant], _per_request_us(app, environ, n))
            anchor, floor = best["WhiteNoise"], best["trivial WSGI (floor)"]
            for variant, us in best.items():
                rows.append(
                    {
                        "benchmark": "serve_static",
                        "case": case,
                        "variant": variant,
                        "us_per_request": round(us, 2),
                        "vs_whitenoise": round(us / anchor, 3),
                        "vs_floor": round(us / floor, 2),
                    }
                )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [
        (
            row["case"],
            row["variant"],
            f"{row['us_per_request']:.2f}",
            f"{row['vs_whitenoise']:.2f}",
            f"{row['vs_floor']:.1f}",
        )
        for row in rows
    ]
    return markdown_table(("file", "variant", "us/request", "x WhiteNoise", "x floor"), cells)


if __name__ == "__main__":
    standalone("Static file serving", run, _table)
