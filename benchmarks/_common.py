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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Rows = list[dict[str, Any]]


def machine() -> str:
    """One line, enough to tell two runs' machines apart."""
    return (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores"
    )


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
