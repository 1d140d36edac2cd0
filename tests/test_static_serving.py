"""Serve mode, rule by rule, through a real HTTP server on loopback.

Every test talks to werkzeug's threaded server (or wsgiref's, where the
server's ``wsgi.file_wrapper`` matters) with ``http.client`` or a raw socket.
``StaticFiles`` sits in front of a fallback app that answers 404 with an
``X-Fallback`` header, so "falls through" is something a test can see.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import socket
import wsgiref.util
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import pytest
from flask import Flask

from identity_middleware import ConfigError
from conftest import wait_for
from identity_middleware.static import StaticFiles
from servers import fetch, in_front, serving, serving_with_wsgiref

CSS = b"".join(b".rule-%04d { color: #0a0b0c; }\n" % i for i in range(70))[:2048]
JS = b"function hello() { return 'hello world'; }\n" * 40
JS_GZ = gzip.compress(JS, mtime=0)
JS_BR = b"BROTLI:" + JS[:200]  # served as is: the owner's precompressed file
BIG = bytes(range(256)) * (3 * 4096)  # 3 MiB: streamed from disk, not kept in memory
#: a name whose hex segment is the start of the MD5 of its content, as Django names files
FINGERPRINTED = f"app.{hashlib.md5(CSS).hexdigest()[:12]}.css"
MTIME = 1_700_000_000  # fixed, so Last-Modified and date comparisons are exact


def _write(path: os.PathLike[str] | str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.utime(path, (MTIME, MTIME))


def build_tree(root: Any) -> str:
    static = os.path.join(root, "static")
    files = {
        "app.css": CSS,
        "app.js": JS,
        "app.js.gz": JS_GZ,
        "app.js.br": JS_BR,
        FINGERPRINTED: CSS,
        "logo-deadbeef.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        "report-20240101.css": CSS,
        "logo.png": b"\x89PNG\r\n\x1a\n" + bytes(100),
        "data.json": b'{"a": 1}',
        "big.bin": BIG,
        "empty.txt": b"",
        "sub/deep.txt": b"deep",
        "caf\u00e9.css": b"/* cafe */",
        ".env": b"SECRET=1",
    }
    for name, data in files.items():
        _write(os.path.join(static, name), data)
    return static


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tree(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def port(static_dir: str) -> Iterator[int]:
    with serving(in_front(StaticFiles({"/static/": static_dir}))) as server_port:
        yield server_port


def open_fds_to(path: str) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                count += 1
    return count


# -- 200 and HEAD -----------------------------------------------------------------------


def test_get_returns_the_file_with_length_etag_and_last_modified(port: int) -> None:
    reply = fetch(port, "/static/app.css")
    assert reply.status == 200
    assert reply.body == CSS
    assert reply["Content-Length"] == str(len(CSS))
    assert reply["Content-Type"] == "text/css; charset=utf-8"
    assert reply["Last-Modified"] == formatdate(MTIME, usegmt=True)
    assert reply["ETag"].startswith('"') and not reply["ETag"].startswith('W/')
    assert reply["Accept-Ranges"] == "bytes"
    assert reply["X-Fallback"] is None


def test_text_types_carry_a_charset_and_binary_types_do_not(port: int) -> None:
    assert fetch(port, "/static/app.js")["Content-Type"] == "text/javascript; charset=utf-8"
    assert fetch(port, "/static/logo.png")["Content-Type"] == "image/png"
    assert fetch(port, "/static/data.json")["Content-Type"] == "application/json"


def test_head_sends_the_same_headers_without_a_body(port: int) -> None:
    get, head = fetch(port, "/static/app.css"), fetch(port, "/static/app.css", method="HEAD")
    assert head.status == 200 and head.body == b""
    for name in ("Content-Type", "Content-Length", "ETag", "Last-Modified", "Cache-Control"):
        assert head[name] == get[name]


def test_head_of_a_large_file_sends_its_length_without_a_body(port: int) -> None:
    head = fetch(port, "/static/big.bin", method="HEAD")
    assert head.status == 200 and head.body == b"" and head["Content-Length"] == str(len(BIG))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_fall_through_to_the_app(port: int, method: str) -> None:
    reply = fetch(port, "/static/app.css", method=method)
    assert reply["X-Fallback"] == "1" and reply.body == b"fallback " + method.encode()


def test_a_path_not_in_the_index_falls_through(port: int) -> None:
    assert fetch(port, "/static/missing.css")["X-Fallback"] == "1"
    assert fetch(port, "/static/sub")["X-Fallback"] == "1"  # a folder is not a file
    assert fetch(port, "/static/")["X-Fallback"] == "1"


def test_files_in_subfolders_and_non_ascii_names_are_served(port: int) -> None:
    assert fetch(port, "/static/sub/deep.txt").body == b"deep"
    assert fetch(port, "/static/caf%C3%A9.css").body == b"/* cafe */"


def test_the_query_string_does_not_change_the_answer(port: int) -> None:
    assert fetch(port, "/static/app.css?v=42").body == CSS


def test_an_empty_file_is_served_with_length_zero(port: int) -> None:
    reply = fetch(port, "/static/empty.txt")
    assert reply.status == 200 and reply.body == b"" and reply["Content-Length"] == "0"


def test_dotfiles_are_not_indexed(port: int) -> None:
    assert fetch(port, "/static/.env")["X-Fallback"] == "1"


# -- Cache-Control --------------------------------------------------------------------


def _flask(static_dir: str, **config: Any) -> Flask:
    app = Flask("serving", static_folder=static_dir, static_url_path="/static")
    app.config.update(config)
    return app


def _cache_control(static_dir: str, path: str, **options: Any) -> str | None:
    with serving(in_front(StaticFiles({"/static/": static_dir}, **options))) as server_port:
        return fetch(server_port, path)["Cache-Control"]


def test_cache_control_without_max_age_is_no_cache_like_flask(static_dir: str) -> None:
    assert _cache_control(static_dir, "/static/app.css", app=_flask(static_dir)) == "no-cache"
    assert _cache_control(static_dir, "/static/app.css") == "no-cache"


def test_cache_control_follows_send_file_max_age_default(static_dir: str) -> None:
    app = _flask(static_dir, SEND_FILE_MAX_AGE_DEFAULT=3600)
    assert _cache_control(static_dir, "/static/app.css", app=app) == "public, max-age=3600"
    app = _flask(static_dir, SEND_FILE_MAX_AGE_DEFAULT=0)
    assert _cache_control(static_dir, "/static/app.css", app=app) == "no-cache, max-age=0"


def test_cache_control_uses_the_apps_get_send_file_max_age(static_dir: str) -> None:
    class ScriptsLongerApp(Flask):
        def get_send_file_max_age(self, filename: str | None) -> int | None:
            return 600 if filename and filename.endswith(".js") else 60

    app = ScriptsLongerApp("serving", static_folder=static_dir, static_url_path="/static")
    files = StaticFiles({"/static/": static_dir}, app=app)
    with serving(in_front(files)) as server_port:
        assert fetch(server_port, "/static/app.js")["Cache-Control"] == "public, max-age=600"
        assert fetch(server_port, "/static/app.css")["Cache-Control"] == "public, max-age=60"


def test_cache_control_without_an_app_uses_max_age(static_dir: str) -> None:
    assert _cache_control(static_dir, "/static/app.css", max_age=120) == "public, max-age=120"


def test_a_name_whose_hash_matches_the_content_is_cached_for_a_year_as_immutable(port: int) -> None:
    assert fetch(port, f"/static/{FINGERPRINTED}")["Cache-Control"] == "public, max-age=31536000, immutable"


def test_a_hex_looking_name_that_is_not_the_contents_hash_is_not_immutable(port: int) -> None:
    assert fetch(port, "/static/logo-deadbeef.svg")["Cache-Control"] == "no-cache"


def test_date_named_file_is_not_treated_as_fingerprinted(port: int) -> None:
    assert fetch(port, "/static/report-20240101.css")["Cache-Control"] == "no-cache"


def test_immutable_pattern_declares_names_fingerprinted_without_a_hash_check(static_dir: str) -> None:
    assert _cache_control(static_dir, "/static/logo-deadbeef.svg", immutable_pattern=r"-[0-9a-f]{8}\.") == (
        "public, max-age=31536000, immutable"
    )
    assert _cache_control(static_dir, "/static/app.css", immutable_pattern=r"-[0-9a-f]{8}\.") == "no-cache"


def test_bad_options_raise_config_error_naming_the_option(static_dir: str) -> None:
    with pytest.raises(ConfigError, match="immutable_pattern"):
        StaticFiles({"/static/": static_dir}, immutable_pattern="(unclosed")
    for prefix in ("static/", "/static", "/a/../b/", "/a//b/"):
        with pytest.raises(ConfigError, match="static_dirs"):
            StaticFiles({prefix: static_dir})


# -- conditional requests -------------------------------------------------------------


def test_if_none_match_with_the_etag_gives_304(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    reply = fetch(port, "/static/app.css", {"If-None-Match": etag})
    assert reply.status == 304 and reply.body == b""


def test_if_none_match_list_with_weak_etag_gives_304(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    reply = fetch(port, "/static/app.css", {"If-None-Match": f'"other", W/{etag}, "third"'})
    assert reply.status == 304


def test_if_none_match_star_gives_304(port: int) -> None:
    assert fetch(port, "/static/app.css", {"If-None-Match": "*"}).status == 304


def test_if_none_match_with_other_etags_gives_200(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"If-None-Match": '"nope", W/"nope2"'})
    assert reply.status == 200 and reply.body == CSS


def test_not_modified_keeps_etag_cache_control_and_vary(port: int) -> None:
    full = fetch(port, "/static/app.js", {"Accept-Encoding": "gzip"})
    reply = fetch(port, "/static/app.js", {"Accept-Encoding": "gzip", "If-None-Match": full["ETag"]})
    assert reply.status == 304
    assert reply["ETag"] == full["ETag"]
    assert reply["Cache-Control"] == full["Cache-Control"]
    assert reply["Vary"] == "Accept-Encoding"
    assert reply["Content-Length"] in (None, "0") and reply["Content-Encoding"] is None


def test_if_modified_since_not_older_than_the_file_gives_304(port: int) -> None:
    for when in (MTIME, MTIME + 3600):
        reply = fetch(port, "/static/app.css", {"If-Modified-Since": formatdate(when, usegmt=True)})
        assert reply.status == 304


def test_if_modified_since_older_than_the_file_gives_200(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"If-Modified-Since": formatdate(MTIME - 1, usegmt=True)})
    assert reply.status == 200 and reply.body == CSS


def test_if_none_match_overrides_if_modified_since(port: int) -> None:
    headers = {"If-None-Match": '"stale"', "If-Modified-Since": formatdate(MTIME + 3600, usegmt=True)}
    assert fetch(port, "/static/app.css", headers).status == 200


def test_an_unparsable_if_modified_since_is_ignored(port: int) -> None:
    assert fetch(port, "/static/app.css", {"If-Modified-Since": "yesterday"}).status == 200


def test_head_honours_if_none_match(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    assert fetch(port, "/static/app.css", {"If-None-Match": etag}, method="HEAD").status == 304


def test_if_match_with_the_etag_or_star_gives_200(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    for value in (etag, f'"other", {etag}', "*"):
        reply = fetch(port, "/static/app.css", {"If-Match": value})
        assert reply.status == 200 and reply.body == CSS


def test_if_match_with_other_or_weak_etags_gives_412(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    for value in ('"other"', f"W/{etag}"):
        reply = fetch(port, "/static/app.css", {"If-Match": value})
        assert reply.status == 412 and reply.body == b""


def test_if_unmodified_since_before_the_file_changed_gives_412(port: int) -> None:
    for when, status in ((MTIME - 1, 412), (MTIME, 200), (MTIME + 1, 200)):
        headers = {"If-Unmodified-Since": formatdate(when, usegmt=True)}
        assert fetch(port, "/static/app.css", headers).status == status


def test_if_match_overrides_if_unmodified_since(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    headers = {"If-Match": etag, "If-Unmodified-Since": formatdate(MTIME - 1, usegmt=True)}
    assert fetch(port, "/static/app.css", headers).status == 200


def test_etag_is_a_content_hash_equal_on_every_host(tmp_path: Any, static_dir: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(static_dir, copy)  # new inodes and mtimes, same bytes
    os.utime(copy / "app.css", (MTIME + 99, MTIME + 99))
    here = StaticFiles({"/static/": static_dir})
    there = StaticFiles({"/static/": str(copy)})
    assert here._index["/static/app.css"].etag == there._index["/static/app.css"].etag
    assert here._index["/static/app.css"].etag != here._index["/static/app.js"].etag


# -- ranges ---------------------------------------------------------------------------


def test_bytes_0_0_gives_one_byte(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "bytes=0-0"})
    assert reply.status == 206 and reply.body == CSS[:1]
    assert reply["Content-Range"] == f"bytes 0-0/{len(CSS)}" and reply["Content-Length"] == "1"


def test_suffix_range_gives_the_last_bytes(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "bytes=-10"})
    assert reply.status == 206 and reply.body == CSS[-10:]
    assert reply["Content-Range"] == f"bytes {len(CSS) - 10}-{len(CSS) - 1}/{len(CSS)}"


def test_suffix_longer_than_the_file_gives_the_whole_file(port: int) -> None:
    reply = fetch(port, "/static/data.json", {"Range": "bytes=-1000"})
    assert reply.status == 206 and reply.body == b'{"a": 1}' and reply["Content-Range"] == "bytes 0-7/8"


def test_open_ended_range_runs_to_the_end(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "bytes=2000-"})
    assert reply.status == 206 and reply.body == CSS[2000:]


def test_range_end_past_the_file_is_clamped(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "bytes=2040-999999"})
    assert reply.status == 206 and reply.body == CSS[2040:]
    assert reply["Content-Range"] == f"bytes 2040-{len(CSS) - 1}/{len(CSS)}"


def test_range_of_a_streamed_file_reads_the_right_bytes(port: int) -> None:
    start, end = 1_000_000, 1_300_123
    reply = fetch(port, "/static/big.bin", {"Range": f"bytes={start}-{end}"})
    assert reply.status == 206 and reply.body == BIG[start : end + 1]
    assert reply["Content-Length"] == str(end + 1 - start)


def test_unsatisfiable_range_gives_416_with_the_size(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": f"bytes={len(CSS)}-"})
    assert reply.status == 416 and reply["Content-Range"] == f"bytes */{len(CSS)}" and reply.body == b""


@pytest.mark.parametrize("value", ["bytes=abc", "bytes=5-2", "bytes=-0", "bytes="])
def test_malformed_byte_range_gives_416(port: int, value: str) -> None:
    reply = fetch(port, "/static/app.css", {"Range": value})
    assert reply.status == 416 and reply["Content-Range"] == f"bytes */{len(CSS)}"


def test_multiple_ranges_give_the_full_file(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "bytes=0-1,10-20"})
    assert reply.status == 200 and reply.body == CSS and reply["Content-Range"] is None


def test_an_unknown_range_unit_is_ignored(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "items=0-1"})
    assert reply.status == 200 and reply.body == CSS


def test_if_range_with_the_current_etag_gives_206(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    reply = fetch(port, "/static/app.css", {"Range": "bytes=0-9", "If-Range": etag})
    assert reply.status == 206 and reply.body == CSS[:10]


def test_if_range_with_an_old_etag_gives_the_full_file(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "bytes=0-9", "If-Range": '"old"'})
    assert reply.status == 200 and reply.body == CSS


def test_if_range_with_a_weak_etag_gives_the_full_file(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    reply = fetch(port, "/static/app.css", {"Range": "bytes=0-9", "If-Range": "W/" + etag})
    assert reply.status == 200 and reply.body == CSS


def test_if_range_with_the_last_modified_date_gives_206(port: int) -> None:
    headers = {"Range": "bytes=0-9", "If-Range": formatdate(MTIME, usegmt=True)}
    assert fetch(port, "/static/app.css", headers).status == 206


def test_if_range_with_another_date_gives_the_full_file(port: int) -> None:
    headers = {"Range": "bytes=0-9", "If-Range": formatdate(MTIME + 60, usegmt=True)}
    assert fetch(port, "/static/app.css", headers).status == 200


def test_range_is_ignored_on_head(port: int) -> None:
    reply = fetch(port, "/static/app.css", {"Range": "bytes=0-9"}, method="HEAD")
    assert reply.status == 200 and reply["Content-Length"] == str(len(CSS))


def test_range_on_an_empty_file_gives_the_empty_file(port: int) -> None:
    reply = fetch(port, "/static/empty.txt", {"Range": "bytes=0-0"})
    assert reply.status == 200 and reply.body == b""


def test_matching_if_none_match_beats_range(port: int) -> None:
    etag = fetch(port, "/static/app.css")["ETag"]
    assert fetch(port, "/static/app.css", {"Range": "bytes=0-0", "If-None-Match": etag}).status == 304


# -- precompressed siblings -----------------------------------------------------------


def test_brotli_sibling_is_sent_when_accepted(port: int) -> None:
    reply = fetch(port, "/static/app.js", {"Accept-Encoding": "gzip, deflate, br"})
    assert reply.body == JS_BR and reply["Content-Encoding"] == "br"
    assert reply["Content-Type"] == "text/javascript; charset=utf-8"
    assert reply["Content-Length"] == str(len(JS_BR))


def test_gzip_sibling_is_sent_when_only_gzip_is_accepted(port: int) -> None:
    reply = fetch(port, "/static/app.js", {"Accept-Encoding": "gzip"})
    assert reply["Content-Encoding"] == "gzip" and gzip.decompress(reply.body) == JS


def test_no_accept_encoding_gives_the_plain_file(port: int) -> None:
    reply = fetch(port, "/static/app.js")
    assert reply.body == JS and reply["Content-Encoding"] is None


@pytest.mark.parametrize(
    "accept, coding",
    [
        ("br;q=0, gzip", "gzip"),
        ("br;q=0, gzip;q=0", None),
        ("gzip;q=0", None),
        ("identity", None),
        ("gzip;q=1.0, br;q=0.5", "gzip"),
        ("br;q=0.5, gzip;q=0.5", "br"),
        ("*", "br"),
        ("*;q=0.2, br;q=0", "gzip"),
        ("gzip;q=0, *", "br"),
        ("x-gzip", "gzip"),
        ("GZIP", "gzip"),
        ("br;q=0.1, identity", None),
        ("identity;q=0, *;q=0", None),
    ],
)
def test_accept_encoding_q_values_choose_the_representation(port: int, accept: str, coding: str | None) -> None:
    reply = fetch(port, "/static/app.js", {"Accept-Encoding": accept})
    assert reply["Content-Encoding"] == coding
    assert reply.body == {"br": JS_BR, "gzip": JS_GZ, None: JS}[coding]


def test_vary_is_sent_on_every_answer_for_a_file_with_siblings(port: int) -> None:
    plain = fetch(port, "/static/app.js", {"Accept-Encoding": "identity"})
    partial = fetch(port, "/static/app.js", {"Accept-Encoding": "br", "Range": "bytes=0-3"})
    not_modified = fetch(port, "/static/app.js", {"If-None-Match": plain["ETag"]})
    unsatisfiable = fetch(port, "/static/app.js", {"Range": "bytes=999999-"})
    assert [r.status for r in (plain, partial, not_modified, unsatisfiable)] == [200, 206, 304, 416]
    for reply in (plain, partial, not_modified, unsatisfiable):
        assert reply["Vary"] == "Accept-Encoding"


def test_file_without_siblings_sends_no_vary(port: int) -> None:
    assert fetch(port, "/static/app.css", {"Accept-Encoding": "gzip, br"})["Vary"] is None


def test_each_encoding_has_its_own_etag(port: int) -> None:
    plain = fetch(port, "/static/app.js")["ETag"]
    gz = fetch(port, "/static/app.js", {"Accept-Encoding": "gzip"})["ETag"]
    br = fetch(port, "/static/app.js", {"Accept-Encoding": "br"})["ETag"]
    assert len({plain, gz, br}) == 3
    # the gzip tag does not validate the plain representation
    assert fetch(port, "/static/app.js", {"If-None-Match": gz}).status == 200
    assert fetch(port, "/static/app.js", {"If-None-Match": gz, "Accept-Encoding": "gzip"}).status == 304


def test_ranges_count_bytes_of_the_encoded_representation(port: int) -> None:
    reply = fetch(port, "/static/app.js", {"Accept-Encoding": "gzip", "Range": "bytes=0-9"})
    assert reply.status == 206 and reply.body == JS_GZ[:10]
    assert reply["Content-Range"] == f"bytes 0-9/{len(JS_GZ)}" and reply["Content-Encoding"] == "gzip"


def test_a_sibling_requested_by_its_own_name_is_labelled_like_flask_does(port: int) -> None:
    reply = fetch(port, "/static/app.js.gz")
    assert reply.body == JS_GZ and reply["Content-Encoding"] == "gzip"
    assert reply["Content-Type"] == "text/javascript; charset=utf-8"


# -- streaming and file handles -------------------------------------------------------


def test_a_large_file_streams_intact(port: int) -> None:
    reply = fetch(port, "/static/big.bin")
    assert reply.status == 200 and reply.body == BIG


def test_a_large_file_uses_the_servers_file_wrapper_when_offered(static_dir: str) -> None:
    files = StaticFiles({"/static/": static_dir})
    returned: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        returned.append(in_front(files)(environ, start_response))
        return returned[-1]

    with serving_with_wsgiref(app) as server_port:
        reply = fetch(server_port, "/static/big.bin")
        small = fetch(server_port, "/static/app.css")
    assert reply.body == BIG and small.body == CSS
    assert isinstance(returned[0], wsgiref.util.FileWrapper)
    assert not isinstance(returned[1], wsgiref.util.FileWrapper)  # small files come from memory


def test_no_file_handle_stays_open_after_requests(port: int, static_dir: str) -> None:
    big = os.path.realpath(os.path.join(static_dir, "big.bin"))
    for headers in ({}, {"Range": "bytes=10-20"}, {"Range": "bytes=-5"}):
        assert fetch(port, "/static/big.bin", headers).status in (200, 206)
    assert wait_for(lambda: open_fds_to(big) == 0, 10)


def test_file_handle_is_closed_when_the_client_goes_away(tmp_path: Any) -> None:
    huge = tmp_path / "static" / "huge.bin"
    _write(huge, os.urandom(1 << 20) * 16)  # 16 MiB: far more than socket buffers hold
    files = StaticFiles({"/static/": str(tmp_path / "static")})
    with serving(in_front(files)) as server_port:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", server_port))
        client.sendall(b"GET /static/huge.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = client.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
        path = os.path.realpath(huge)
        assert wait_for(lambda: open_fds_to(path) == 1, 10)  # the server is mid-body
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # reset: the server's next write fails
        assert wait_for(lambda: open_fds_to(path) == 0, 10)


# -- the index is a snapshot; autorefresh is not ---------------------------------------


def test_a_large_file_changed_after_startup_is_served_as_it_is_now(tmp_path: Any) -> None:
    static = build_tree(tmp_path)
    files = StaticFiles({"/static/": static})
    _write(os.path.join(static, "big.bin"), BIG + b"more")
    with serving(in_front(files)) as server_port:
        assert fetch(server_port, "/static/big.bin").body == BIG + b"more"
        assert fetch(server_port, "/static/big.bin", {"Range": "bytes=-4"}).body == b"more"


def test_a_small_file_changed_after_startup_is_served_as_read_until_its_next_check(tmp_path: Any) -> None:
    static = build_tree(tmp_path)
    files = StaticFiles({"/static/": static}, recheck_interval=3600)
    before = files._index["/static/app.css"].etag
    _write(os.path.join(static, "app.css"), b"changed")
    with serving(in_front(files)) as server_port:
        reply = fetch(server_port, "/static/app.css")
    assert reply.body == CSS and reply["ETag"] == f'"{before}"'  # body and tag agree


def test_a_file_added_after_startup_falls_through(tmp_path: Any) -> None:
    static = build_tree(tmp_path)
    files = StaticFiles({"/static/": static})
    _write(os.path.join(static, "new.css"), b"new")
    with serving(in_front(files)) as server_port:
        assert fetch(server_port, "/static/new.css")["X-Fallback"] == "1"


def test_autorefresh_sees_new_and_changed_files(tmp_path: Any) -> None:
    static = build_tree(tmp_path)
    files = StaticFiles({"/static/": static}, autorefresh=True)
    with serving(in_front(files)) as server_port:
        first = fetch(server_port, "/static/app.css")
        assert first.body == CSS
        _write(os.path.join(static, "new.css"), b"new")
        assert fetch(server_port, "/static/new.css").body == b"new"
        _write(os.path.join(static, "app.css"), b"changed")
        second = fetch(server_port, "/static/app.css")
        assert second.body == b"changed" and second["ETag"] != first["ETag"]
        os.remove(os.path.join(static, "app.js.br"))
        assert fetch(server_port, "/static/app.js", {"Accept-Encoding": "br, gzip"}).body == JS_GZ
        assert fetch(server_port, "/static/big.bin", {"Range": "bytes=5-9"}).body == BIG[5:10]
    assert len(files) == 0  # no startup index in this mode


def test_autorefresh_defaults_to_the_apps_debug_flag(static_dir: str) -> None:
    debug_app = _flask(static_dir)
    debug_app.debug = True
    assert len(StaticFiles({"/static/": static_dir}, app=debug_app)) == 0
    assert len(StaticFiles({"/static/": static_dir}, app=_flask(static_dir))) > 0


# -- what gets indexed ------------------------------------------------------------------


def test_only_urls_the_app_routes_are_indexed(static_dir: str) -> None:
    files = StaticFiles({"/static/": static_dir}, routed=lambda path: not path.endswith(".json"))
    with serving(in_front(files)) as server_port:
        assert fetch(server_port, "/static/data.json")["X-Fallback"] == "1"
        assert fetch(server_port, "/static/app.css").status == 200


def test_routed_is_asked_with_the_text_path(static_dir: str) -> None:
    asked: list[str] = []
    StaticFiles({"/static/": static_dir}, routed=lambda path: asked.append(path) or True)
    assert "/static/caf\u00e9.css" in asked and "/static/sub/deep.txt" in asked


def test_the_longer_mount_owns_its_subtree(tmp_path: Any) -> None:
    _write(tmp_path / "app" / "widgets" / "static" / "w.css", b"from the app folder")
    _write(tmp_path / "app" / "top.css", b"top")
    _write(tmp_path / "widgets" / "other.css", b"from the blueprint folder")
    files = StaticFiles({"/": str(tmp_path / "app"), "/widgets/static/": str(tmp_path / "widgets")})
    with serving(in_front(files)) as server_port:
        assert fetch(server_port, "/top.css").body == b"top"
        assert fetch(server_port, "/widgets/static/other.css").body == b"from the blueprint folder"
        assert fetch(server_port, "/widgets/static/w.css")["X-Fallback"] == "1"


def test_small_files_beyond_the_memory_budget_are_read_from_disk(static_dir: str) -> None:
    files = StaticFiles({"/static/": static_dir}, in_memory_total=len(CSS) + 10)
    in_memory = [url for url, entry in files._index.items() if entry.body is not None]
    assert sum(len(files._index[url].body or b"") for url in in_memory) <= len(CSS) + 10
    with serving(in_front(files)) as server_port:  # every file still served, from disk if need be
        for path, data in (("/static/app.css", CSS), ("/static/app.js", JS), ("/static/sub/deep.txt", b"deep")):
            assert fetch(server_port, path).body == data
            assert fetch(server_port, path, {"Range": "bytes=1-2"}).body == data[1:3]


def test_a_missing_folder_is_skipped(tmp_path: Any, static_dir: str) -> None:
    files = StaticFiles({"/static/": static_dir, "/gone/": str(tmp_path / "gone")})
    assert "/static/app.css" in files and len(files) > 0
