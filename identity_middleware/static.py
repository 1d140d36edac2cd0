"""Serve mode: answer static files in the middleware, before Flask runs at all.

Skipping identity inside Flask still leaves every asset paying for Flask's
request cycle. :class:`StaticFiles` answers the files of the app's static
mounts itself: it walks each folder once at startup and keeps, per URL, every
header it will ever send, so a request costs one dict lookup and a
``start_response``. A URL that is not in the index returns ``None`` and the
caller passes the request on to Flask, which decides exactly as it does
without serve mode. Path traversal is impossible by construction: only URLs
built from a walk of the folders can be found. Which mounts are given to it
at all -- only those for which no code of the app would have run -- is
decided in :mod:`identity_middleware.serve_rules`.

What it answers (``GET`` and ``HEAD`` only; every other method returns
``None``, unlike WhiteNoise's 405):

* ``200`` with ``Content-Type`` (``charset=utf-8`` for text, as Flask),
  ``Content-Length``, a strong ``ETag``, ``Last-Modified``, ``Cache-Control``
  and ``Accept-Ranges: bytes``; ``HEAD`` gets the same headers and no body.
* ``Cache-Control`` mirrors Flask's static view: from
  ``app.get_send_file_max_age(filename)`` (``SEND_FILE_MAX_AGE_DEFAULT``):
  ``None`` -> ``no-cache``, ``0`` -> ``no-cache, max-age=0``, ``N`` ->
  ``public, max-age=N``. Fingerprinted names get ``public, max-age=31536000,
  immutable`` -- only when certain: the hex hash in the name matches the
  file's content, or the owner declared the name (``immutable_pattern``,
  ``immutable_manifest``); see :mod:`identity_middleware.fingerprints`.
* ``304`` for ``If-None-Match`` (lists, ``*``, weak comparison, ``W/`` tags)
  or, only when ``If-None-Match`` is absent, ``If-Modified-Since``. Per RFC
  9110 section 15.4.5 the 304 carries ``ETag``, ``Cache-Control`` and
  ``Vary`` -- the cache-relevant headers a 200 would have had; no
  ``Last-Modified``, since an ``ETag`` is present.
* ``206`` for one byte range, including ``bytes=0-0``, suffix ``bytes=-N``
  (longer than the file: the whole file) and open-ended ``bytes=N-``;
  ``416`` with ``Content-Range: bytes */size`` when unsatisfiable or
  malformed; ``If-Range`` with a strong ``ETag`` or the exact
  ``Last-Modified`` date. Several ranges get the full ``200``: allowed by RFC
  9110 section 14.2, and cheaper and safer than multipart bodies that no
  browser asks for on static assets.
* Precompressed ``name.br`` / ``name.gz`` siblings are sent, with
  ``Content-Encoding``, when ``Accept-Encoding`` accepts the coding with a
  q-value above zero (``br`` wins ties, then ``gzip``, then the plain file;
  ``*`` and ``x-gzip`` are understood). Without ``Accept-Encoding`` the plain
  file is sent. Every response for a file that has a sibling (200, 206, 304,
  416) says ``Vary: Accept-Encoding``. Each encoding is its own
  representation: its own ``ETag``, and ranges count bytes of the encoded
  body, as RFC 9110 section 14.1 prescribes for the selected representation.
  A sibling asked for by its own name (``app.js.gz``) is labelled as Flask
  labels it: the type of ``app.js`` with ``Content-Encoding: gzip``.
* ``412`` when ``If-Match`` (strong comparison, ``*``) or, without it,
  ``If-Unmodified-Since`` fails. These are evaluated here rather than left to
  Flask because the client's tag is ours: Flask would compare it with its own
  and refuse every conditional request.

ETags are a content hash (BLAKE2b, 128 bits) computed once at startup. Unlike
Flask's ``mtime-size-adler32(path)`` they are identical on every host and
survive a redeploy of unchanged files, so a browser behind a load balancer
revalidates with 304s instead of downloading each asset again from each
server. Hashing costs one read of each file at startup (well under a second
for typical asset folders); files over 32 MiB, typically media, get a
size-mtime-inode tag instead so that a worker's boot does not read gigabytes.

Files up to ``in_memory_max`` bytes (64 KiB) are kept in memory, so the usual
CSS/JS asset is answered without touching the disk (about 6x faster than
reading it per request, see ``benchmarks/serve_static.py``), up to
``in_memory_total`` (64 MiB) per process; beyond that, files are read from
disk like the large ones. Larger files are streamed
with the server's ``wsgi.file_wrapper`` (``sendfile`` in gunicorn) when
offered, else in blocks; the file is closed by the iterable's ``close()``,
which WSGI servers call also when the client goes away.

Every answer reflects the file as it is. The index remembers what each
file was (inode, size, mtime and ctime -- ctime because ``rsync -t`` and
``cp -p`` restore the others) and checks it before answering: a streamed
file (and its ``.br``/``.gz`` siblings) on every request, a file kept in
memory on the first request after ``recheck_interval`` (1 s) since its last
check. A changed file is re-read into the index -- new body, ``ETag``,
size, ``immutable`` verdict -- and the answer (200, ``HEAD``, 304, 412,
206, 416) is computed from it; a file that is gone, or being re-read by
another thread, is handed to Flask, which answers 404 exactly as it would
without serve mode (and serves the file again once it is back). Between
two checks an in-memory file is answered as read at the last check, body
and ``ETag`` consistent with each other: a stat per request would cost 1.5
us, about as much as the whole answer (see ``benchmarks/serve_static.py``),
so an edit in place can take up to ``recheck_interval`` to be seen; set it
to ``0`` to check on every request. A file added after startup is not in
the index: Flask serves it.

For development, ``autorefresh=True`` (default: ``app.debug``) looks every
request up on disk instead, safely: canonical relative path only,
no dot segments, containment checked with ``os.path.commonpath`` on real
paths, the final component opened with ``O_NOFOLLOW``.

Security notes. Dotfiles and dot-folders (``.env``, ``.git/``) are never
indexed unless ``allow_dotfiles=True``; such requests fall through to Flask.
A symlink is indexed only when its real target lies inside the folder (and,
unless allowed, outside dot-folders); Flask's own view would follow it
anywhere. When ``routed`` is given, a URL is served only if the app's URL map
routes it to a static endpoint, so a dynamic view shadowing a file (a
``/static/config.js`` route) keeps answering it.

Deliberate differences from Flask's static view (same status and body
otherwise; ``tests/test_static_vs_flask.py`` checks both):

* ETag value (content hash, above). No ``Expires`` (``Cache-Control: max-age``
  overrides it, RFC 9111 section 5.3), no ``Date`` (the server adds it), no
  ``Content-Disposition: inline`` (inline is the default disposition).
* ``If-None-Match`` is evaluated before ``Range`` (RFC 9110 section 13.2.2):
  a matching tag with a ``Range`` gives 304; Flask gives 206.
* ``Range`` is ignored on ``HEAD`` (RFC 9110 section 14.2: defined for GET
  only); Flask answers 206.
* Several ranges, or a unit other than ``bytes`` (which RFC 9110 says MUST be
  ignored), give the full 200; Flask answers 416.
* A suffix range longer than the file gives the whole file as 206 (RFC 9110
  section 14.1.3); Flask answers 416.
* ``If-Range`` uses the strong comparison (RFC 9110 section 13.1.5): a ``W/``
  tag, or a date other than ``Last-Modified``, gives the full 200; Flask
  treats a weak tag as a match and accepts any later date.
* ``Cache-Control: public, max-age=31536000, immutable`` on fingerprinted
  names (verified or declared, above); Flask uses the same max-age for all.
* Between two checks of an in-memory file (``recheck_interval``), an edit
  on disk is not yet seen; Flask reads the file on every request.
* 416 responses have an empty body; Flask sends an HTML error page. When
  the app has an error handler that would answer a 416 (for the code,
  ``RequestedRangeNotSatisfiable``, ``HTTPException`` or ``Exception``), an
  unsatisfiable range is left to Flask (``unsatisfiable_to_app``), so that
  handler answers it as without serve mode. A failed
  ``If-Match`` gives 412 with an empty body; Flask sends the whole file with
  its 412. Flask ignores ``If-Unmodified-Since``; we answer 412 when the file
  is newer (RFC 9110 section 13.1.4).
* A sibling ``.br``/``.gz`` may be sent instead of the plain file: the decoded
  body is the same bytes. Flask never negotiates.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mimetypes
import os
import re
import stat
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping

from werkzeug.http import (
    http_date,
    parse_accept_header,
    parse_date,
    parse_etags,
    parse_if_range_header,
    parse_range_header,
)
from werkzeug.utils import get_content_type

from . import fingerprints
from .config import ConfigError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from flask import Flask

__all__ = ["StaticFiles", "OPTIONS"]

log = logging.getLogger(__name__)

_IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"
_HASH_LIMIT = 32 * 1024 * 1024
_CODINGS = (("br", ".br"), ("gzip", ".gz"))  # preference order on equal q
_UNLISTED = 1e-6  # the q-value of an identity coding the client did not mention
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_monotonic = time.monotonic

#: The keyword options of :class:`StaticFiles` (what ``IdentityMiddleware(static_options=...)`` accepts).
OPTIONS = frozenset(
    {
        "autorefresh",
        "allow_dotfiles",
        "immutable_pattern",
        "immutable_manifest",
        "max_age",
        "in_memory_max",
        "in_memory_total",
        "block_size",
        "recheck_interval",
    }
)


class _File:
    """One representation of one URL, with every header precomputed at startup."""

    __slots__ = (
        "path",
        "size",
        "mtime_ns",
        "mtime_s",
        "etag",
        "body",
        "headers",
        "base_headers",
        "not_modified",
        "vary",
        "variants",
        "signature",
        "key",
        "fresh_until",
        "source",
    )

    def __init__(
        self,
        path: str,
        st: os.stat_result,
        etag: str,
        body: bytes | None,
        content_type: str,
        coding: str | None,
        cache_control: str,
        vary: bool,
    ) -> None:
        self.path = path
        self.key = _stat_key(st)  # what the file was when body, size and tag were taken
        #: monotonic time until which an in-memory entry is answered without a stat; a
        #: streamed one (no body) is checked on every request, so it stays 0
        self.fresh_until = 0.0
        #: (prefix, folder, relative path) of an index entry, to re-read it when it changed
        self.source: tuple[str, str, str] | None = None
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.mtime_s = int(st.st_mtime)
        self.etag = etag  # unquoted
        self.body = body
        self.vary = vary
        self.variants: dict[str, _File] | None = None
        self.signature: tuple[Any, ...] = ()
        quoted = f'"{etag}"'
        base = [
            ("Content-Type", content_type),
            ("ETag", quoted),
            ("Last-Modified", http_date(self.mtime_s)),
            ("Cache-Control", cache_control),
            ("Accept-Ranges", "bytes"),
        ]
        if coding is not None:
            base.append(("Content-Encoding", coding))
        not_modified = [("ETag", quoted), ("Cache-Control", cache_control)]
        if vary:
            base.append(("Vary", "Accept-Encoding"))
            not_modified.append(("Vary", "Accept-Encoding"))
        #: headers of a 206 before Content-Range and Content-Length are added
        self.base_headers = base
        self.headers = [*base, ("Content-Length", str(self.size))]
        self.not_modified = not_modified


class _FileSlice:
    """Iterate over ``length`` bytes of an open file from ``start``.

    The file is closed as soon as the last block is read, and by ``close()``,
    which servers call also when the client went away mid-body.
    """

    __slots__ = ("_file", "_remaining", "_block")

    def __init__(self, file: Any, start: int, length: int, block: int) -> None:
        if start:
            file.seek(start)
        self._file = file
        self._remaining = length
        self._block = block

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._remaining > 0:
            data = self._file.read(min(self._block, self._remaining))
            if data:
                self._remaining -= len(data)
                return data
        self._file.close()
        raise StopIteration

    def close(self) -> None:
        self._file.close()


class StaticFiles:
    """Answer GET/HEAD for the files under ``mounts``; ``None`` means "not mine, ask Flask".

    ``mounts`` maps a URL prefix (text) that starts and ends with ``/`` to a folder.
    When two prefixes overlap, the longer one owns its whole subtree, as a
    more specific rule does in werkzeug's router.

    Keyword options:

    ``app``
        The Flask app whose ``get_send_file_max_age`` sets ``Cache-Control``,
        and whose ``debug`` flag is the default for ``autorefresh``.
    ``routed``
        ``routed(path) -> bool``: whether the app routes a GET of ``path``
        (text, as Flask's router sees it: ``/static/café.css``) to a static
        endpoint, or the owner listed it. Asked once per file at startup;
        only confirmed URLs are served. ``None`` serves every file in the
        folders.
    ``autorefresh``
        Look each request up on disk instead of in the startup index (for
        development; slower). Default: ``app.debug``, else ``False``.
    ``allow_dotfiles``
        Serve names starting with ``.`` too. Default ``False``.
    ``immutable_pattern``
        Regex (string or compiled) searched in a file's name: the owner
        declares matching names fingerprinted, cached for a year as
        ``immutable``. Default ``None``: only names whose embedded hex hash is
        verified against the content are (:mod:`identity_middleware.fingerprints`).
    ``immutable_manifest``
        Path (or paths) of a bundler manifest whose listed names are
        fingerprinted (webpack, gulp-rev, Django, Sprockets, Vite formats).
    ``max_age``
        Seconds for ``Cache-Control`` when there is no ``app`` (``None`` gives
        ``no-cache``, like Flask's default).
    ``max_age_for``
        Per mount prefix, the ``get_send_file_max_age`` Flask's view of that
        mount calls (a blueprint's own for its folder); the middleware passes
        it. Mounts not in it use ``app.get_send_file_max_age``.
    ``in_memory_max``
        Files up to this many bytes are kept in memory (default 64 KiB)...
    ``in_memory_total``
        ...until they add up to this many bytes (default 64 MiB).
    ``block_size``
        Read size when streaming larger files (default 64 KiB).
    ``recheck_interval``
        Seconds a file kept in memory is answered from memory before it is
        checked on disk again (default 1.0; ``0`` checks on every request).
        Files streamed from disk are checked on every request.
    ``unsatisfiable_to_app``
        Return ``None`` (let the app answer) for an unsatisfiable range
        instead of an empty 416; the middleware sets it when the app has an
        error handler that would answer that 416.

    Environ keys read: ``REQUEST_METHOD``, ``PATH_INFO``,
    ``HTTP_ACCEPT_ENCODING``, the conditional and range headers and
    ``wsgi.file_wrapper``. Nothing is written.
    """

    def __init__(
        self,
        mounts: Mapping[str, str | os.PathLike[str]],
        *,
        app: Flask | None = None,
        routed: Callable[[str], bool] | None = None,
        autorefresh: bool | None = None,
        allow_dotfiles: bool = False,
        immutable_pattern: str | re.Pattern[str] | None = None,
        immutable_manifest: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        max_age: int | None = None,
        max_age_for: Mapping[str, Callable[[str], int | None]] | None = None,
        in_memory_max: int = 64 * 1024,
        in_memory_total: int = 64 * 1024 * 1024,
        block_size: int = 64 * 1024,
        recheck_interval: float = 1.0,
        unsatisfiable_to_app: bool = False,
    ) -> None:
        self._app = app
        self._unsatisfiable_to_app = unsatisfiable_to_app
        self._routed = routed
        self._allow_dotfiles = allow_dotfiles
        self._autorefresh = bool(app.debug if autorefresh is None and app is not None else autorefresh)
        self._immutable = _compile_pattern(immutable_pattern)
        self._manifest = fingerprints.load_manifests(immutable_manifest)
        if (
            isinstance(recheck_interval, bool)
            or not isinstance(recheck_interval, (int, float))
            or not 0 <= recheck_interval < float("inf")
        ):
            raise ConfigError("recheck_interval", recheck_interval, "a number of seconds >= 0")
        self._recheck_interval = float(recheck_interval)
        self._reloading = threading.Lock()
        self._max_age = max_age
        self._max_age_for = dict(max_age_for or {})
        self._in_memory_max = in_memory_max
        # autorefresh keeps at most 1024 entries instead of counting bytes
        self._memory_left = in_memory_total if not self._autorefresh else float("inf")
        self._block_size = block_size
        self._roots = _validate_mounts(mounts)  # [(prefix, real folder)], longest prefix first
        self._codings_cache: dict[str | None, tuple[str | None, ...]] = {}
        self._index: dict[str, _File] = {}
        self._live: dict[str, _File] = {}
        if self._autorefresh:
            self._lookup: Callable[[str], _File | None] = self._find_on_disk
        else:
            self._build_index()
            self._lookup = self._index.get

    # -- the request path ------------------------------------------------------------

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes] | None:
        """Answer the request from the index, or return ``None`` to let the app answer."""
        method = environ.get("REQUEST_METHOD")
        if method != "GET" and method != "HEAD":
            return None
        path = environ.get("PATH_INFO", "")
        file = self._lookup(path)
        if file is None:
            return None
        if file.fresh_until <= _monotonic():  # streamed, or due for its periodic check
            file = self._fresh(path, file)
            if file is None:
                return None
        if file.variants is not None:
            file = self._negotiate(file, environ.get("HTTP_ACCEPT_ENCODING"))
        if (  # spelled out: five dict probes cost half of one keys().isdisjoint()
            "HTTP_IF_NONE_MATCH" in environ
            or "HTTP_IF_MODIFIED_SINCE" in environ
            or "HTTP_RANGE" in environ
            or "HTTP_IF_MATCH" in environ
            or "HTTP_IF_UNMODIFIED_SINCE" in environ
        ):
            return self._conditional(file, environ, start_response, method)
        body = file.body
        if body is not None:  # the common case, kept inline: a small file from memory
            start_response("200 OK", list(file.headers))
            return [body] if method == "GET" else []
        return self._full(file, environ, start_response, method)

    def __len__(self) -> int:
        """Number of URLs in the index (0 in autorefresh mode)."""
        return len(self._index)

    def __contains__(self, path: object) -> bool:
        """Whether ``path`` (a ``PATH_INFO``) would be served."""
        return isinstance(path, str) and self._lookup(path) is not None

    def _negotiate(self, file: _File, accept: str | None) -> _File:
        """The representation the client prefers among the plain file and its siblings."""
        if not accept:
            return file
        order = self._codings_cache.get(accept)
        if order is None:
            order = _coding_order(accept)
            if len(self._codings_cache) >= 256:  # a bound against hostile header variety
                self._codings_cache.clear()
            self._codings_cache[accept] = order
        variants = file.variants or {}
        for coding in order:
            if coding is None:
                return file
            variant = variants.get(coding)
            if variant is not None:
                return variant
        return file  # nothing acceptable: RFC 9110 section 12.5.3 allows the plain file

    def _conditional(
        self, file: _File, environ: WSGIEnvironment, start_response: StartResponse, method: str
    ) -> Iterable[bytes] | None:
        """The slow path: preconditions in RFC 9110 section 13.2.2 order, then ``Range``."""
        if_match = environ.get("HTTP_IF_MATCH")
        if if_match is not None:
            tags = parse_etags(if_match)
            failed = not (tags.star_tag or tags.is_strong(file.etag))
        else:
            since = parse_date(environ.get("HTTP_IF_UNMODIFIED_SINCE"))
            failed = since is not None and file.mtime_s > since.timestamp()
        if failed:
            headers = [("Content-Length", "0")]
            if file.vary:
                headers.append(("Vary", "Accept-Encoding"))
            start_response("412 Precondition Failed", headers)
            return []
        if_none_match = environ.get("HTTP_IF_NONE_MATCH")
        if if_none_match is not None:
            if parse_etags(if_none_match).contains_weak(file.etag):
                start_response("304 Not Modified", list(file.not_modified))
                return []
        else:
            since = parse_date(environ.get("HTTP_IF_MODIFIED_SINCE"))
            if since is not None and file.mtime_s <= since.timestamp():
                start_response("304 Not Modified", list(file.not_modified))
                return []
        range_header = environ.get("HTTP_RANGE")
        if range_header is not None and method == "GET" and file.size > 0:
            if_range = environ.get("HTTP_IF_RANGE")
            if if_range is None or _if_range_matches(file, if_range):
                span = _byte_range(range_header, file.size)
                if span is False:
                    if self._unsatisfiable_to_app:
                        return None  # the app's error handler answers a 416 in Flask
                    headers = [("Content-Range", f"bytes */{file.size}"), ("Content-Length", "0")]
                    if file.vary:
                        headers.append(("Vary", "Accept-Encoding"))
                    start_response("416 Range Not Satisfiable", headers)
                    return []
                if span is not None:
                    return self._partial(file, environ, start_response, *span)
        return self._full(file, environ, start_response, method)

    def _full(
        self, file: _File, environ: WSGIEnvironment, start_response: StartResponse, method: str
    ) -> Iterable[bytes] | None:
        """The whole representation: from memory, or streamed with the server's
        ``wsgi.file_wrapper`` (sendfile) when offered; ``None`` if the file changed."""
        if file.body is not None or method == "HEAD":
            start_response("200 OK", list(file.headers))
            return [file.body] if method == "GET" else []  # type: ignore[list-item]
        handle = _open_unchanged(file)
        if handle is None:
            return None
        try:
            start_response("200 OK", list(file.headers))
            wrapper = environ.get("wsgi.file_wrapper")
            if wrapper is not None:
                return wrapper(handle, self._block_size)  # type: ignore[no-any-return]
            return _FileSlice(handle, 0, file.size, self._block_size)
        except BaseException:
            handle.close()
            raise

    def _partial(
        self,
        file: _File,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        start: int,
        stop: int,
    ) -> Iterable[bytes] | None:
        headers = [
            *file.base_headers,
            ("Content-Range", f"bytes {start}-{stop - 1}/{file.size}"),
            ("Content-Length", str(stop - start)),
        ]
        if file.body is not None:
            start_response("206 Partial Content", headers)
            return [file.body[start:stop]]
        handle = _open_unchanged(file)
        if handle is None:
            return None
        try:
            body = _FileSlice(handle, start, stop - start, self._block_size)
            start_response("206 Partial Content", headers)
            return body
        except BaseException:
            handle.close()
            raise

    # -- building the index -------------------------------------------------------------

    def _build_index(self) -> None:
        """Walk every folder once; the longer prefix owns its subtree."""
        claimed: list[str] = []
        with self._app_context():
            for prefix, root in self._roots:
                nested = tuple(p for p in claimed if p.startswith(prefix))
                claimed.append(prefix)
                if not os.path.isdir(root):
                    # Flask's default "static" folder often does not exist; nothing to serve.
                    log.debug("static folder %s for %s does not exist; not indexed", root, prefix)
                    continue
                found = dict(_walk(root, self._allow_dotfiles))
                for rel, (path, st) in found.items():
                    url = prefix + rel
                    key = _wsgi_path(url)
                    if key is None or (nested and url.startswith(nested)):
                        continue
                    if self._routed is not None and not self._routed(url):
                        continue
                    siblings = {
                        coding: found[rel + suffix] for coding, suffix in _CODINGS if rel + suffix in found
                    }
                    file = self._make(prefix, rel, path, st, siblings)
                    if file is not None:
                        file.source = (prefix, root, rel)
                        self._index[key] = file
        in_memory = sum(len(f.body) for f in self._index.values() if f.body is not None)
        log.debug(
            "static index: %d files under %d mounts, %d bytes kept in memory",
            len(self._index),
            len(self._roots),
            in_memory,
        )

    def _make(
        self,
        prefix: str,
        rel: str,
        path: str,
        st: os.stat_result,
        siblings: Mapping[str, tuple[str, os.stat_result]],
    ) -> _File | None:
        """The entry for one URL: the plain file plus one entry per precompressed sibling."""
        name = rel.rsplit("/", 1)[-1]
        mimetype, own_coding = mimetypes.guess_type(name)
        content_type = get_content_type(mimetype or "application/octet-stream", "utf-8")
        declared = self._declared_immutable(prefix + rel, name)
        loaded = self._read(path, () if declared else fingerprints.candidates(name))
        if loaded is None:
            return None
        file_st, etag, body, verified = loaded
        cache_control = self._cache_control(prefix, rel, declared or verified)
        vary = bool(siblings)
        file = _File(path, file_st, etag, body, content_type, own_coding, cache_control, vary)
        signature: list[Any] = [_stat_key(st)]
        if siblings:
            file.variants = {}
            for coding, (sibling_path, sibling_st) in siblings.items():
                sibling = self._read(sibling_path, ())
                if sibling is not None:
                    sibling_file_st, sibling_etag, sibling_body, _ = sibling
                    file.variants[coding] = _File(
                        sibling_path,
                        sibling_file_st,
                        sibling_etag,
                        sibling_body,
                        content_type,
                        coding,
                        cache_control,
                        vary,
                    )
                    signature.append((coding, _stat_key(sibling_st)))
            if not file.variants:
                file.variants = None
        file.signature = tuple(signature)
        if _in_memory(file):
            file.fresh_until = _monotonic() + self._recheck_interval
        return file

    def _read(
        self, path: str, fingerprint_candidates: tuple[str, ...]
    ) -> tuple[os.stat_result, str, bytes | None, bool] | None:
        """Read (or hash) one file through a single handle, so size, tag and body agree.

        Returns ``(stat, etag, body or None, fingerprint verified)``; the
        fingerprint is checked only for names that have ``fingerprint_candidates``.
        """
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            return None
        digests = fingerprints.Digests(fingerprint_candidates) if fingerprint_candidates else None
        with open(fd, "rb", buffering=0) as handle:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            body = None
            if st.st_size <= self._in_memory_max:
                body = handle.readall()
                st = os.fstat(fd)
                if len(body) != st.st_size:
                    return None  # being written right now; Flask will serve it
                etag = hashlib.blake2b(body, digest_size=16).hexdigest()
                if digests is not None:
                    digests.update(body)
                if len(body) > self._memory_left:
                    body = None
                else:
                    self._memory_left -= len(body)
            elif st.st_size <= _HASH_LIMIT:
                digest = hashlib.blake2b(digest_size=16)
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                    if digests is not None:
                        digests.update(block)
                etag = digest.hexdigest()
            else:
                etag = f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
                digests = None  # not read: never verified
        return st, etag, body, digests is not None and digests.verified()

    def _declared_immutable(self, url: str, name: str) -> bool:
        """The owner says this name is fingerprinted: by pattern or by manifest."""
        if self._immutable is not None and self._immutable.search(name):
            return True
        return fingerprints.listed_in(self._manifest, url)

    def _cache_control(self, prefix: str, rel: str, immutable: bool) -> str:
        if immutable:
            return _IMMUTABLE_CACHE_CONTROL
        of_mount = self._max_age_for.get(prefix)
        if of_mount is not None:
            max_age = of_mount(rel)
        elif self._app is not None:
            max_age = self._app.get_send_file_max_age(rel)
        else:
            max_age = self._max_age
        if max_age is None:
            return "no-cache"
        if max_age > 0:
            return f"public, max-age={max_age}"
        return f"no-cache, max-age={max_age}"

    def _app_context(self) -> Any:
        """``get_send_file_max_age`` reads ``current_app.config``."""
        return contextlib.nullcontext() if self._app is None else self._app.app_context()

    # -- every answer reflects the file as it is ------------------------------------------

    def _fresh(self, path: str, file: _File) -> _File | None:
        """``file`` if it is unchanged on disk, its re-read entry if it changed, ``None`` if gone.

        Streamed files come here on every request, in-memory ones once per
        ``recheck_interval``: a stat of the file and of each sibling.
        """
        if _unchanged(file):
            if _in_memory(file):
                file.fresh_until = _monotonic() + self._recheck_interval
            return file
        return self._reload(path, file)

    def _reload(self, path: str, old: _File) -> _File | None:
        """Re-read a changed file into the index; ``None`` (Flask answers) when it is gone,
        or while another thread is already re-reading it."""
        if old.source is None or not self._reloading.acquire(blocking=False):
            return None
        try:
            current = self._index.get(path)
            if current is not None and current is not old:
                return current if _unchanged(current) else None  # another thread's fresh copy
            prefix, root, rel = old.source
            held = _memory_of(old)
            self._memory_left += held
            found = _stat_group(root, rel, self._allow_dotfiles)
            new = None
            if found is not None:
                real, st, siblings = found
                with self._app_context():
                    new = self._make(prefix, rel, real, st, siblings)
            if new is None:
                self._memory_left -= held  # the old entry stays, answered by Flask until it is back
                old.fresh_until = 0.0
                return None
            new.source = old.source
            self._index[path] = new
            log.debug("static file %s changed on disk; re-read", path)
            return new
        finally:
            self._reloading.release()

    # -- autorefresh -----------------------------------------------------------------

    def _find_on_disk(self, path: str) -> _File | None:
        """Development lookup: the same checks the walk applies, done per request."""
        text = _text_path(path)
        if text is None:
            return None
        for mount in self._roots:
            if text.startswith(mount[0]):
                break
        else:
            return None
        prefix, root = mount
        rel = text[len(prefix) :]
        if not _safe_relative(rel, self._allow_dotfiles):
            return None
        if self._routed is not None and not self._routed(text):
            return None
        found = _stat_group(root, rel, self._allow_dotfiles)
        if found is None:
            return None
        real, st, siblings = found
        signature = (_stat_key(st), *((coding, _stat_key(s)) for coding, (_, s) in siblings.items()))
        cached = self._live.get(path)
        if cached is not None and cached.signature == signature:
            return cached
        with self._app_context():
            file = self._make(prefix, rel, real, st, siblings)
        if file is not None:
            file.fresh_until = float("inf")  # looked up on disk on every request already
            if len(self._live) >= 1024:
                self._live.clear()
            self._live[path] = file
        return file


# -- helpers ----------------------------------------------------------------------------


def _compile_pattern(pattern: Any) -> re.Pattern[str] | None:
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except (re.error, TypeError):
        raise ConfigError("immutable_pattern", pattern, "a regular expression or None") from None


def _validate_mounts(mounts: Mapping[str, Any]) -> list[tuple[str, str]]:
    roots = []
    for prefix, folder in mounts.items():
        if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.endswith("/"):
            raise ConfigError("static_dirs", prefix, "a URL prefix that starts and ends with '/'")
        if prefix != "/" and not _safe_relative(prefix[1:-1], True):
            raise ConfigError("static_dirs", prefix, "a URL prefix without '.', '..' or empty segments")
        try:
            root = os.path.realpath(os.fspath(folder))
        except TypeError:
            raise ConfigError("static_dirs", folder, "a folder path") from None
        roots.append((prefix, root))
    roots.sort(key=lambda item: len(item[0]), reverse=True)
    return roots


def _safe_relative(rel: str, allow_dotfiles: bool) -> bool:
    """A relative URL path made of plain names: no empty, ``.``/``..`` or (unless allowed) dot names."""
    if not rel or "\\" in rel or "\x00" in rel:
        return False
    for segment in rel.split("/"):
        if not segment or segment == "." or segment == "..":
            return False
        if segment[0] == "." and not allow_dotfiles:
            return False
    return True


def _contained(root: str, candidate: str, allow_dotfiles: bool) -> str | None:
    """The real path of ``candidate`` if it lies strictly inside ``root`` (a real path)."""
    real = os.path.realpath(candidate)
    try:
        if real == root or os.path.commonpath([root, real]) != root:
            return None
    except ValueError:
        return None
    if not allow_dotfiles:
        for part in os.path.relpath(real, root).split(os.sep):
            if part.startswith("."):
                return None
    return real


def _walk(root: str, allow_dotfiles: bool) -> Iterator[tuple[str, tuple[str, os.stat_result]]]:
    """Yield ``(relative URL path, (real path, stat))`` for each regular file under ``root``.

    Symlinks are followed only when their real target stays inside ``root``.
    A folder reached again below itself (a symlink loop) is not entered; two
    names for one folder are both walked, as Flask would serve both.
    """
    try:
        root_st = os.stat(root)
    except OSError:
        return
    stack = [(root, "", frozenset({(root_st.st_dev, root_st.st_ino)}))]
    while stack:
        directory, rel_dir, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if (name.startswith(".") and not allow_dotfiles) or "\\" in name:
                continue
            path = entry.path
            try:
                if entry.is_symlink():
                    real = _contained(root, path, allow_dotfiles)
                    if real is None:
                        continue
                    path = real
                st = os.stat(path)
            except OSError:
                continue
            rel = rel_dir + name
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in ancestors:
                    stack.append((path, rel + "/", ancestors | {key}))
            elif stat.S_ISREG(st.st_mode):
                yield rel, (path, st)


def _wsgi_path(text: str) -> str | None:
    """A text path as servers put it in ``PATH_INFO`` (UTF-8 bytes as latin-1).

    ``None`` for a file name that is not valid UTF-8: Flask's router could not
    reach it either, so it is left out of the index.
    """
    try:
        return text.encode("utf-8").decode("latin-1")
    except UnicodeEncodeError:
        return None


def _text_path(path: str) -> str | None:
    """``PATH_INFO`` as text, or ``None`` when it is not UTF-8 (never a file we index)."""
    try:
        return path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's content without reading it. ``ctime`` is in it because
    tools that keep size and ``mtime`` (``rsync -t``, ``cp -p``, ``touch -r``) cannot
    set it: any write moves it."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _unchanged(file: _File) -> bool:
    """Whether the file and each precompressed sibling are still what the entry was read from."""
    try:
        if _stat_key(os.stat(file.path)) != file.key:
            return False
        if file.variants is not None:
            for variant in file.variants.values():
                if _stat_key(os.stat(variant.path)) != variant.key:
                    return False
    except OSError:
        return False
    return True


def _in_memory(file: _File) -> bool:
    """Every representation is answered from memory: then a periodic check is enough."""
    if file.body is None:
        return False
    return file.variants is None or all(v.body is not None for v in file.variants.values())


def _memory_of(file: _File) -> int:
    held = len(file.body) if file.body is not None else 0
    for variant in (file.variants or {}).values():
        held += len(variant.body) if variant.body is not None else 0
    return held


def _stat_group(
    root: str, rel: str, allow_dotfiles: bool
) -> tuple[str, os.stat_result, dict[str, tuple[str, os.stat_result]]] | None:
    """The real path and stat of ``rel`` under ``root`` and of its ``.br``/``.gz`` siblings,
    with the containment rules of the walk; ``None`` when it is not a regular file inside."""
    real = _contained(root, os.path.join(root, rel), allow_dotfiles)
    if real is None:
        return None
    try:
        st = os.stat(real)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    siblings: dict[str, tuple[str, os.stat_result]] = {}
    for coding, suffix in _CODINGS:
        sibling = _contained(root, os.path.join(root, rel + suffix), allow_dotfiles)
        if sibling is None:
            continue
        try:
            sibling_st = os.stat(sibling)
        except OSError:
            continue
        if stat.S_ISREG(sibling_st.st_mode):
            siblings[coding] = (sibling, sibling_st)
    return real, st, siblings


def _open_unchanged(file: _File) -> Any:
    """Open the file for streaming, or ``None`` if it changed since it was indexed."""
    try:
        fd = os.open(file.path, _OPEN_FLAGS)
    except OSError:
        return None
    handle = open(fd, "rb", buffering=0)
    try:
        st = os.fstat(fd)
    except OSError:
        handle.close()
        return None
    if _stat_key(st) != file.key:
        handle.close()
        return None
    return handle


def _coding_order(accept: str) -> tuple[str | None, ...]:
    """Codings the client accepts, best first; ``None`` is the plain file.

    Explicit entries beat ``*``; ``q=0`` excludes. The plain file is
    acceptable unless ``identity`` or ``*`` says ``q=0`` (RFC 9110 section
    12.5.3); when neither names it, it ranks below every coding the client
    did list, whatever their q-values.
    """
    quality: dict[str, float] = {}
    for value, q in parse_accept_header(accept):
        quality.setdefault(value.strip().lower(), q)
    star = quality.get("*")

    def q_of(*names: str) -> float:
        for name in names:
            if name in quality:
                return quality[name]
        return star if star is not None else 0.0

    identity = quality.get("identity", star if star is not None else _UNLISTED)
    ranked = [
        (q_of("br"), 0, "br"),
        (q_of("gzip", "x-gzip"), 1, "gzip"),
        (identity, 2, None),
    ]
    ranked.sort(key=lambda item: (-item[0], item[1]))
    return tuple(coding for q, _, coding in ranked if q > 0)


def _if_range_matches(file: _File, value: str) -> bool:
    """Strong comparison: an unquoted-equal strong tag, or exactly the Last-Modified date."""
    if value.lstrip().startswith("W/"):
        return False
    if_range = parse_if_range_header(value)
    if if_range.date is not None:
        return int(if_range.date.timestamp()) == file.mtime_s
    return if_range.etag == file.etag


def _byte_range(header: str, size: int) -> tuple[int, int] | Literal[False] | None:
    """``(start, stop)`` for one satisfiable range; ``None`` to ignore; ``False`` for 416."""
    unit, _, spec = header.partition("=")
    if unit.strip(" \t").lower() != "bytes":
        return None  # RFC 9110 section 14.2: an unknown unit MUST be ignored
    if "," in spec:
        return None  # several ranges: answered with the whole file
    suffix = spec.strip(" \t")
    if suffix.startswith("-") and suffix[1:].isdigit() and int(suffix[1:]) == 0:
        return False  # the last 0 bytes: unsatisfiable (Werkzeug < 3.1.9 parses it as 0-)
    parsed = parse_range_header(header)
    if parsed is None or len(parsed.ranges) != 1:
        return False
    start, stop = parsed.ranges[0]
    if stop is None:
        if start < 0:  # suffix: the last -start bytes, or all of a shorter file
            return max(size + start, 0), size
        stop = size
    if start >= size:
        return False
    return start, min(stop, size)
