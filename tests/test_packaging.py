"""The release is what setup.cfg and MANIFEST.in promise.

CI builds the sdist and the wheel and runs this suite from the unpacked sdist
against the lowest versions ``install_requires`` allows (``.ci/run``); these tests
keep the promises that run relies on checkable on any checkout: the sdist carries
every file the tests need, each runtime requirement has a floor CI can install,
the metadata matches LICENSE and CHANGELOG, and deprecations raised from inside
the package fail the suite.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import runpy
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return parser


def _manifest_rules() -> list[tuple[str, str, list[str]]]:
    rules = []
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "recursive-include":
            rules.append(("recursive", words[1], words[2:]))
        elif words[0] == "include":
            rules.append(("include", "", words[1:]))
    return rules


def _in_manifest(relative: str, rules) -> bool:
    for kind, folder, patterns in rules:
        if kind == "include" and any(fnmatch.fnmatch(relative, p) for p in patterns):
            return True
        if kind == "recursive" and relative.startswith(folder + "/"):
            if any(fnmatch.fnmatch(os.path.basename(relative), p) for p in patterns):
                return True
    return False


@pytest.mark.parametrize("folder", ["tests", "examples", "benchmarks"])
def test_the_sdist_carries_every_file_the_tests_use(folder):
    rules = _manifest_rules()
    skipped = {"__pycache__", ".test-downloads", ".hypothesis", ".pytest_cache"}
    missing = []
    for path in (ROOT / folder).rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_dir() or skipped & set(path.relative_to(ROOT).parts) or path.suffix in (".pyc", ".db"):
            continue
        if not _in_manifest(relative, rules):
            missing.append(relative)
    assert missing == [], "add these to MANIFEST.in: the suite runs from the sdist in CI"


def test_the_sdist_carries_what_the_readme_and_ci_tests_read():
    rules = _manifest_rules()
    for relative in ("README.md", "LICENSE", "CHANGELOG.md", "setup.cfg", "pyproject.toml", ".ci/run"):
        assert _in_manifest(relative, rules), relative


def test_every_runtime_requirement_has_a_floor_ci_installs():
    constraints = runpy.run_path(str(ROOT / ".ci" / "lowest_constraints.py"))["constraints"]
    pins = dict(line.split("==") for line in constraints(ROOT / "setup.cfg"))
    required = setup_cfg().get("options", "install_requires").split()
    for requirement in required:
        name, _, floor = requirement.partition(">=")
        assert pins[name] == floor, requirement
    assert pins["redis"] == "5.0.2"  # the first release with deregister_connect_callback


def test_the_installed_redis_py_has_what_a_reconnect_uses():
    """The floor is redis 5.0.2: 5.0.1 has only private callbacks, 5.0.0 cannot remove one."""
    connection = pytest.importorskip("redis.connection")
    assert callable(getattr(connection.AbstractConnection, "deregister_connect_callback", None))
    assert callable(getattr(connection.AbstractConnection, "register_connect_callback", None))


def test_dev_tools_that_can_turn_ci_red_are_pinned():
    test_extra = setup_cfg().get("options.extras_require", "test").split()
    assert any(line.startswith("mypy==") for line in test_extra), test_extra


def test_benchmark_only_packages_live_in_the_bench_extra():
    extras = setup_cfg()["options.extras_require"]
    bench, test = extras["bench"].lower(), extras["test"].lower()
    for package in ("whitenoise", "flask-caching"):
        assert package in bench and package not in test


def test_license_file_and_metadata_agree():
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert setup_cfg().get("metadata", "license") == "BSD-3-Clause"


def test_the_changelog_has_an_entry_for_this_version():
    version = setup_cfg().get("metadata", "version")
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_flask_commands_entry_point_names_the_identity_group():
    from identity_middleware import cli

    declared = setup_cfg().get("options.entry_points", "flask.commands").split()
    assert declared == ["identity", "=", "identity_middleware.cli:identity"]
    assert cli.identity.name == "identity"


def test_a_deprecation_raised_from_inside_the_package_fails_the_suite():
    inside = {"__name__": "identity_middleware.flask_hooks", "warnings": warnings}
    exec(compile("def use():\n    warnings.warn('going away', DeprecationWarning)\n", "hooks", "exec"), inside)
    with pytest.raises(DeprecationWarning):
        inside["use"]()
    outside = {"__name__": "some_other_library", "warnings": warnings}
    exec(compile("def use():\n    warnings.warn('going away', DeprecationWarning)\n", "other", "exec"), outside)
    with pytest.warns(DeprecationWarning):
        outside["use"]()  # a warning, not an error: not ours to fix


def test_a_missing_bench_package_names_the_extra_to_install():
    from benchmarks.__main__ import missing_extra_hint

    hint = missing_extra_hint(ModuleNotFoundError("No module named 'whitenoise'", name="whitenoise"))
    assert hint == "needs whitenoise, which is not installed: pip install -e '.[bench]'"
    assert missing_extra_hint(ModuleNotFoundError("x", name="not_a_bench_package")) is None
