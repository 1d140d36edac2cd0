"""The ``dynamic`` benchmark measures what it says: the same answer everywhere, parts that add up.

A benchmark whose variants answer differently, or whose instrumentation times
nothing, would print plausible numbers about the wrong thing; these checks run
its apps for a few requests (no timing is asserted).
"""

from __future__ import annotations

import pytest

from benchmarks import dynamic
from identity_middleware import sessions


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    apps = dynamic.build(str(tmp_path_factory.mktemp("dynamic")))
    return apps, dynamic.shared_login(*apps.values())


def test_every_variant_answers_the_same_bytes_and_only_the_naive_app_runs_sql(built):
    apps, environ = built
    notes = dynamic._check(apps, environ)
    assert {name: note["sql"] for name, note in notes.items()} == {
        dynamic.NO_AUTH: 0,
        dynamic.NO_AUTH_SESSION: 0,
        dynamic.NAIVE: 2,
        dynamic.OURS: 0,
        dynamic.OURS_SESSIONS: 0,
        dynamic.OURS_MEMO: 0,
    }
    answer, body = dynamic.call(apps[dynamic.OURS_SESSIONS], environ)
    assert body == b'{"name":"alice","roles":["admin","editor"]}\n'


def test_only_the_memoized_variant_replays_its_identity_handler(built):
    apps, environ = built
    for name in (dynamic.OURS_SESSIONS, dynamic.OURS_MEMO):
        dynamic.call(apps[name], environ)
    records = {
        name: apps[name].extensions["dynamic_user_cache"]._entries["1"][3]
        for name in (dynamic.OURS, dynamic.OURS_SESSIONS, dynamic.OURS_MEMO)
    }
    assert records[dynamic.OURS] == records[dynamic.OURS_SESSIONS] == {}
    assert len(records[dynamic.OURS_MEMO]) == 1


def test_only_the_sessions_variant_stops_re_signing_the_unchanged_cookie(built):
    apps, environ = built
    sent = {name: dynamic.call(app, environ)[0] for name, app in apps.items()}
    assert sent[dynamic.NAIVE].header("Set-Cookie") and sent[dynamic.OURS].header("Set-Cookie")
    assert sent[dynamic.OURS_SESSIONS].header("Set-Cookie") == []
    assert sent[dynamic.OURS_SESSIONS].header("Vary") == sent[dynamic.OURS].header("Vary") == ["Cookie"]
    assert sessions.find(apps[dynamic.OURS_SESSIONS]).stats().writes_skipped > 0


def test_the_instrumented_twin_times_every_part_inside_real_requests(tmp_path):
    apps = {name: app for name, app in dynamic.build(str(tmp_path)).items() if name in dynamic.TIMED}
    environ = dynamic.shared_login(*apps.values())
    dynamic._check(apps, environ)
    timed = {name: (app, dynamic.instrument(app)) for name, app in apps.items()}
    totals, parts = dynamic._measure({}, timed, environ, rounds=2, batch=3)
    assert totals == {}
    for name, by_part in parts.items():
        whole = by_part.pop("_instrumented request")
        assert set(by_part) == set(dynamic.PARTS), name
        assert all(us > 0 for us in by_part.values()), (name, by_part)
        assert sum(by_part.values()) < whole, name
    # The twin still answers like its original.
    answer, body = dynamic.call(apps[dynamic.OURS_SESSIONS], environ)
    assert answer.status.startswith("200") and b"admin" in body
