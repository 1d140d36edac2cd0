"""A revoked admin loses admin rights in every gunicorn worker, and Redis faults never serve a stale user.

Real gunicorn (3 sync workers, ``--preload`` so the workers fork from a master that
built the app) serving ``examples.app`` on a fresh PostgreSQL database, with
``IDENTITY_VERSION_STORE`` pointing at the test's own ``redis-server`` (its own so
that nothing else on the shared Redis can bump our users, and so it can be killed).

The gunicorn configuration written below adds two things to each worker without
touching the example app: an ``X-Worker-Pid`` response header (which worker served
a response) and a ``before_cursor_execute`` listener that appends every SQL
statement, with the request it ran in and a ``time.monotonic()`` stamp, to a file
per worker. CLOCK_MONOTONIC is system-wide on Linux, so those stamps compare with
the test's own.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("psycopg")
pytest.importorskip("redis")

from conftest import wait_for  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 3
FETCHES = 60
CLIENTS = 6  # concurrent connections: a sync worker serves one at a time, so all get work

#: After Redis comes back, hits resume within this many seconds (reconnect backoff <= 1 s).
RESUME_BOUND = 2.0

GUNICORN_CONF = textwrap.dedent(
    """
    import json, os, time

    bind = "127.0.0.1:{port}"
    workers = {workers}
    worker_class = "sync"
    preload_app = True
    timeout = 60
    graceful_timeout = 5
    loglevel = "warning"
    SQL_LOG_DIR = {log_dir!r}

    def post_worker_init(worker):
        from flask import has_request_context, request
        from sqlalchemy import event

        app = worker.wsgi
        engine = app.extensions["example"].engine
        # --preload: connections the master opened while seeding must not be shared.
        engine.dispose(close=False)
        path = os.path.join(SQL_LOG_DIR, "%d.jsonl" % os.getpid())

        def log_sql(conn, cursor, statement, parameters, context, executemany):
            method, where = (request.method, request.path) if has_request_context() else (None, None)
            with open(path, "a") as fh:
                fh.write(json.dumps({{"t": time.monotonic(), "method": method, "path": where,
                                     "sql": statement}}) + "\\n")

        event.listen(engine, "before_cursor_execute", log_sql)

        def with_pid(environ, start_response):
            def start(status, headers, exc_info=None):
                return start_response(status, headers + [("X-Worker-Pid", str(os.getpid()))], exc_info)
            return app(environ, start)

        worker.wsgi = with_pid
    """
)


@dataclass
class Response:
    started: float
    finished: float
    status: int
    pid: int
    body: bytes


class Site:
    """HTTP to the gunicorn under test, with alice's session cookie once logged in."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie = ""

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Cookie": self.cookie} if self.cookie else {}
        body = None
        if form is not None:
            from urllib.parse import urlencode

            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        started = time.monotonic()
        try:
            connection.request(method, path, body=body, headers=headers)
            reply = connection.getresponse()
            data = reply.read()
        finally:
            connection.close()
        finished = time.monotonic()
        if method == "POST" and path == "/login":
            cookie = reply.getheader("Set-Cookie") or ""
            self.cookie = cookie.split(";", 1)[0]
        return Response(started, finished, reply.status, int(reply.getheader("X-Worker-Pid") or 0), data)

    def fetch_many(self, path: str, count: int) -> list[Response]:
        with ThreadPoolExecutor(CLIENTS) as pool:
            return list(pool.map(lambda _: self.request("GET", path), range(count)))

    def fetch_from_every_worker(self, path: str, count: int, rounds: int = 10) -> list[Response]:
        """``count`` fetches, repeated (up to ``rounds`` times) until every worker served one.

        Which worker accepts a connection is the kernel's choice; on a loaded machine
        one worker can miss a whole round. Repeating keeps "every worker served it" a
        property of the test rather than of the scheduler.
        """
        responses: list[Response] = []
        for _ in range(rounds):
            responses += self.fetch_many(path, count)
            if len({r.pid for r in responses}) >= WORKERS:
                break
        return responses


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def site(postgres_url, redis_server, tmp_path):
    port = free_port()
    log_dir = tmp_path / "sql"
    log_dir.mkdir()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF.format(port=port, workers=WORKERS, log_dir=str(log_dir)))
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        DATABASE_URL=postgres_url,
        IDENTITY_VERSION_STORE=redis_server.url,
        IDENTITY_CACHE_TTL="600",  # nothing may expire during the test: only invalidation counts
    )
    site = Site(port)
    site.log_dir = log_dir
    site.stderr = tmp_path / "gunicorn.err"  # a file: a pipe nobody drains could block gunicorn
    with open(site.stderr, "w") as stderr:
        master = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), "examples.app:create_app()"],
            cwd=ROOT,
            env=env,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if master.poll() is not None:
                pytest.fail(f"gunicorn exited with {master.returncode}: {site.stderr.read_text()[-2000:]}")
            try:
                if site.request("GET", "/me").status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gunicorn did not answer within 60 s")
            time.sleep(0.1)
        yield site
    finally:
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=15)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()


def user_loads(site: Site, start: float, end: float) -> dict[int, Counter]:
    """Per worker: the statements its user loader ran for GET requests in [start, end).

    The loader's queries are the user row by primary key and that user's roles; the
    admin page's own listing (``FROM users ORDER BY``) is not user loading.
    """
    loads: dict[int, Counter] = defaultdict(Counter)
    for name in os.listdir(site.log_dir):
        pid = int(name.split(".")[0])
        with open(site.log_dir / name) as fh:
            for line in fh:
                entry = json.loads(line)
                if entry["method"] != "GET" or not start <= entry["t"] < end:
                    continue
                sql = " ".join(entry["sql"].split())
                if "FROM users" in sql and "WHERE users.id =" in sql:
                    loads[pid]["user"] += 1
                elif "user_roles" in sql and "roles" in sql:
                    loads[pid]["roles"] += 1
    return loads


def worker_pids(site: Site) -> list[int]:
    return sorted(int(name.split(".")[0]) for name in os.listdir(site.log_dir))


def warnings_logged(site: Site, text: str) -> int:
    """How many lines of the workers' stderr (Python's last-resort WARNING output) contain ``text``."""
    return sum(text in line for line in site.stderr.read_text().splitlines())


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_revoking_admin_reaches_every_worker_with_at_most_one_user_load_each(site):
    login = site.request("POST", "/login", {"email": "alice@example.com"})
    assert login.status == 302 and site.cookie.startswith("session=")

    phase1_start = time.monotonic()
    before = site.fetch_from_every_worker("/admin", FETCHES)
    assert {r.status for r in before} == {200}
    served_before = Counter(r.pid for r in before)
    assert len(served_before) == WORKERS, served_before  # every worker served the page

    revoke = site.request("POST", "/admin/users/1/roles", {"role": "admin", "action": "revoke"})
    assert revoke.status == 200 and json.loads(revoke.body)["roles"] == ["editor"]
    revoked_at = revoke.finished

    after = site.fetch_from_every_worker("/admin", FETCHES)
    served_after = Counter(r.pid for r in after)
    assert len(served_after) == WORKERS, served_after
    assert {r.status for r in after} <= {200, 403}
    # invalidate() (run by bind_sqlalchemy after the commit, inside the revoking request)
    # returns only once every worker acknowledged the bump: no request sent after the
    # revoke's response may show the old role, in any worker.
    stale = [r for r in after if r.status == 200]
    print(f"\n{len(stale)} of {len(after)} responses after the revoke showed the old role")
    assert stale == []
    me = site.request("GET", "/me")
    assert json.loads(me.body)["roles"] == ["editor"]

    # SQL, counted per worker from its before_cursor_execute log: the user was
    # loaded at most once per worker before the change, and at most once after it.
    loads_before = user_loads(site, phase1_start, revoke.started)
    loads_after = user_loads(site, revoked_at, after[-1].finished + 1)
    print(f"\nworkers served before {dict(served_before)}, after {dict(served_after)}")
    print(f"user-loading SQL per worker before {dict(loads_before)}, after {dict(loads_after)}")
    for pid in served_before:
        assert loads_before[pid]["user"] <= 1 and loads_before[pid]["roles"] <= 1, loads_before
    for pid in served_after:
        assert loads_after[pid]["user"] <= 1 and loads_after[pid]["roles"] <= 1, loads_after
    assert sum(c["user"] for c in loads_after.values()) >= 1  # the change was seen by loading


def test_killing_redis_serves_every_request_fresh_then_hits_resume(site, redis_server):
    assert site.request("POST", "/login", {"email": "alice@example.com"}).status == 302
    # Every worker must have served (and so started its Redis listener) before the kill.
    warm = site.fetch_from_every_worker("/me", 30)
    assert all(r.status == 200 for r in warm)
    assert len({r.pid for r in warm}) == WORKERS
    pids = worker_pids(site)
    threads = {pid: thread_count(pid) for pid in pids}

    for outage in (1, 2):  # several outages: nothing accumulates
        redis_server.kill()
        # Each worker's listener notices and says so (WARNING under identity_middleware).
        assert wait_for(
            lambda outage=outage: warnings_logged(site, "lost the link to Redis") >= WORKERS * outage, 10, interval=0.02
        )
        down_start = time.monotonic()
        down = site.fetch_many("/me", 30)
        down_end = time.monotonic()
        assert all(r.status == 200 for r in down)
        assert all(json.loads(r.body)["roles"] == ["admin", "editor"] for r in down)
        loads = user_loads(site, down_start, down_end)
        # Hit rate 0: every request loaded the user.
        assert sum(c["user"] for c in loads.values()) == len(down), loads

        redis_server.start()
        deadline = time.monotonic() + RESUME_BOUND
        while True:  # rounds of requests until one runs no user SQL: hits are back
            start = time.monotonic()
            assert start < deadline, f"hits did not resume within {RESUME_BOUND} s of the restart"
            round_ = site.fetch_many("/me", 12)
            assert all(r.status == 200 for r in round_)
            if sum(c["user"] for c in user_loads(site, start, time.monotonic()).values()) == 0:
                break

    assert {pid: thread_count(pid) for pid in pids} == threads
