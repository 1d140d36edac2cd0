"""What every benchmark module does when run on its own.

``python -m benchmarks`` imports each module, calls ``run(quick) -> rows`` and
prints one table for all of them. Run alone (``python -m benchmarks.<name>
[--quick]``), a module prints a title naming the machine and a markdown table of
its own rows; that part is the same in every module, so it lives here.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Rows = list[dict[str, Any]]


def machine() -> str:
    """One line, enough to tell two runs' machines apart."""
    return (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores"
    )


def interleaved_us(
    request: Callable[[Any, Any], object], apps: Mapping[str, Any], environ: Any, *, rounds: int, batch: int
) -> dict[str, list[float]]:
    """Microseconds per ``request(app, environ)`` for each app, one sample per round.

    Each round takes the apps in turn, ``batch`` requests each, so a noisy
    neighbour on a shared machine slows every variant alike instead of whichever
    happened to run at the time. Warm the apps up first.
    """
    samples: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            started = time.perf_counter()
            for _ in range(batch):
                request(app, environ)
            samples[name].append((time.perf_counter() - started) / batch * 1e6)
    return samples


def markdown_table(headers: Sequence[str], cells: Iterable[Sequence[object]], *, left: int = 2) -> str:
    """A markdown table: the first ``left`` columns (names) align left, the others (numbers) right."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" if i < left else "---:" for i in range(len(headers))) + " |",
    ]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in cells)
    return "\n".join(lines)


def standalone(
    title: str,
    run: Callable[[bool], Rows],
    table: Callable[[Rows], str],
    argv: list[str] | None = None,
) -> None:
    """Run one module (``--quick`` for fewer iterations) and print its title and table."""
    argv = sys.argv[1:] if argv is None else argv
    rows = run("--quick" in argv)
    print(f"{title} -- {machine()}")
    print(table(rows))
