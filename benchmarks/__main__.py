"""``python -m benchmarks [--quick]``: every benchmark in one process, one markdown table.

Runs each benchmark module that exists (``static_skip``, ``cache_hit``,
``sqlalchemy_hit``, ``redis_versions``, ``serve_static``, ``dynamic``), in that order, and
prints one table of times and ratios against the anchors each module measured
side by side -- naive Login + Principal app, ``Principal(skip_static=True)``,
bare Flask, Flask-Caching + pickle, cachetools' locked ``@cached``, WhiteNoise,
``SharedDataMiddleware``, the trivial WSGI floor -- with the machine noted
above it. A module that is missing, fails to import or raises becomes a note
row; the others still run. ``--quick`` is for CI and newcomers (under a
minute in total); the numbers in README come from a full run.

Rows are dicts. The runner reads, whatever else a module adds:
``benchmark``/``case``/``variant`` (or ``name``), a time (``us_per_request``,
``us_per_call``, ``us``, or any key ending in ``_us``/``_ns``/``_ms``), and
ratios (every key starting with ``vs_``, or ``ratio`` with ``anchor``). Other
keys are shown as notes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

#: Run order: the foundation first, then the cache, then what builds on them.
MODULES = ("static_skip", "cache_hit", "sqlalchemy_hit", "redis_versions", "serve_static", "dynamic")

#: Package versions noted with the machine.
PACKAGES = (
    "identity_middleware", "Flask", "Werkzeug", "Flask-Login", "Flask-Principal", "SQLAlchemy",
    "Flask-SQLAlchemy", "cachetools", "Flask-Caching", "redis", "whitenoise", "psycopg",
)  # fmt: skip

#: Nicer names for the anchors modules put in ``vs_<anchor>`` keys.
ANCHOR_NAMES = {
    "whitenoise": "WhiteNoise",
    "floor": "WSGI floor",
    "bare": "bare Flask",
    "bare_flask": "bare Flask",
    "naive": "naive app",
    "skip_static": "skip_static",
    "cachetools": "cachetools locked",
    "cachetools_locked": "cachetools locked",
    "flask_caching": "Flask-Caching",
    "dict": "dict lookup",
    "local": "LocalVersionStore",
    "fresh": "fresh load",
    "fresh_load": "fresh load",
    "sqlalchemy": "SQLAlchemy load",
    "url_map": "URL-map match",
    "no_auth": "no-auth app",
}

_IDENTITY_KEYS = ("benchmark", "case", "variant", "name")
_TIME_KEYS = ("us_per_request", "us_per_call", "us_per_op", "us")
_UNIT_FACTORS = {"us": 1.0, "ns": 0.001, "ms": 1000.0}


@dataclass
class Outcome:
    """What one module produced: rows, or the reason it produced none."""

    module: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    problem: str | None = None


def run_module(name: str, quick: bool) -> Outcome:
    """Import and run ``benchmarks.<name>``; never raises."""
    qualified = f"{__package__ or 'benchmarks'}.{name}"
    started = time.perf_counter()
    try:
        if importlib.util.find_spec(qualified) is None:
            return Outcome(name, problem="not present")
    except ImportError as exc:  # pragma: no cover - a broken package
        return Outcome(name, problem=f"cannot be found: {exc}")
    try:
        module = importlib.import_module(qualified)
    except Exception as exc:  # noqa: BLE001 -- a broken module must not hide the others
        traceback.print_exc(file=sys.stderr)
        return Outcome(name, seconds=time.perf_counter() - started, problem=f"import failed: {_brief(exc)}")
    run = getattr(module, "run", None)
    if not callable(run):
        return Outcome(name, problem="has no run(quick) function")
    try:
        rows = list(run(quick))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return Outcome(name, seconds=time.perf_counter() - started, problem=f"failed: {_brief(exc)}")
    return Outcome(name, [dict(r) for r in rows], time.perf_counter() - started)


def _brief(exc: BaseException) -> str:
    hint = missing_extra_hint(exc)
    if hint is not None:
        return hint
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


#: Top-level modules the benchmarks import that only an extra installs.
EXTRA_OF = {
    "whitenoise": "bench",
    "flask_caching": "bench",
    "flask_sqlalchemy": "bench",
    "sqlalchemy": "bench",
    "redis": "bench",
    "psycopg": "test",
}


def missing_extra_hint(exc: BaseException) -> str | None:
    """For a benchmark that needs a package nobody installed: which extra brings it."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.partition(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return f"needs {top}, which is not installed: pip install -e '.[{extra}]'"


# -- rows -> table --------------------------------------------------------------------


def time_us(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """The row's time in microseconds and the key it came from."""
    for key in _TIME_KEYS:
        if isinstance(row.get(key), (int, float)):
            return float(row[key]), key
    for key, value in row.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key.startswith("vs_"):
            continue
        for unit, factor in _UNIT_FACTORS.items():
            if key.endswith(f"_{unit}") or key.startswith(f"{unit}_"):
                return float(value) * factor, key
    return None, None


def ratios(row: dict[str, Any]) -> tuple[list[str], set[str]]:
    """``["0.95x WhiteNoise", ...]`` and the keys they used."""
    shown, used = [], set()
    for key, value in row.items():
        if key.startswith("vs_") and isinstance(value, (int, float)):
            anchor = key[3:]
            shown.append(f"{_ratio(value)} {ANCHOR_NAMES.get(anchor, anchor.replace('_', ' '))}")
            used.add(key)
    if isinstance(row.get("ratio"), (int, float)):
        shown.append(f"{_ratio(row['ratio'])} {row.get('anchor', 'anchor')}")
        used.update({"ratio", "anchor"})
    return shown, used


def _ratio(value: float) -> str:
    return f"{value:.3g}×"


def _time(us: float | None) -> str:
    if us is None:
        return ""
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.2f} µs" if us < 10 else f"{us:.1f} µs"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| benchmark | case | variant | time | ratio to anchors | notes |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for outcome in outcomes:
        if outcome.problem is not None:
            lines.append(f"| {outcome.module} | | | | | skipped: {_cell(outcome.problem)} |")
            continue
        for row in outcome.rows:
            us, time_key = time_us(row)
            shown, used = ratios(row)
            notes = [
                f"{k}={v}"
                for k, v in row.items()
                if k not in _IDENTITY_KEYS and k != time_key and k not in used and v is not None
            ]
            shown_time = _time(us)
            if time_key is not None and time_key not in _TIME_KEYS:
                # Not a per-operation time (a percentile, say): name what it is.
                stem = time_key.removesuffix(f"_{time_key[-2:]}").removeprefix(f"{time_key[:2]}_")
                shown_time = f"{stem.replace('_', ' ')} {shown_time}"
            cells = [
                row.get("benchmark") or outcome.module,
                row.get("case", ""),
                row.get("variant") or row.get("name", ""),
                shown_time,
                ", ".join(shown),
                "; ".join(notes),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# -- the machine ------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def machine() -> str:
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    commit = _git_commit()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}"
        + (f", commit {commit}" if commit else "")
        + "\n"
        + ", ".join(versions)
    )


# -- entry point ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations: under a minute in total")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these of {', '.join(MODULES)}")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON to PATH")
    options = parser.parse_args(argv)
    names = MODULES
    if options.only:
        names = tuple(n.strip() for n in options.only.split(",") if n.strip())
        unknown = sorted(set(names) - set(MODULES))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")

    started = time.perf_counter()
    outcomes = []
    for name in names:
        print(f"running benchmarks.{name} ...", file=sys.stderr, flush=True)
        outcomes.append(run_module(name, options.quick))
    total = time.perf_counter() - started

    mode = "quick" if options.quick else "full"
    print(f"identity_middleware benchmarks ({mode} run, {total:.1f} s)\n")
    print("Machine: " + machine().replace("\n", "  \nPackages: ") + "\n")
    print(table(outcomes))
    print("\nTime per module: " + ", ".join(f"{o.module} {o.seconds:.1f} s" for o in outcomes if o.problem is None or o.seconds))
    if options.json:
        with open(options.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "quick": options.quick, "rows": [r for o in outcomes for r in o.rows],
                       "skipped": {o.module: o.problem for o in outcomes if o.problem}}, fh, indent=2)
    return 1 if any(o.problem and o.problem != "not present" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
