"""Serve mode never sends a byte from outside its folders, indexed or in autorefresh mode.

Attacks go through a real HTTP server (werkzeug's threaded server, requests
written with ``http.client`` or a raw socket so nothing normalises the path)
and, for ``PATH_INFO`` values no HTTP client can carry, straight into the
WSGI callable. Secrets live next to the static folder, in a dot-folder inside
it, and behind symlinks; every answer is checked for their bytes.
"""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from identity_middleware.static import StaticFiles
from servers import in_front, serving

SECRET = b"TOPSECRET-OUTSIDE"
DOT_SECRET = b"TOPSECRET-DOTFILE"
PUBLIC = b"body { color: green; }"
MODES = ["index", "autorefresh"]


def build_tree(root: str) -> dict[str, Any]:
    outside = os.path.join(root, "outside")
    static = os.path.join(root, "static")
    os.makedirs(os.path.join(outside, "nested"))
    os.makedirs(os.path.join(static, "sub"))
    os.makedirs(os.path.join(static, ".git"))
    os.makedirs(os.path.join(static, "sub", ".hidden"))
    os.makedirs(os.path.join(root, "static-evil"))  # shares the prefix "static"
    contents = {
        os.path.join(outside, "secret.txt"): SECRET,
        os.path.join(outside, "nested", "secret.css"): SECRET,
        os.path.join(root, "static-evil", "secret.css"): SECRET,
        os.path.join(static, "public.css"): PUBLIC,
        os.path.join(static, "sub", "ok.css"): PUBLIC,
        os.path.join(static, ".env"): DOT_SECRET,
        os.path.join(static, ".git", "config"): DOT_SECRET,
        os.path.join(static, "sub", ".hidden", "x.css"): DOT_SECRET,
        os.path.join(outside, "secret.txt.gz"): SECRET,
    }
    for path, data in contents.items():
        with open(path, "wb") as handle:
            handle.write(data)
    links = {
        "link_out.txt": os.path.join("..", "outside", "secret.txt"),
        "linkdir_out": os.path.join("..", "outside"),
        "abs_link_out.txt": os.path.join(outside, "secret.txt"),
        "evil_sibling": os.path.join("..", "static-evil"),
        "link_in.css": "public.css",
        "linkdir_in": "sub",
        "loop": ".",
        os.path.join("sub", "again"): ".",  # sub/again -> sub
        "link_to_dotdir.txt": os.path.join(".git", "config"),
        "dangling.css": "does-not-exist.css",
    }
    for name, target in links.items():
        os.symlink(target, os.path.join(static, name))
    # a sibling that would be sent for public.css if symlinks could escape
    os.symlink(os.path.join(outside, "secret.txt.gz"), os.path.join(static, "public.css.gz"))
    return {"root": root, "static": static, "outside": outside}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_tree(str(tmp_path_factory.mktemp("security")))


def make_files(tree: dict[str, Any], mode: str, **options: Any) -> StaticFiles:
    return StaticFiles({"/static/": tree["static"]}, autorefresh=mode == "autorefresh", **options)


@pytest.fixture(scope="module", params=MODES)
def server(request: pytest.FixtureRequest, tree: dict[str, Any]) -> Iterator[tuple[str, int]]:
    with serving(in_front(make_files(tree, request.param))) as port:
        yield request.param, port


def raw_get(port: int, target: bytes, extra: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send the request line byte for byte: no client library cleans the path."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + extra + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, head, body


def assert_nothing_leaked(status: int, head: bytes, body: bytes) -> None:
    assert SECRET not in body and DOT_SECRET not in body
    assert status != 200 or b"X-Fallback: 1" in head  # never a 200 from serve mode


TRAVERSALS = [
    b"/static/../outside/secret.txt",
    b"/static/%2e%2e/outside/secret.txt",
    b"/static/%2E%2E/outside/secret.txt",
    b"/static/..%2foutside%2fsecret.txt",
    b"/static/..%2Foutside/secret.txt",
    b"/static/%2e%2e%2foutside%2fsecret.txt",
    b"/static/sub/../../outside/secret.txt",
    b"/static/sub/%2e%2e/%2e%2e/outside/secret.txt",
    b"/static/..\\outside\\secret.txt",
    b"/static/..%5coutside%5csecret.txt",
    b"/static/%5c..%5c..%5coutside%5csecret.txt",
    b"/static/%00/../outside/secret.txt",
    b"/static/public.css%00.txt",
    b"/static/..%00/outside/secret.txt",
    b"/static//etc/passwd",
    b"/static/%2fetc%2fpasswd",
    b"/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"/static/%252e%252e/outside/secret.txt",
    b"/static/%c0%ae%c0%ae/outside/secret.txt",
    b"/static/./../outside/secret.txt",
    b"/static/link_out.txt",
    b"/static/abs_link_out.txt",
    b"/static/linkdir_out/secret.txt",
    b"/static/linkdir_out/nested/secret.css",
    b"/static/evil_sibling/secret.css",
    b"/static/loop/linkdir_out/secret.txt",
    b"/static/.env",
    b"/static/%2eenv",
    b"/static/.git/config",
    b"/static/%2egit/config",
    b"/static/sub/.hidden/x.css",
    b"/static/link_to_dotdir.txt",
    b"/static/dangling.css",
    b"/static-evil/secret.css",
    b"/static/../static-evil/secret.css",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=lambda t: t.decode("latin-1"))
def test_traversal_attempts_never_serve_a_byte_from_outside(server: tuple[str, int], target: bytes) -> None:
    _, port = server
    assert_nothing_leaked(*raw_get(port, target))


def test_absolute_path_of_a_secret_is_not_served(server: tuple[str, int], tree: dict[str, Any]) -> None:
    _, port = server
    secret = os.path.join(tree["outside"], "secret.txt").encode()
    for target in (b"/static/" + secret, b"/static" + secret, b"/static/%2f" + secret.lstrip(b"/")):
        assert_nothing_leaked(*raw_get(port, target))


def test_symlinks_escaping_the_folder_are_skipped_but_inner_ones_served(server: tuple[str, int]) -> None:
    _, port = server
    status, head, body = raw_get(port, b"/static/link_in.css")
    assert status == 200 and body == PUBLIC and b"X-Fallback" not in head
    status, _, body = raw_get(port, b"/static/linkdir_in/ok.css")
    assert status == 200 and body == PUBLIC
    assert raw_get(port, b"/static/link_out.txt")[0] == 404


def test_a_sibling_symlinked_from_outside_is_never_sent(server: tuple[str, int]) -> None:
    _, port = server
    status, head, body = raw_get(port, b"/static/public.css", b"Accept-Encoding: gzip\r\n")
    assert status == 200 and body == PUBLIC and b"Content-Encoding" not in head


def test_the_public_file_is_served_so_the_attacks_above_are_meaningful(server: tuple[str, int]) -> None:
    _, port = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/static/public.css")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == PUBLIC
    conn.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "path_info",
    [
        "/static/\x00",
        "/static/public.css\x00",
        "/static/..",
        "/static/../outside/secret.txt",
        "/static/sub/../public.css",
        "/static/./public.css",
        "/static//public.css",
        "/static/\\..\\outside\\secret.txt",
        "/static/C:\\outside\\secret.txt",
        "/static/\u2028../x",  # not a WSGI (latin-1) string at all
        "/static/\xc0\xae\xc0\xae/outside/secret.txt",  # overlong UTF-8, not valid
        "/static/\xff.css",
        "/static",
        "/static/",
        "static/public.css",
        "",
    ],
)
def test_hostile_path_info_falls_through(tree: dict[str, Any], mode: str, path_info: str) -> None:
    files = make_files(tree, mode)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path_info}
    assert files(environ, lambda status, headers, exc_info=None: None) is None


@pytest.mark.parametrize("mode", MODES)
def test_absolute_path_info_falls_through(tree: dict[str, Any], mode: str) -> None:
    files = make_files(tree, mode)
    secret = os.path.join(tree["outside"], "secret.txt")
    for path_info in ("/static/" + secret, "/static" + secret, secret):
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path_info}
        assert files(environ, lambda status, headers, exc_info=None: None) is None


@pytest.mark.parametrize("mode", MODES)
def test_dotfiles_are_served_only_when_allowed(tree: dict[str, Any], mode: str) -> None:
    files = make_files(tree, mode, allow_dotfiles=True)
    with serving(in_front(files)) as port:
        status, _, body = raw_get(port, b"/static/.env")
        assert status == 200 and body == DOT_SECRET
        # allowing dotfiles never allows escaping the folder
        escapes = (b"/static/link_out.txt", b"/static/../outside/secret.txt", b"/static/linkdir_out/secret.txt")
        for target in escapes:
            status, head, body = raw_get(port, target)
            assert SECRET not in body and (status != 200 or b"X-Fallback" in head)


def test_the_index_holds_only_files_inside_the_folder(tree: dict[str, Any]) -> None:
    files = make_files(tree, "index")
    static = os.path.realpath(tree["static"])
    assert len(files) > 0
    for url, entry in files._index.items():
        assert os.path.commonpath([static, entry.path]) == static, url
        assert "/." not in url
    # a link to the folder itself is not followed; a loop below it ends; aliases both work
    assert "/static/loop/public.css" not in files
    assert "/static/sub/ok.css" in files and "/static/linkdir_in/ok.css" in files
    assert "/static/sub/again/ok.css" not in files and "/static/linkdir_in/again/ok.css" not in files


segments = st.sampled_from(
    [
        "..", ".", "", "%2e%2e", "%2f", "\\", "\x00", "static", "outside", "secret.txt", "sub", "public.css",
        "link_out.txt", "linkdir_out", "loop", ".git", "config", ".env", "evil_sibling", "secret.css",
        "static-evil", "/", "C:", "~", "\u00e9",
    ]
)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_property_any_served_body_is_a_file_inside_the_folder(tree: dict[str, Any], mode: str) -> None:
    files = make_files(tree, mode)
    allowed = {PUBLIC}

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(parts=st.lists(segments, min_size=1, max_size=6), prefix=st.sampled_from(["/static/", "/static", "/"]))
    def check(parts: list[str], prefix: str) -> None:
        path_info = prefix + "/".join(parts)
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path_info}
        statuses: list[str] = []
        response = files(environ, lambda status, headers, exc_info=None: statuses.append(status))
        if response is None:
            return
        try:
            body = b"".join(response)
        finally:
            getattr(response, "close", lambda: None)()
        assert body in allowed, (path_info, body)

    check()
