"""Every answer serve mode gives reflects the file as it is now; ``immutable`` only where certain.

A Flask app wrapped with ``IdentityMiddleware(serve_static=True)`` runs behind
a real HTTP server; files are changed, shrunk, deleted and restored while it
runs. Large files (streamed) are checked on every request; small files (kept in
memory) on the first request after ``recheck_interval`` -- 0 here, so the test
sees the check at once; the snapshot between checks is covered in
``test_static_serving.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from identity_middleware import ConfigError, IdentityMiddleware
from identity_middleware.static import StaticFiles
from servers import fetch, in_front, serving

BIG = bytes(range(256)) * 1024  # 256 KiB: streamed, not kept in memory
SMALL = b"body { color: red }\n"
IMMUTABLE = "public, max-age=31536000, immutable"


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def served(tmp_path: Any, files: dict[str, bytes], **options: Any) -> Iterator[tuple[int, str]]:
    static = str(tmp_path / "static")
    for name, data in files.items():
        _write(os.path.join(static, name), data)
    app = Flask("fresh", static_folder=static, static_url_path="/static")
    app.wsgi_app = IdentityMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, serve_static=True, static_options={"recheck_interval": 0, **options}
    )
    with serving(app) as port:
        assert fetch(port, "/static/" + next(iter(files))).status == 200  # index built
        yield port, static


# -- large files: HEAD, 304, 412, 416 after a change ----------------------------------------


def test_a_changed_large_file_is_not_confirmed_by_its_old_etag(tmp_path: Any) -> None:
    with served(tmp_path, {"big.bin": BIG}) as (port, static):
        old = fetch(port, "/static/big.bin")["ETag"]
        _write(os.path.join(static, "big.bin"), BIG[::-1])
        reply = fetch(port, "/static/big.bin", {"If-None-Match": old or ""})
        assert reply.status == 200 and reply.body == BIG[::-1] and reply["ETag"] != old
        assert fetch(port, "/static/big.bin", {"If-Match": old or ""}).status == 412


def test_head_of_a_changed_large_file_reports_its_new_size(tmp_path: Any) -> None:
    with served(tmp_path, {"big.bin": BIG}) as (port, static):
        _write(os.path.join(static, "big.bin"), BIG + BIG)
        reply = fetch(port, "/static/big.bin", method="HEAD")
        assert reply.status == 200 and reply["Content-Length"] == str(2 * len(BIG))


def test_a_range_past_the_end_of_a_shrunk_large_file_gives_416_with_its_new_size(tmp_path: Any) -> None:
    with served(tmp_path, {"big.bin": BIG}) as (port, static):
        _write(os.path.join(static, "big.bin"), BIG[: 100_000])
        reply = fetch(port, "/static/big.bin", {"Range": "bytes=150000-"})
        assert reply.status == 416 and reply["Content-Range"] == "bytes */100000"


def test_a_deleted_large_file_is_404_for_get_and_head(tmp_path: Any) -> None:
    with served(tmp_path, {"big.bin": BIG}) as (port, static):
        os.remove(os.path.join(static, "big.bin"))
        assert fetch(port, "/static/big.bin").status == 404
        assert fetch(port, "/static/big.bin", method="HEAD").status == 404
        assert fetch(port, "/static/big.bin", {"If-None-Match": "*"}).status == 404


def test_a_deleted_file_that_comes_back_is_served_again(tmp_path: Any) -> None:
    with served(tmp_path, {"big.bin": BIG, "app.css": SMALL}) as (port, static):
        for name, data in (("big.bin", BIG), ("app.css", SMALL)):
            os.remove(os.path.join(static, name))
            assert fetch(port, f"/static/{name}", method="HEAD").status == 404
            _write(os.path.join(static, name), data + b"!")
            assert fetch(port, f"/static/{name}").body == data + b"!"


# -- small files, kept in memory ----------------------------------------------------------


def test_a_changed_small_file_is_re_read_with_a_new_etag(tmp_path: Any) -> None:
    with served(tmp_path, {"app.css": SMALL}) as (port, static):
        old = fetch(port, "/static/app.css")["ETag"]
        _write(os.path.join(static, "app.css"), b"body { color: blue }\n")
        assert fetch(port, "/static/app.css", {"If-None-Match": old or ""}).body == b"body { color: blue }\n"
        head = fetch(port, "/static/app.css", method="HEAD")
        assert head["Content-Length"] == str(len(b"body { color: blue }\n")) and head["ETag"] != old


def test_a_deleted_small_file_is_404_for_get_and_head(tmp_path: Any) -> None:
    with served(tmp_path, {"app.css": SMALL}) as (port, static):
        os.remove(os.path.join(static, "app.css"))
        assert fetch(port, "/static/app.css").status == 404
        assert fetch(port, "/static/app.css", method="HEAD").status == 404


def test_a_change_that_keeps_size_and_mtime_is_still_seen(tmp_path: Any) -> None:
    """``rsync -t`` and ``cp -p`` restore mtime; ctime cannot be restored."""
    with served(tmp_path, {"app.css": SMALL}) as (port, static):
        path = os.path.join(static, "app.css")
        before = os.stat(path)
        with open(path, "r+b") as handle:  # same inode, same size
            handle.write(b"BODY")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert fetch(port, "/static/app.css").body == b"BODY" + SMALL[4:]


def test_a_changed_precompressed_sibling_is_sent_as_it_is_now(tmp_path: Any) -> None:
    js = b"function a() { return 1 }\n" * 20
    files = {"app.js": js, "app.js.gz": gzip.compress(js, mtime=0)}
    with served(tmp_path, files) as (port, static):
        _write(os.path.join(static, "app.js.gz"), gzip.compress(js + b"//", mtime=0))
        reply = fetch(port, "/static/app.js", {"Accept-Encoding": "gzip"})
        assert gzip.decompress(reply.body) == js + b"//"


def test_between_checks_a_small_file_is_answered_from_memory_without_a_stat(tmp_path: Any) -> None:
    static = str(tmp_path / "static")
    _write(os.path.join(static, "app.css"), SMALL)
    files = StaticFiles({"/static/": static}, recheck_interval=3600)
    os.remove(os.path.join(static, "app.css"))
    with serving(in_front(files)) as port:
        assert fetch(port, "/static/app.css").body == SMALL  # the snapshot, consistent with its ETag


def test_recheck_interval_must_be_a_number_of_seconds(tmp_path: Any) -> None:
    for bad in (-1, "1", float("nan"), True):
        with pytest.raises(ConfigError, match="recheck_interval"):
            StaticFiles({"/static/": str(tmp_path)}, recheck_interval=bad)


# -- immutable only where certain ----------------------------------------------------------


def _named(data: bytes, algorithm: str, length: int, template: str) -> str:
    return template.format(hashlib.new(algorithm, data).hexdigest()[:length])


@pytest.mark.parametrize(
    ("algorithm", "length", "template"),
    [
        ("md5", 12, "app.{}.css"),  # Django ManifestStaticFilesStorage
        ("sha256", 64, "app-{}.css"),  # Sprockets
        ("sha1", 8, "app_{}.css"),
        ("md5", 8, "{}.css"),
    ],
)
def test_a_name_carrying_a_hash_of_its_content_is_immutable(
    tmp_path: Any, algorithm: str, length: int, template: str
) -> None:
    name = _named(SMALL, algorithm, length, template)
    with served(tmp_path, {name: SMALL}) as (port, _):
        assert fetch(port, f"/static/{name}")["Cache-Control"] == IMMUTABLE


def test_hex_looking_names_without_a_matching_hash_are_not_immutable(tmp_path: Any) -> None:
    files = {"logo-deadbeef.svg": b"<svg/>", "bg-decade2024.png": b"png", "report-20240101.css": SMALL}
    with served(tmp_path, files) as (port, _):
        for name in files:
            assert fetch(port, f"/static/{name}")["Cache-Control"] == "no-cache", name


def test_a_fingerprinted_file_edited_in_place_loses_immutable(tmp_path: Any) -> None:
    name = _named(SMALL, "md5", 12, "app.{}.css")
    with served(tmp_path, {name: SMALL}) as (port, static):
        assert fetch(port, f"/static/{name}")["Cache-Control"] == IMMUTABLE
        _write(os.path.join(static, name), b"edited")
        assert fetch(port, f"/static/{name}")["Cache-Control"] == "no-cache"


def test_a_large_fingerprinted_file_is_verified_while_it_is_hashed(tmp_path: Any) -> None:
    name = _named(BIG, "sha256", 16, "video.{}.bin")
    with served(tmp_path, {name: BIG, "other.deadbeefcafe.bin": BIG}) as (port, _):
        assert fetch(port, f"/static/{name}", method="HEAD")["Cache-Control"] == IMMUTABLE
        assert fetch(port, "/static/other.deadbeefcafe.bin", method="HEAD")["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    "manifest",
    [
        {"main.js": "main.4fa1.js"},  # webpack-manifest-plugin, gulp-rev
        ["/static/main.4fa1.js"],
        {"version": "1.1", "paths": {"main.js": "main.4fa1.js"}},  # Django
        {"src/main.ts": {"file": "main.4fa1.js", "src": "src/main.ts", "isEntry": True}},  # Vite
    ],
)
def test_names_listed_in_a_manifest_are_immutable(tmp_path: Any, manifest: Any) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    files = {"main.4fa1.js": b"main()", "main.js": b"main()"}
    with served(tmp_path, files, immutable_manifest=str(tmp_path / "manifest.json")) as (port, _):
        assert fetch(port, "/static/main.4fa1.js")["Cache-Control"] == IMMUTABLE
        assert fetch(port, "/static/main.js")["Cache-Control"] == "no-cache"


def test_an_unknown_manifest_shape_is_a_config_error(tmp_path: Any) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ConfigError, match="immutable_manifest"):
        StaticFiles({"/static/": str(tmp_path)}, immutable_manifest=str(tmp_path / "manifest.json"))
    with pytest.raises(ConfigError, match="immutable_manifest"):
        StaticFiles({"/static/": str(tmp_path)}, immutable_manifest=str(tmp_path / "missing.json"))


def test_static_options_are_checked_by_name(tmp_path: Any) -> None:
    app = Flask("x", static_folder=str(tmp_path))
    with pytest.raises(ConfigError, match="static_options"):
        IdentityMiddleware(app.wsgi_app, serve_static=True, static_options={"recheck": 1})


def test_static_option_values_are_checked_when_the_middleware_is_built(tmp_path: Any) -> None:
    app = Flask("x", static_folder=str(tmp_path))
    with pytest.raises(ConfigError, match="immutable_manifest"):
        IdentityMiddleware(app.wsgi_app, static_options={"immutable_manifest": str(tmp_path / "none.json")})
