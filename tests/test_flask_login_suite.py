"""Flask-Login's own test suite passes with identity_middleware installed.

Design invariant 5: dynamic requests behave exactly as without the middleware.
We do not restate Flask-Login's behaviour in our own words; we fetch the suite
its maintainers ship in the sdist of the installed version and run it twice in a
subprocess, with ``tests/compat/identity_compat_plugin.py`` loaded:

* ``middleware``: every Flask app the suite creates is wrapped in
  ``IdentityMiddleware`` the moment it is constructed;
* ``cache``: additionally every ``user_loader`` is put behind a ``UserCache``.

Both runs list ``/static/`` as a static path, so the suite's own static tests
("a static request stays anonymous and does not touch the session") go through
the middleware's static branch.

The sdist is downloaded once with pip (so the machine's index settings and
certificates apply) and the extracted ``tests/`` folder is kept in
``.test-downloads/`` at the top of the checkout (git-ignored; nothing is written
to the home directory). Without network the test skips, except in CI where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import unavailable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COMPAT = HERE / "compat"
FLASK_LOGIN_VERSION = version("Flask-Login")
MIN_TESTS = 50
#: Git-ignored; a fresh clone (or an unpacked sdist) downloads once into its own copy.
DOWNLOADS = REPO / ".test-downloads"


def _cache_root() -> Path:
    """Where the downloaded suite is kept: inside the checkout, never in the user's home.

    ``IDENTITY_COMPAT_CACHE_DIR`` overrides it; a read-only checkout falls back to
    the temporary directory.
    """
    configured = os.environ.get("IDENTITY_COMPAT_CACHE_DIR")
    root = Path(configured) if configured else DOWNLOADS
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        return Path(tempfile.gettempdir()) / "identity_middleware-test-downloads"


def _extract_tests(sdist: Path, target: Path) -> None:
    """Extract only ``<root>/tests/*`` regular files, refusing anything that could escape."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1] != "tests" or not member.isfile():
                continue
            if ".." in parts or member.name.startswith("/"):
                raise RuntimeError(f"refusing suspicious path in {sdist.name}: {member.name!r}")
            destination = target.joinpath(*parts[1:])
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, open(destination, "wb") as fh:
                shutil.copyfileobj(source, fh)


@pytest.fixture(scope="module")
def suite_dir() -> Path:
    """Flask-Login's ``tests/`` for the installed version, downloaded once."""
    final = _cache_root() / f"flask-login-{FLASK_LOGIN_VERSION}"
    if (final / "tests" / "test_login.py").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-cache-dir",
             f"Flask-Login=={FLASK_LOGIN_VERSION}", "--dest", tmp, "--quiet"],
            capture_output=True, text=True, timeout=180,
        )
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if download.returncode != 0 or not sdists:
            unavailable(f"cannot download the Flask-Login {FLASK_LOGIN_VERSION} sdist: "
                        f"{download.stderr.strip().splitlines()[-1:] or download.returncode}")
        staged = Path(tmp) / "staged"
        _extract_tests(sdists[0], staged)
        (staged / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
        try:
            staged.rename(final)  # atomic: a concurrent run either sees all of it or none
        except OSError:
            if not (final / "tests" / "test_login.py").is_file():
                raise
    return final


def _run_suite(suite: Path, mode: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
    report_path = tmp_path / f"{mode}-report.json"
    junit_path = tmp_path / f"{mode}-junit.xml"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COMPAT), str(REPO), env.get("PYTHONPATH")]))
    env["IDENTITY_COMPAT_MODE"] = mode
    # The suite's apps have no static folder; listing /static/ sends its StaticTestCase
    # requests through the middleware's static branch (Flask would 404 them either way).
    env["IDENTITY_STATIC_PATHS"] = "/static/"
    env["IDENTITY_COMPAT_REPORT"] = str(report_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "identity_compat_plugin", "-p", "no:cacheprovider",
         "-c", str(suite / "pytest.ini"), "--rootdir", str(suite), f"--junitxml={junit_path}",
         str(suite / "tests")],
        cwd=suite, env=env, capture_output=True, text=True, timeout=300,
    )
    plugin_report = json.loads(report_path.read_text()) if report_path.exists() else {}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit_path.exists():
        for suite_node in ET.parse(junit_path).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite_node.get(key, 0))
    return result, plugin_report, counts


def _assert_wrapped_run_passes(suite: Path, mode: str, tmp_path: Path) -> dict:
    """Run the suite in ``mode``: every test passed, and the plugin did wrap it; the report."""
    result, report, counts = _run_suite(suite, mode, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert counts["tests"] - counts["skipped"] > MIN_TESTS, counts
    assert counts["failures"] == counts["errors"] == 0, counts
    # The plugin really wrapped the suite's apps (not an inert run of the plain suite),
    # and the suite's static tests went through the static branch.
    assert report["apps_wrapped"] > MIN_TESTS, report
    assert report["static_requests"] >= 2, report
    return report


def test_flask_login_suite_passes_with_the_middleware_around_every_app(suite_dir, tmp_path):
    _assert_wrapped_run_passes(suite_dir, "middleware", tmp_path)


def test_flask_login_suite_passes_with_a_user_cache_around_every_loader(suite_dir, tmp_path):
    report = _assert_wrapped_run_passes(suite_dir, "cache", tmp_path)
    assert report["loaders_cached"] > 10, report
    # Requests were answered from the cache, so the suite exercised hits, not only loads.
    assert report["cache_stats"]["hits"] > 0, report
    assert report["cache_stats"]["loads"] > 0, report
