"""Which static files may be cached as ``immutable`` for a year.

``Cache-Control: immutable`` tells browsers never to ask again. That is right
for a fingerprinted name -- one that changes whenever the content does -- and
wrong for any other: ``logo-deadbeef.svg`` edited in place would stay stale in
every browser that saw it, and nothing on the server can take it back. A name
that merely *looks* hashed proves nothing, so serve mode marks a file
immutable only when it is certain:

* **Verified:** a run of 8 or more hex digits in the name (bounded by
  non-alphanumerics, as in ``app.3f2a9c1b.css``, ``app-3f2a9c1b.css``,
  ``app_3f2a9c1b.css``) is the beginning of the hex digest of the file's own
  content under one of the algorithms bundlers use and ``hashlib`` offers --
  MD5 (Django's ``ManifestStaticFilesStorage``, webassets), SHA-1, SHA-2
  (Sprockets uses SHA-256), SHA-3, BLAKE2, and MD4 (webpack) where OpenSSL
  still provides it. The check runs on the bytes the index holds, at startup
  and whenever the file changes, so an edited file loses the mark at once.
  Hashes hashlib cannot compute (xxhash in webpack 5, Rollup/Vite and Parcel)
  and non-hex encodings are not guessed: declare those names.
* **Declared:** the owner's ``immutable_pattern`` (a regular expression
  searched in the file name) or ``immutable_manifest`` (a bundler's manifest:
  the names it lists are fingerprinted by construction).

Manifests understood (anything else is a :class:`ConfigError` at startup):
a JSON list of names; an object mapping names to fingerprinted names
(webpack-manifest-plugin, gulp-rev); Django's ``staticfiles.json``
(``{"paths": {...}}``); Sprockets' ``{"assets": {...}}``; Vite's
``manifest.json`` (objects with ``file``, ``css`` and ``assets``). A listed
name matches a served URL that ends with ``/`` + the name (leading ``/`` and
``./`` ignored), so entries relative to any output folder work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterable

from .config import ConfigError

__all__ = ["FINGERPRINT_SEGMENT", "candidates", "Digests", "load_manifests"]

#: A candidate fingerprint: 8+ lowercase hex digits not glued to other letters or digits.
FINGERPRINT_SEGMENT = re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{8,}(?![0-9A-Za-z])")

_ALGORITHMS = (
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sha3_224",
    "sha3_256",
    "sha3_384",
    "sha3_512",
    "blake2b",
    "blake2s",
)


def _available() -> tuple[str, ...]:
    found = list(_ALGORITHMS)
    try:
        hashlib.new("md4")
    except ValueError:  # OpenSSL 3 without the legacy provider
        pass
    else:
        found.append("md4")
    return tuple(found)


ALGORITHMS = _available()


def candidates(name: str) -> tuple[str, ...]:
    """The hex runs in a file name that could be a fingerprint."""
    return tuple(FINGERPRINT_SEGMENT.findall(name))


class Digests:
    """Every algorithm's digest of one file, fed block by block while the index reads it.

    Created only for names with :func:`candidates`, so an ordinary file is
    hashed once (its ETag), not a dozen times.
    """

    __slots__ = ("_hashers", "_wanted")

    def __init__(self, wanted: Iterable[str]) -> None:
        self._wanted = tuple(wanted)
        self._hashers = [hashlib.new(name) for name in ALGORITHMS]

    def update(self, data: bytes) -> None:
        for hasher in self._hashers:
            hasher.update(data)

    def verified(self) -> bool:
        """True when some candidate is the beginning of some digest of the content."""
        digests = [hasher.hexdigest() for hasher in self._hashers]
        return any(digest.startswith(wanted) for wanted in self._wanted for digest in digests)


def load_manifests(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None) -> frozenset[str]:
    """The fingerprinted names listed in the owner's manifest file(s), normalised."""
    if paths is None:
        return frozenset()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    names: set[str] = set()
    for path in paths:
        try:
            with open(os.fspath(path), "rb") as handle:
                data = json.load(handle)
        except (OSError, TypeError, ValueError) as exc:
            raise ConfigError(
                "immutable_manifest", path, f"a readable JSON manifest file ({exc.__class__.__name__})"
            ) from None
        listed = _names_in(data)
        if listed is None:
            raise ConfigError("immutable_manifest", path, _MANIFEST_EXPECTED)
        names.update(_normalise(name) for name in listed if _normalise(name))
    return frozenset(names)


_MANIFEST_EXPECTED = (
    "a JSON list of names, an object of names to fingerprinted names (webpack, gulp-rev), "
    "Django's {'paths': {...}}, Sprockets' {'assets': {...}} or Vite's manifest"
)


def _names_in(data: Any) -> list[str] | None:
    if isinstance(data, list):
        return data if all(isinstance(item, str) for item in data) else None
    if not isinstance(data, dict):
        return None
    for key in ("paths", "assets"):  # Django, Sprockets: the values are the fingerprinted names
        inner = data.get(key)
        if isinstance(inner, dict) and all(isinstance(v, str) for v in inner.values()):
            return list(inner.values())
    if all(isinstance(v, str) for v in data.values()):
        return list(data.values())
    if all(isinstance(v, dict) and isinstance(v.get("file"), str) for v in data.values()):  # Vite
        found: list[str] = []
        for chunk in data.values():
            found.append(chunk["file"])
            for key in ("css", "assets"):
                items = chunk.get(key, [])
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    return None
                found.extend(items)
        return found
    return None


def _normalise(name: str) -> str:
    while name.startswith(("/", "./")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name


def listed_in(names: frozenset[str], url: str) -> bool:
    """Whether the text ``url`` is one of the manifest ``names``: it ends with ``/`` + a name."""
    if not names:
        return False
    parts = url.split("/")
    return any("/".join(parts[i:]) in names for i in range(1, len(parts)))
