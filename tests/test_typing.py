"""The package ships ``py.typed``, so its annotations are a promise: mypy must pass.

mypy runs the way a contributor runs it -- ``python -m mypy -p identity_middleware`` from
the repository root, with the ``[mypy]`` settings in setup.cfg -- in a subprocess, so
its import machinery never touches this process. ``-p`` checks the package Python
would import: the checkout's, or, in CI's run from the unpacked sdist (which has no
package folder), the installed wheel -- so the wheel's ``py.typed`` is checked too. Its cache goes to a temporary
directory, which keeps the checkout clean (a cold run takes a few seconds).

Without mypy installed the tests skip with a reason; in CI (``CI=true``) they fail,
as a skipped type check would let the promise break unnoticed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory) -> Path:
    """One cache for both runs: the second reuses the analysis of the package and stdlib."""
    if importlib.util.find_spec("mypy") is None:
        unavailable("mypy is not installed (it is in the test extra: pip install -e '.[test]')")
    return tmp_path_factory.mktemp("mypy_cache")


def _mypy(cache: Path, *targets: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def test_package_type_checks_clean(mypy_cache):
    returncode, output = _mypy(mypy_cache, "-p", "identity_middleware")
    assert returncode == 0, output
    assert "Success" in output, output


def test_mypy_settings_still_report_errors(mypy_cache, tmp_path):
    """The clean run means something: the same settings catch a misuse of the public API."""
    misuse = tmp_path / "misuse.py"
    misuse.write_text(
        "from identity_middleware import UserCache\n"
        "\n"
        "UserCache(ttl='ten minutes')\n"
        "UserCache().invalidate_all(1)\n"
    )
    returncode, output = _mypy(mypy_cache, str(misuse))
    assert returncode == 1, output
    assert "misuse.py:3: error:" in output and '"ttl"' in output, output
    assert "misuse.py:4: error:" in output, output
