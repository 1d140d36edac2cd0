"""Classification: which requests count as static, and why.

Built on small real Flask apps; environs are raw WSGI dicts (the test client
would normalise the paths we want to send).
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
from flask import Blueprint, Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from identity_middleware.matching import (
    MEMO_BYTES,
    MEMO_MAX_PATH,
    Classifier,
    PathMemo,
    canonical_problem,
    is_flask_static_view,
)


def environ(path: str, method: str = "GET", host: str = "localhost") -> dict:
    """A minimal WSGI environ; ``path`` is text, encoded the way servers put it in PATH_INFO."""
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": "",
        "SERVER_NAME": host.split(":")[0],
        "SERVER_PORT": "80",
        "HTTP_HOST": host,
        "wsgi.url_scheme": "http",
    }


def marked(classifier: Classifier, path: str, method: str = "GET", host: str = "localhost") -> bool:
    return classifier.classify(environ(path, method, host))


@pytest.fixture
def app(tmp_path) -> Flask:
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "app.css").write_text("body {}")
    (tmp_path / "widgets" / "static").mkdir(parents=True)
    (tmp_path / "widgets" / "static" / "widget.css").write_text("p {}")
    app = Flask("matching", root_path=str(tmp_path))
    app.register_blueprint(
        Blueprint("widgets", __name__, static_folder=str(tmp_path / "widgets" / "static"), url_prefix="/widgets")
    )

    @app.get("/static/config.js")
    def config_js():
        return "dynamic"

    @app.get("/files/<name>")
    def files(name):
        return name

    @app.get("/")
    def index():
        return "index"

    return app


# -- mounts ---------------------------------------------------------------------------


def test_mounts_come_from_app_and_blueprint_static_rules(app):
    classifier = Classifier(app)
    assert classifier.mounts == {"/static/": "static", "/widgets/static/": "widgets.static"}


def test_custom_static_url_path_is_the_mount(tmp_path):
    (tmp_path / "public").mkdir()
    app = Flask("custom", root_path=str(tmp_path), static_folder="public", static_url_path="/assets")
    classifier = Classifier(app)
    assert classifier.mounts == {"/assets/": "static"}
    assert marked(classifier, "/assets/app.css")
    assert not marked(classifier, "/static/app.css")


def test_app_without_static_folder_has_no_mounts_and_marks_nothing(tmp_path):
    app = Flask("nostatic", root_path=str(tmp_path), static_folder=None)
    app.add_url_rule("/static/app.css", "css", lambda: "dynamic")
    classifier = Classifier(app, ["/favicon.ico"])
    assert classifier.mounts == {}
    assert not marked(classifier, "/static/app.css")
    assert marked(classifier, "/favicon.ico")


def test_nested_blueprint_and_extension_statics_are_mounts(tmp_path):
    (tmp_path / "fs").mkdir()
    (tmp_path / "static").mkdir()
    app = Flask("ext", root_path=str(tmp_path))
    parent = Blueprint("parent", __name__, url_prefix="/parent")
    parent.register_blueprint(
        Blueprint("child", __name__, static_folder=str(tmp_path / "static"), url_prefix="/child")
    )
    app.register_blueprint(parent)
    app.register_blueprint(
        Blueprint("security", __name__, static_folder=str(tmp_path / "fs"), static_url_path="/fs-static")
    )
    classifier = Classifier(app)
    assert classifier.mounts["/parent/child/static/"] == "parent.child.static"
    assert classifier.mounts["/fs-static/"] == "security.static"
    assert marked(classifier, "/parent/child/static/x.js")
    assert marked(classifier, "/fs-static/js/webauthn.js")


def test_a_wrapped_static_view_is_not_flasks_static_view_and_marks_nothing(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("wrapped", root_path=str(tmp_path))
    original = app.view_functions["static"]
    app.view_functions["static"] = lambda filename: original(filename=filename)
    classifier = Classifier(app)
    assert not is_flask_static_view(app, "static")
    assert classifier.mounts == {}
    assert not marked(classifier, "/static/app.css")


def test_a_blueprint_view_named_static_is_dynamic_even_under_a_mount(app, tmp_path):
    reports = Blueprint("reports", __name__, url_prefix="/static/reports")
    reports.add_url_rule("/<name>", "static", lambda name: name)
    app.register_blueprint(reports)
    classifier = Classifier(app)
    assert "/static/reports/" not in classifier.mounts
    decision = classifier.explain("/static/reports/q3")
    assert not decision.marked and decision.endpoint == "reports.static"
    assert "does not run Flask's own static view" in decision.reason
    assert marked(classifier, "/static/app.css")  # the app's own static view still counts


def test_websocket_requests_are_never_marked_and_websocket_rules_are_no_mounts(app):
    app.add_url_rule("/static/live", "live", lambda: "socket", websocket=True)
    classifier = Classifier(app)
    handshake = environ("/static/live")
    handshake.update(HTTP_UPGRADE="websocket", HTTP_CONNECTION="Upgrade")
    assert not classifier.classify(handshake)
    assert "websocket" in classifier.explain("/static/live", environ=handshake).reason
    # A plain GET of the same path is routed to the static view by werkzeug.
    assert marked(classifier, "/static/live")
    assert set(classifier.mounts) == {"/static/", "/widgets/static/"}


# -- the decisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/static/app.css", "/static/missing.css", "/static/sub/dir/a.js", "/widgets/static/widget.css"],
)
def test_paths_the_url_map_routes_to_a_static_endpoint_are_marked(app, path):
    classifier = Classifier(app)
    assert marked(classifier, path)
    assert marked(classifier, path, "HEAD")
    decision = classifier.explain(path)
    assert decision.marked and decision.endpoint.endswith("static") and decision.mount


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/static-reports", "not under a static mount"),
        ("/staticx/a.css", "not under a static mount"),
        ("/STATIC/app.css", "not under a static mount"),
        ("/static", "not under a static mount"),
        ("/static//app.css", "'//'"),
        ("/static/../admin/", "'..' segment"),
        ("/static/./app.css", "'.' segment"),
        ("/static/app.css/.", "'.' segment"),
        ("/static/app.css/..", "'..' segment"),
        ("/static/a\\..\\b", "backslash"),
        ("/static/app.css\x00.js", "NUL"),
        ("/static/config.js", "shadowed by rule '/static/config.js'"),
        ("/files/evil.css", "not under a static mount"),
        ("/", "not under a static mount"),
    ],
)
def test_hostile_and_dynamic_paths_are_not_marked_and_say_why(app, path, reason):
    classifier = Classifier(app)
    assert not marked(classifier, path)
    decision = classifier.explain(path)
    assert not decision.marked
    assert reason in decision.reason


def test_shadowing_rule_is_named_in_the_decision(app):
    decision = Classifier(app).explain("/static/config.js")
    assert (decision.mount, decision.endpoint, decision.rule) == ("/static/", "config_js", "/static/config.js")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get"])
def test_only_get_and_head_are_marked(app, method):
    classifier = Classifier(app, ["/favicon.ico"])
    assert not marked(classifier, "/static/app.css", method)
    assert not marked(classifier, "/favicon.ico", method)


def test_dot_files_that_are_not_dot_segments_stay_static(app):
    classifier = Classifier(app)
    assert marked(classifier, "/static/.well-known/x.txt")
    assert marked(classifier, "/static/app..css")


def test_percent_sequences_are_literal_characters_as_werkzeug_sees_them(app):
    # PATH_INFO is already decoded; werkzeug does not decode a literal "%2e" again,
    # so Flask's static view looks up a file literally named "%2e%2e".
    classifier = Classifier(app)
    assert marked(classifier, "/static/%2e%2e/secret")
    adapter = app.url_map.bind("localhost")
    assert adapter.match("/static/%2e%2e/secret")[1] == {"filename": "%2e%2e/secret"}


def test_static_url_path_empty_marks_files_but_never_pages(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("root", root_path=str(tmp_path), static_url_path="")
    app.add_url_rule("/", "index", lambda: "index")
    app.add_url_rule("/about", "about", lambda: "about")
    app.add_url_rule("/users/<int:uid>", "user", lambda uid: "user")
    classifier = Classifier(app)
    assert classifier.mounts == {"/": "static"}
    assert marked(classifier, "/app.css")
    assert marked(classifier, "/js/app.js")
    for page in ("/", "/about", "/users/3"):
        assert not marked(classifier, page), page
    assert "shadowed" in classifier.explain("/about").reason


def test_strict_slash_redirects_are_not_marked(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("slash", root_path=str(tmp_path), static_url_path="")
    app.add_url_rule("/docs/", "docs", lambda: "docs")
    decision = Classifier(app).explain("/docs")
    assert not decision.marked and "redirects" in decision.reason


# -- listed paths ---------------------------------------------------------------------


def test_listed_exact_paths_and_prefixes_are_marked_on_the_owners_word(app):
    app.add_url_rule("/favicon.ico", "favicon", lambda: "icon")
    classifier = Classifier(app, ["/favicon.ico", "/assets/"])
    assert marked(classifier, "/favicon.ico")
    assert classifier.explain("/favicon.ico").listed == "/favicon.ico"
    assert marked(classifier, "/assets/build/app.js")
    assert classifier.explain("/assets/build/app.js").listed == "/assets/"


@pytest.mark.parametrize(
    "path",
    ["/favicon.ico.bak", "/favicon.icon", "/FAVICON.ICO", "/assets", "/assetsx/a.js", "/assets//a.js", "/assets/../x"],
)
def test_listed_paths_are_exact_segment_bounded_and_canonical(app, path):
    assert not marked(Classifier(app, ["/favicon.ico", "/assets/"]), path)


def test_listing_works_without_a_flask_app():
    classifier = Classifier(None, ["/favicon.ico", "/assets/"])
    assert marked(classifier, "/favicon.ico")
    assert marked(classifier, "/assets/a.css")
    assert not marked(classifier, "/static/app.css")
    decision = classifier.explain("/assets/a.css")
    assert decision.marked and decision.listed == "/assets/" and decision.endpoint is None  # listed, not routed


# -- non-ASCII ------------------------------------------------------------------------


def test_non_ascii_mount_matches_the_latin1_encoded_path_info(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("unicode", root_path=str(tmp_path), static_url_path="/stätic")
    classifier = Classifier(app, ["/ïcon.ico"])
    assert marked(classifier, "/stätic/é.css")
    assert marked(classifier, "/ïcon.ico")
    assert not marked(classifier, "/static/é.css")
    assert classifier.explain("/stätic/é.css").marked


def test_path_info_that_is_not_utf8_is_never_marked(app):
    classifier = Classifier(app)
    env = environ("/static/app.css")
    env["PATH_INFO"] = "/static/\xff\xfe.css"  # bytes ff fe: not UTF-8
    assert not classifier.classify(env)
    assert canonical_problem("/static/\xff.css") == "is not valid UTF-8"


# -- host and subdomain matching ------------------------------------------------------


def test_host_matching_confirms_with_the_request_host(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("hosts", root_path=str(tmp_path), host_matching=True, static_host="cdn.example.com")
    app.add_url_rule("/static/config.js", "config_js", lambda: "dynamic", host="www.example.com")
    classifier = Classifier(app)
    assert marked(classifier, "/static/app.css", host="cdn.example.com")
    assert not marked(classifier, "/static/app.css", host="www.example.com")
    assert not marked(classifier, "/static/config.js", host="www.example.com")
    assert marked(classifier, "/static/config.js", host="cdn.example.com")
    assert classifier.explain("/static/app.css", host="cdn.example.com").marked
    without_host = classifier.explain("/static/app.css")
    assert not without_host.marked and "host" in without_host.reason


def test_subdomain_matching_confirms_with_the_request_host(tmp_path):
    (tmp_path / "static").mkdir()
    (tmp_path / "shop" / "static").mkdir(parents=True)
    app = Flask("subdomains", root_path=str(tmp_path), subdomain_matching=True)
    app.config["SERVER_NAME"] = "example.com"
    app.register_blueprint(
        Blueprint("shop", __name__, static_folder=str(tmp_path / "shop" / "static"), subdomain="shop", url_prefix="/s")
    )
    classifier = Classifier(app)
    assert marked(classifier, "/s/static/a.css", host="shop.example.com")
    assert not marked(classifier, "/s/static/a.css", host="example.com")
    assert marked(classifier, "/static/a.css", host="example.com")
    assert not marked(classifier, "/static/a.css", host="shop.example.com")


@pytest.mark.skipif(
    tuple(int(p) for p in version("flask").split(".")[:2]) < (3, 1), reason="TRUSTED_HOSTS is new in Flask 3.1"
)
def test_untrusted_host_is_never_marked(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("trusted", root_path=str(tmp_path), host_matching=True, static_host="cdn.example.com")
    app.config["TRUSTED_HOSTS"] = ["www.example.com"]
    assert not marked(Classifier(app), "/static/app.css", host="cdn.example.com")


def test_server_name_without_subdomain_matching_ignores_the_host(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("servername", root_path=str(tmp_path))
    app.config["SERVER_NAME"] = "example.com"
    classifier = Classifier(app)
    assert marked(classifier, "/static/app.css", host="other.test")


# -- cost and bounds ------------------------------------------------------------------


def test_dynamic_paths_are_rejected_without_consulting_the_url_map(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("many", root_path=str(tmp_path))
    for i in range(1000):
        app.add_url_rule(f"/r{i}/<int:x>", f"r{i}", lambda x: "")
    classifier = Classifier(app)
    for i in range(1000):
        assert not marked(classifier, f"/r{i}/5")
    assert len(classifier._marked) == len(classifier._confirm) == 0
    assert classifier.memo_bytes() == 0


def test_memos_are_bounded_in_bytes_not_entries(app, monkeypatch):
    from identity_middleware import matching

    assert Classifier(app)._marked.maxsize == MEMO_BYTES
    monkeypatch.setattr(matching, "MEMO_BYTES", 64 * 1024)
    classifier = Classifier(app)
    for i in range(1000):
        assert marked(classifier, f"/static/{i:05d}/" + "x" * 200 + ".css")
    for memo in classifier._memos:
        assert memo.currsize <= memo.maxsize == 64 * 1024
    # 1,000 entries of ~220 characters do not fit in 64 KB: the oldest were evicted.
    assert 0 < len(classifier._marked) < 1000
    assert marked(classifier, "/static/app.css")


def test_paths_longer_than_the_memo_limit_are_decided_but_never_memoised(app):
    classifier = Classifier(app)
    long_path = "/static/" + "a" * MEMO_MAX_PATH + ".css"
    assert marked(classifier, long_path)
    assert not marked(classifier, "/static/config.js" + "x" * MEMO_MAX_PATH, "POST")
    assert len(classifier._marked) == len(classifier._confirm) == 0
    assert marked(classifier, "/static/app.css")
    assert len(classifier._marked) == 1


def test_memo_charges_key_and_value_strings_and_refuses_nothing_it_can_hold():
    calls = []

    def reason(path, method):
        calls.append(path)
        return (True, "because " + path)

    memo = PathMemo(reason, max_bytes=10_000, max_path=5_000)
    assert memo("/a", "GET") == (True, "because /a")
    assert memo("/a", "GET") == (True, "because /a")
    assert calls == ["/a"]
    small = memo.currsize
    memo("/" + "b" * 1000, "GET")
    assert memo.currsize >= small + 2000  # the path is in the key and in the reason
    memo("/" + "c" * 4999, "GET")  # larger than the budget alone: computed, not stored
    assert memo.currsize <= 10_000 and len(memo) >= 1


def _traced_growth(action) -> int:
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_long_paths_leave_no_memory_behind_measured_with_tracemalloc(app):
    """Issue 13: 4,096 distinct 64 KB paths under /static/ grew the process by ~254 MB."""
    classifier = Classifier(app, ["/assets/"])
    paths = [f"/static/{i}/" + "y" * (64 * 1024) for i in range(256)]  # 16 MB of distinct paths

    def classify_all():
        for path in paths:
            assert classifier.classify(environ(path))

    assert _traced_growth(classify_all) < 256 * 1024
    assert classifier.memo_bytes() == 0


def test_full_memos_hold_no_more_than_their_byte_budget_measured_with_tracemalloc(app, monkeypatch):
    from identity_middleware import matching

    budget = 128 * 1024
    monkeypatch.setattr(matching, "MEMO_BYTES", budget)
    classifier = Classifier(app)
    paths = [f"/static/{i}/" + "z" * 40 for i in range(1500)]

    def classify_all():
        for path in paths:
            classifier.classify(environ(path))
            classifier.classify(environ(path, "HEAD"))

    growth = _traced_growth(classify_all)
    assert len(classifier._marked) < 1500  # the budget evicted entries
    assert classifier.memo_bytes() <= 3 * budget
    # What an entry is charged must not undercount what it really costs.
    assert growth <= classifier.memo_bytes(), (growth, classifier.memo_bytes())


def test_explain_confirms_listed_and_routed_text_paths(app):
    classifier = Classifier(app, ["/assets/", "/favicon.ico"])

    def static(path):
        return classifier.explain(path).marked

    assert static("/static/app.css")
    assert static("/assets/bundle.js")
    assert static("/favicon.ico")
    assert not static("/static/config.js")
    assert not static("/assets/../app.py")
    assert not static("/files/a.css")


def test_explain_confirms_text_paths_routed_to_static_views(app):
    classifier = Classifier(app)  # nothing listed: marked only when routed

    def routed(path):
        decision = classifier.explain(path)
        return decision.marked and decision.endpoint is not None

    assert routed("/static/app.css")
    assert routed("/widgets/static/widget.css")
    assert not routed("/static/config.js")
    assert not routed("/static/../app.css")
    assert not routed("/files/a.css")


# -- the property ---------------------------------------------------------------------

SEGMENTS = [
    "static", "STATIC", "static-reports", "staticx", "widgets", "files", "assets", "app.css",
    "config.js", "favicon.ico", "widget.css", ".", "..", "", "...", "%2e%2e", "%2F", "a\\b", "\\",
    "\x00", "é", "\u2215", ";", "?x=.css", ".well-known", " ", "\t",
]


@st.composite
def hostile_paths(draw) -> str:
    segments = draw(st.lists(st.sampled_from(SEGMENTS) | st.text(max_size=4), min_size=0, max_size=5))
    lead = draw(
        st.sampled_from(
            ["/", "//", "", "/static/", "/widgets/static/", "/assets/", "/static/config.js", "/files/x.css"]
        )
    )
    return lead + "/".join(segments)


def _flask_routes_to_static(app: Flask, env: dict) -> bool:
    """What Flask itself does with this environ: the oracle for the property."""
    ctx = app.request_context(dict(env))
    try:
        rule, _ = ctx.url_adapter.match(return_rule=True)
    except (HTTPException, RequestRedirect):
        return False
    return is_flask_static_view(app, rule.endpoint)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=hostile_paths(), method=st.sampled_from(["GET", "HEAD", "POST"]))
def test_every_marked_path_is_routed_to_a_static_endpoint_or_listed(app, path, method):
    listed = ("/favicon.ico", "/assets/")
    classifier = Classifier(app, listed)
    env = environ(path, method)
    if not classifier.classify(env):
        return
    assert method in ("GET", "HEAD")
    assert canonical_problem(env["PATH_INFO"]) is None
    is_listed = path in listed or path.startswith("/assets/")
    assert is_listed or _flask_routes_to_static(app, env), path


def test_hostile_path_strategy_reaches_marked_and_shadowed_paths(app):
    # Guards the property above against passing vacuously.
    from hypothesis import find

    classifier = Classifier(app, ("/favicon.ico", "/assets/"))
    search = settings(max_examples=5000, database=None)
    assert find(
        hostile_paths(), lambda p: classifier.classify(environ(p)) and p.startswith("/widgets/"), settings=search
    )
    assert find(hostile_paths(), lambda p: "shadowed" in classifier.explain(p).reason, settings=search)
