"""See the difference in one command: ``python -m examples.demo``.

Builds the example app twice on a throwaway SQLite file -- as people run it today,
and with identity_middleware -- logs in as alice and loads the home page with its
assets a few times, counting SQL statements with SQLAlchemy's own events. Then it
revokes a role to show that the cache never serves the old one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import event

from examples.app import create_app

ASSETS = ("/static/app.css", "/static/app.js", "/widgets/static/widget.css", "/favicon.ico")


def page_load(client) -> None:
    """The home page plus every asset a browser would fetch for it."""
    for path in ("/", *ASSETS):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
        response.close()


def measure(label: str, app, loads: int) -> dict[str, object]:
    engine = app.extensions["example"].engine
    statements: list[str] = []

    def count(*_args) -> None:
        statements.append(_args[2])

    client = app.test_client()
    client.post("/login", data={"email": "alice@example.com"})
    event.listen(engine, "before_cursor_execute", count)
    try:
        per_load, times = [], []
        for _ in range(loads):
            before = len(statements)
            started = time.perf_counter()
            page_load(client)
            times.append(time.perf_counter() - started)
            per_load.append(len(statements) - before)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return {
        "label": label,
        "first": per_load[0],
        "later": statistics.mean(per_load[1:]) if loads > 1 else per_load[0],
        "ms": statistics.median(times) * 1000,
        "client": client,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=20, help="page loads per app (default 20)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        naive = create_app(f"sqlite:///{Path(tmp) / 'naive.db'}", middleware=False, cache=False)
        wrapped = create_app(f"sqlite:///{Path(tmp) / 'wrapped.db'}")
        rows = [measure("naive (Login + Principal)", naive, args.loads), measure("with identity_middleware", wrapped, args.loads)]

        print(f"One page load = GET / + {len(ASSETS)} assets, logged in as alice, {args.loads} loads each.\n")
        print("| app | SQL, first load | SQL per later load | ms per load (median) |")
        print("| --- | ---: | ---: | ---: |")
        for row in rows:
            print(f"| {row['label']} | {row['first']} | {row['later']:.1f} | {row['ms']:.2f} |")

        client = rows[1]["client"]
        before = client.get("/me").get_json()["roles"]
        client.post("/admin/users/1/roles", data={"role": "editor", "action": "revoke"})
        after = client.get("/me").get_json()["roles"]
        print(f"\nalice's roles {before} -> revoke 'editor' and commit -> next request sees {after}")


if __name__ == "__main__":
    main()
